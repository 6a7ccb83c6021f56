package config

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/pelletier/go-toml/v2"

	"github.com/noid-vm/noid/internal/errdefs"
)

// TestLegacyKeys: a server.toml of the Rust noid (noid-cli v0.2.x) parses,
// each of its own keys gives one warning line that names the new key or
// says it has no effect, values are mapped where there is a new key, and
// a key that neither noid knows stays fatal.
func TestLegacyKeys(t *testing.T) {
	old := `listen = "127.0.0.1:7654"
kernel = "/home/firecracker/vmlinux.bin"
rootfs = "/home/firecracker/rootfs.ext4"
max_ws_sessions = 64
trust_forwarded_for = true
exec_timeout_secs = 30
console_timeout_secs = 3600
`
	c, err := Parse([]byte(old))
	if err != nil {
		t.Fatalf("the Rust noid's server.toml: %v", err)
	}
	if c.Listen != "127.0.0.1:7654" || c.Kernel != "/home/firecracker/vmlinux.bin" || c.Rootfs != "/home/firecracker/rootfs.ext4" {
		t.Errorf("shared keys: listen %q kernel %q rootfs %q", c.Listen, c.Kernel, c.Rootfs)
	}
	if !c.TrustProxy {
		t.Error("trust_forwarded_for = true did not set trust_proxy")
	}
	if c.Limits.SessionsPerUser != 64 {
		t.Errorf("max_ws_sessions = 64 gave sessions_per_user %d", c.Limits.SessionsPerUser)
	}
	want := map[string]string{
		"trust_forwarded_for":  "use trust_proxy",
		"max_ws_sessions":      "use [limits] sessions_per_user",
		"exec_timeout_secs":    "has no effect",
		"console_timeout_secs": "has no effect",
	}
	if len(c.Warnings) != len(want) {
		t.Fatalf("%d warnings, want %d: %q", len(c.Warnings), len(want), c.Warnings)
	}
	for key, says := range want {
		found := false
		for _, w := range c.Warnings {
			if strings.HasPrefix(w, key+" ") && strings.Contains(w, says) && !strings.Contains(w, "\n") {
				found = true
			}
		}
		if !found {
			t.Errorf("no one-line warning for %s saying %q in %q", key, says, c.Warnings)
		}
	}
	// The keys are consumed: a marshalled config has none of them, and
	// parses again without warnings.
	out, err := toml.Marshal(c)
	if err != nil {
		t.Fatal(err)
	}
	for key := range want {
		if strings.Contains(string(out), key) {
			t.Errorf("marshalled config still has %s:\n%s", key, out)
		}
	}
	if c2, err := Parse(out); err != nil || len(c2.Warnings) != 0 || !c2.TrustProxy || c2.Limits.SessionsPerUser != 64 {
		t.Errorf("round trip: %v, warnings %q", err, c2.Warnings)
	}

	// Our own key, when set too, wins and the warning says so.
	c, err = Parse([]byte("trust_forwarded_for = false\ntrust_proxy = true\nmax_ws_sessions = 8\n[limits]\nsessions_per_user = 5\n"))
	if err != nil || !c.TrustProxy || c.Limits.SessionsPerUser != 5 {
		t.Fatalf("new keys set too: %v, trust_proxy %v sessions %d", err, c != nil && c.TrustProxy, c.Limits.SessionsPerUser)
	}
	for _, w := range c.Warnings {
		if !strings.Contains(w, "wins") {
			t.Errorf("warning does not say the new key wins: %q", w)
		}
	}
	// An out-of-range value is not mapped (the default applies) and does
	// not stop the server.
	if c, err := Parse([]byte("max_ws_sessions = 0\n")); err != nil || c.Limits.SessionsPerUser != DefaultSessionsPerUser || len(c.Warnings) != 1 {
		t.Errorf("max_ws_sessions = 0: %v, %+v", err, c)
	}
	// Our configs give no warnings.
	if c, err := Parse([]byte("trust_proxy = true\n")); err != nil || len(c.Warnings) != 0 {
		t.Errorf("our own keys: %v, warnings %q", err, c.Warnings)
	}
	// Keys of neither noid stay fatal, at the top level and in sections
	// (the legacy keys are top-level only).
	for _, in := range []string{"max_ws_session = 3\n", "[limits]\nmax_ws_sessions = 3\n", "golden_dir = \"/x\"\n"} {
		if _, err := Parse([]byte(in)); err == nil || !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), "unknown config key") {
			t.Errorf("Parse(%q) = %v, want unknown config key", in, err)
		}
	}
}

// TestFindDefault: the first existing file wins, none gives "" (the
// built-in defaults).
func TestFindDefault(t *testing.T) {
	dir := t.TempDir()
	ours, old := filepath.Join(dir, "config.toml"), filepath.Join(dir, "server.toml")
	if p, err := FindDefault(ours, old); err != nil || p != "" {
		t.Fatalf("neither file: %q, %v", p, err)
	}
	if err := os.WriteFile(old, []byte("kernel = \"/k\"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if p, err := FindDefault(ours, old); err != nil || p != old {
		t.Fatalf("only the Rust noid's file: %q, %v", p, err)
	}
	if err := os.WriteFile(ours, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if p, err := FindDefault(ours, old); err != nil || p != ours {
		t.Fatalf("both files: %q, %v", p, err)
	}
}
