// Package scripts_test checks scripts/install.sh: it installs into a
// temporary root, runs again (idempotent), keeps an existing config, and
// --uninstall removes everything except user data.
package scripts_test

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/noid-vm/noid/internal/testutil"
)

type installer struct {
	t      *testing.T
	script string
	from   string
	repo   string
}

func (in installer) run(env []string, args ...string) (string, int) {
	in.t.Helper()
	cmd := exec.Command("bash", append([]string{in.script}, args...)...)
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.CombinedOutput()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		in.t.Fatal(err)
	}
	return string(out), code
}

func (in installer) mustRun(env []string, args ...string) string {
	in.t.Helper()
	out, code := in.run(env, args...)
	if code != 0 {
		in.t.Fatalf("install.sh %v: exit %d\n%s", args, code, out)
	}
	return out
}

func read(t *testing.T, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func exists(p string) bool { _, err := os.Lstat(p); return err == nil }

func TestInstallRoundTrip(t *testing.T) {
	bins := testutil.Build(t)
	repo, err := testutil.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	in := installer{t: t, script: filepath.Join(repo, "scripts", "install.sh"), from: filepath.Dir(bins.Noid), repo: repo}
	root := t.TempDir()

	out := in.mustRun(nil, "--destdir", root, "--from", in.from)
	bin := filepath.Join(root, "usr/local/bin")
	for _, b := range []string{"noid", "noid-server", "noid-agent"} {
		p := filepath.Join(bin, b)
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatalf("%s not installed: %v\n%s", b, err, out)
		}
		if fi.Mode().Perm() != 0o755 {
			t.Errorf("%s mode %v", b, fi.Mode())
		}
		if !bytes.Equal(read(t, p), read(t, filepath.Join(in.from, b))) {
			t.Errorf("%s differs from the built binary", b)
		}
	}
	unit := string(read(t, filepath.Join(root, "etc/systemd/system/noid-server.service")))
	if !strings.Contains(unit, "ExecStart=/usr/local/bin/noid-server serve --config /etc/noid/config.toml") || !strings.Contains(unit, "KillMode=process") {
		t.Errorf("unit:\n%s", unit)
	}
	conf := filepath.Join(root, "etc/noid/config.toml")
	if !bytes.Equal(read(t, conf), read(t, filepath.Join(repo, "deploy/config.toml"))) {
		t.Error("config differs from deploy/config.toml")
	}
	if fi, err := os.Stat(filepath.Join(root, "var/lib/noid")); err != nil || fi.Mode().Perm() != 0o700 {
		t.Errorf("data dir: %v %v", fi, err)
	}
	comps := map[string]string{
		"usr/local/share/bash-completion/completions/noid":    "__start_noid",
		"usr/local/share/zsh/site-functions/_noid":            "#compdef noid",
		"usr/local/share/fish/vendor_completions.d/noid.fish": "complete -c noid",
	}
	for p, marker := range comps {
		if !strings.Contains(string(read(t, filepath.Join(root, p))), marker) {
			t.Errorf("%s lacks %q", p, marker)
		}
	}
	// The installed CLI runs.
	vout, err := exec.Command(filepath.Join(bin, "noid"), "version").CombinedOutput()
	if err != nil || !strings.Contains(string(vout), "client: noid ") {
		t.Errorf("installed noid version: %v\n%s", err, vout)
	}
	// The bash completion loads.
	if b, err := exec.Command("bash", "--norc", "-c", "source "+filepath.Join(root, "usr/local/share/bash-completion/completions/noid")+" && complete -p noid").CombinedOutput(); err != nil || !strings.Contains(string(b), "__start_noid") {
		t.Errorf("installed bash completion does not load: %v\n%s", err, b)
	}

	// Idempotent: a second run changes nothing (DESTDIR works too).
	out = in.mustRun([]string{"DESTDIR=" + root}, "--from", in.from)
	if strings.Contains("\n"+out, "\ninstalled ") || !strings.Contains(out, "unchanged /usr/local/bin/noid-server") || !strings.Contains(out, "kept existing /etc/noid/config.toml") {
		t.Errorf("second run:\n%s", out)
	}
	// A changed config is never overwritten, and survives uninstall.
	custom := append(read(t, conf), []byte("\n# mine\nlisten = \"0.0.0.0:7070\"\n")...)
	os.WriteFile(conf, custom, 0o644)
	in.mustRun(nil, "--destdir", root, "--from", in.from)
	if !bytes.Equal(read(t, conf), custom) {
		t.Error("install overwrote a changed config")
	}
	// User data survives uninstall.
	db := filepath.Join(root, "var/lib/noid/noid.db")
	os.WriteFile(db, []byte("user data"), 0o600)

	out = in.mustRun(nil, "--uninstall", "--destdir", root)
	for _, p := range []string{"usr/local/bin/noid", "usr/local/bin/noid-server", "usr/local/bin/noid-agent", "etc/systemd/system/noid-server.service"} {
		if exists(filepath.Join(root, p)) {
			t.Errorf("uninstall left %s", p)
		}
	}
	for p := range comps {
		if exists(filepath.Join(root, p)) {
			t.Errorf("uninstall left %s", p)
		}
	}
	if !bytes.Equal(read(t, conf), custom) || !strings.Contains(out, "kept /etc/noid/config.toml") {
		t.Errorf("uninstall did not keep the changed config:\n%s", out)
	}
	if string(read(t, db)) != "user data" || !strings.Contains(out, "kept /var/lib/noid") {
		t.Errorf("uninstall touched user data:\n%s", out)
	}
	// Uninstalling twice is fine.
	in.mustRun(nil, "--uninstall", "--destdir", root)

	// An unchanged config goes with the rest; /etc/noid too.
	os.Remove(conf)
	in.mustRun(nil, "--destdir", root, "--from", in.from)
	in.mustRun(nil, "--uninstall", "--destdir", root)
	if exists(filepath.Join(root, "etc/noid")) {
		t.Error("uninstall left /etc/noid with the default config")
	}
	if string(read(t, db)) != "user data" {
		t.Error("second uninstall touched user data")
	}

	// --prefix moves the binaries, and the unit follows.
	root2 := t.TempDir()
	in.mustRun(nil, "--destdir", root2, "--prefix", "/opt/noid", "--from", in.from)
	if !exists(filepath.Join(root2, "opt/noid/bin/noid-server")) {
		t.Error("--prefix: noid-server not in /opt/noid/bin")
	}
	if u := string(read(t, filepath.Join(root2, "etc/systemd/system/noid-server.service"))); !strings.Contains(u, "ExecStart=/opt/noid/bin/noid-server serve") {
		t.Errorf("--prefix: unit\n%s", u)
	}
	in.mustRun(nil, "--uninstall", "--destdir", root2, "--prefix", "/opt/noid")
	if exists(filepath.Join(root2, "opt/noid/bin/noid-server")) {
		t.Error("--prefix uninstall left the binary")
	}

	// Bad usage.
	if _, code := in.run(nil, "--bogus"); code != 2 {
		t.Errorf("--bogus: exit %d, want 2", code)
	}
	if out, code := in.run(nil, "--destdir", t.TempDir(), "--from", t.TempDir()); code != 1 || !strings.Contains(out, "missing or not executable") {
		t.Errorf("--from an empty dir: exit %d\n%s", code, out)
	}
}

