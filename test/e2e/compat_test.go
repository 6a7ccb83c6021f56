//go:build e2e

package e2e

import (
	"slices"
	"strings"
	"testing"

	"github.com/noid-vm/noid/client"
)

// TestCompatCapabilitiesConsoleEnv (issue 17 items 2 and 4): a server on
// a config with the Rust noid's keys starts with one deprecation warning
// each and applies max_ws_sessions as sessions_per_user; GET
// /v1/capabilities through the typed client gives the defaults, limits
// and features, and each caller's own quota and usage; noid --version
// names the server; noid exec VM -e K=V with no command opens a console
// whose shell has K.
func TestCompatCapabilitiesConsoleEnv(t *testing.T) {
	e := NewEnv(t, WithConfig("trust_forwarded_for = true\nmax_ws_sessions = 5\nexec_timeout_secs = 30\nconsole_timeout_secs = 3600\n[quota]\nmax_vcpus = 6"))
	log := e.Log()
	for _, key := range []string{"trust_forwarded_for", "max_ws_sessions", "exec_timeout_secs", "console_timeout_secs"} {
		if n := strings.Count(log, "level=WARN msg=\"config: "+key+" (from the Rust noid)"); n != 1 {
			t.Errorf("%d deprecation warnings for %s, want 1; log:\n%s", n, key, lastLines(log, 40))
		}
	}
	if !strings.Contains(log, "config: read "+e.Config) {
		t.Errorf("the start-up log does not name the config file; log:\n%s", lastLines(log, 40))
	}
	e.Create("env")

	caps, err := e.Client.Capabilities(ctx(t))
	if err != nil {
		t.Fatalf("capabilities: %v", err)
	}
	if caps.API != "1.0" || caps.APIVersion != 1 || caps.VMM != "qemu" || caps.Accel != "tcg" || caps.Server == "" {
		t.Errorf("versions: %+v", caps)
	}
	if caps.Defaults.VCPUs != 1 || caps.Defaults.MemoryMiB != 256 || caps.DefaultCPUs != 1 || caps.DefaultMemMiB != 256 || caps.Defaults.Network != "none" {
		t.Errorf("defaults (the test config has 1 vCPU, 256 MiB, no network): %+v", caps.Defaults)
	}
	if caps.Limits.SessionsPerUser != 5 || caps.Limits.MaxNameLength != 63 || caps.MaxVMNameLength != 63 || caps.Limits.MaxVCPUs < 1 || caps.Limits.MinMemoryMiB != 64 {
		t.Errorf("limits (max_ws_sessions = 5 maps to sessions_per_user): %+v", caps.Limits)
	}
	for _, f := range []string{client.FeatureCheckpoint, client.FeatureConsoleEnv, client.FeatureExecUser} {
		if !slices.Contains(caps.Features, f) {
			t.Errorf("feature %s missing from %v", f, caps.Features)
		}
	}
	if slices.Contains(caps.Features, client.FeatureNetwork) {
		t.Errorf("networking is off, yet features has %s: %v", client.FeatureNetwork, caps.Features)
	}
	// Root on the socket is an admin: [quota] keys the config sets apply,
	// the others are unlimited for admins. Usage counts the VM.
	if q := caps.Quota; q.MaxVCPUs != 6 || q.MaxVMs != 0 || q.Used.VMs != 1 || q.Used.VCPUs != 1 || q.Used.MemoryMiB != 256 {
		t.Errorf("admin's quota: %+v", q)
	}
	// A token user with a limit of their own sees it, the config's
	// defaults for the rest, and no usage.
	ut, err := e.Client.CreateUser(ctx(t), "capuser", false)
	if err != nil {
		t.Fatal(err)
	}
	three := int64(3)
	if _, err := e.Client.SetQuota(ctx(t), "capuser", client.Quota{MaxVMs: &three}); err != nil {
		t.Fatal(err)
	}
	uc, err := client.New("unix://"+e.Socket, ut.Token)
	if err != nil {
		t.Fatal(err)
	}
	ucaps, err := uc.Capabilities(ctx(t))
	if err != nil {
		t.Fatalf("capabilities as capuser: %v", err)
	}
	if q := ucaps.Quota; q.MaxVMs != 3 || q.MaxVCPUs != 6 || q.MaxMemoryMiB != 32<<10 || q.MaxDiskBytes != 32<<30 || q.Used.VMs != 0 {
		t.Errorf("capuser's quota: %+v", q)
	}
	// Without a token over TCP it is refused like every authenticated
	// route; here, an unknown token on the socket.
	bad, _ := client.New("unix://"+e.Socket, "noid_tok_0000000000000000000000000000000000000000000000000000000000000000")
	if _, err := bad.Capabilities(ctx(t)); err == nil {
		t.Error("capabilities with an unknown token succeeded")
	}

	if r := e.CLI("", "--version"); r.Code != 0 || !strings.Contains(r.Stdout, "client: noid ") || !strings.Contains(r.Stdout, "server: noid-server "+caps.Server) {
		t.Errorf("noid --version: %+v", r)
	}

	// The shell's input is echoed by its terminal: "[$NOID_K]" comes back
	// as typed, the expansion only from the shell.
	r := e.CLI("echo \"[$NOID_K]\"\necho \"<$PWD>\"\nexit 3\n", "exec", "env", "-e", "NOID_K=compat 42", "-w", "/tmp")
	if r.Code != 3 || !strings.Contains(r.Stdout, "[compat 42]") || !strings.Contains(r.Stdout, "</tmp>") {
		t.Errorf("exec -e with no command: code %d stdout %q stderr %q", r.Code, r.Stdout, r.Stderr)
	}
}
