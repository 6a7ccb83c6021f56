package cli

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestLegacyClientConfig: with no config of ours, the Rust noid's
// ~/.noid/config.toml ([server] url and token) is used, with an offer to
// migrate printed once; `noid auth migrate` writes ours (0600) and leaves
// the old file; ours then wins.
func TestLegacyClientConfig(t *testing.T) {
	f := newFakeServer(t)
	r := f.runner(t)
	r.url = "" // no NOID_URL: the config files decide
	home := r.env["HOME"]
	oldPath := filepath.Join(home, ".noid", "config.toml")
	if err := os.MkdirAll(filepath.Dir(oldPath), 0o700); err != nil {
		t.Fatal(err)
	}
	oldText := "[server]\nurl = \"" + f.URL + "\"\ntoken = \"as-olduser\"\n"
	if err := os.WriteFile(oldPath, []byte(oldText), 0o600); err != nil {
		t.Fatal(err)
	}
	res := r.run("whoami")
	if res.code != 0 || !strings.Contains(res.stdout, "olduser") {
		t.Fatalf("whoami with the old config: %+v", res)
	}
	if !strings.Contains(res.stderr, "noid auth migrate") || strings.Count(res.stderr, "\n") != 1 {
		t.Errorf("no one-line offer to migrate: %q", res.stderr)
	}
	if res := r.run("whoami"); res.code != 0 || res.stderr != "" {
		t.Errorf("the offer is printed again, or whoami failed: %+v", res)
	}

	res = r.run("auth", "migrate")
	newPath := filepath.Join(home, ".config", "noid", "config.toml")
	if res.code != 0 || !strings.Contains(res.stdout, "authenticated as olduser") || !strings.Contains(res.stdout, "saved "+newPath) {
		t.Fatalf("auth migrate: %+v", res)
	}
	b, err := os.ReadFile(newPath)
	if err != nil || !strings.Contains(string(b), f.URL) || !strings.Contains(string(b), "as-olduser") {
		t.Fatalf("migrated config: %v\n%s", err, b)
	}
	if fi, err := os.Stat(newPath); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("migrated config mode: %v %v", fi.Mode(), err)
	}
	if b, err := os.ReadFile(oldPath); err != nil || string(b) != oldText {
		t.Errorf("the old config changed: %v\n%s", err, b)
	}
	// A second migrate keeps ours unless --force.
	if res := r.run("auth", "migrate", "--no-check"); res.code != 2 || !strings.Contains(res.stderr, "already exists") {
		t.Errorf("second migrate: %+v", res)
	}
	// Ours wins over the old file from now on: point ours at another token.
	if _, err := writeAuthConfig(func(k string) string { return r.env[k] }, authConfig{URL: f.URL, Token: "as-newuser"}); err != nil {
		t.Fatal(err)
	}
	if res := r.run("whoami"); res.code != 0 || !strings.Contains(res.stdout, "newuser") {
		t.Errorf("whoami with both configs: %+v", res)
	}
	if res := r.run("auth", "migrate", "--no-check", "--force"); res.code != 0 {
		t.Errorf("migrate --force: %+v", res)
	}
	if res := r.run("whoami"); !strings.Contains(res.stdout, "olduser") {
		t.Errorf("after migrate --force: %+v", res)
	}
	// An old file without a [server] url is not a config: nothing to migrate.
	os.Remove(newPath)
	os.WriteFile(oldPath, []byte("[golden]\ncpus = 1\n"), 0o600)
	if res := r.run("auth", "migrate", "--no-check"); res.code != 2 || !strings.Contains(res.stderr, "nothing to migrate") {
		t.Errorf("migrate without [server]: %+v", res)
	}
}