// TestInstallKeepsLegacyConfig: on a host with the Rust noid's
// /etc/noid/server.toml and no config.toml, install.sh installs no
// config.toml (which would take its place) and says so.
func TestInstallKeepsLegacyConfig(t *testing.T) {
	bins := testutil.Build(t)
	repo, err := testutil.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	in := installer{t: t, script: filepath.Join(repo, "scripts", "install.sh"), from: filepath.Dir(bins.Noid), repo: repo}
	root := t.TempDir()
	old := filepath.Join(root, "etc/noid/server.toml")
	if err := os.MkdirAll(filepath.Dir(old), 0o755); err != nil {
		t.Fatal(err)
	}
	oldText := []byte("kernel = \"/home/firecracker/vmlinux.bin\"\nrootfs = \"/home/firecracker/rootfs.ext4\"\nmax_ws_sessions = 32\n")
	if err := os.WriteFile(old, oldText, 0o644); err != nil {
		t.Fatal(err)
	}
	out := in.mustRun(nil, "--destdir", root, "--from", in.from)
	if exists(filepath.Join(root, "etc/noid/config.toml")) || !strings.Contains(out, "kept the Rust noid's /etc/noid/server.toml") {
		t.Errorf("install next to server.toml:\n%s", out)
	}
	if !bytes.Equal(read(t, old), oldText) {
		t.Error("install changed server.toml")
	}
}
