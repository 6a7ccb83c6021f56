package servercli

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestConfigFallback: without --config, and with --config naming our
// default file when it is missing, the Rust noid's server.toml is read;
// the start-up log names the file and has one WARN line per old key.
func TestConfigFallback(t *testing.T) {
	dir := t.TempDir()
	ours, old := filepath.Join(dir, "config.toml"), filepath.Join(dir, "server.toml")
	oldText := "listen = \"127.0.0.1:7654\"\nkernel = \"/k\"\nrootfs = \"/r\"\nmax_ws_sessions = 32\ntrust_forwarded_for = false\nexec_timeout_secs = 30\nconsole_timeout_secs = 3600\ndata_dir = \"" + dir + "\"\n"
	if err := os.WriteFile(old, []byte(oldText), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, flag := range []string{"", ours} {
		e := &env{stdout: &bytes.Buffer{}, stderr: &bytes.Buffer{}, configPath: flag, defaultConfigs: []string{ours, old}}
		cfg, err := e.config()
		if err != nil {
			t.Fatalf("--config %q: %v", flag, err)
		}
		if e.configRead != old || cfg.Listen != "127.0.0.1:7654" {
			t.Fatalf("--config %q read %q (listen %q), want %s", flag, e.configRead, cfg.Listen, old)
		}
		var b bytes.Buffer
		logConfig(newLogger(&b, cfg, false), e.configRead, cfg)
		lines := strings.Split(strings.TrimSpace(b.String()), "\n")
		if len(lines) != 5 || !strings.Contains(lines[0], "config: read "+old) {
			t.Fatalf("start-up log:\n%s", b.String())
		}
		for _, l := range lines[1:] {
			if !strings.Contains(l, "level=WARN") || !(strings.Contains(l, "deprecated") || strings.Contains(l, "no effect")) {
				t.Errorf("not a deprecation warning: %s", l)
			}
		}
	}
	// Another --config that is missing is an error, not a fallback.
	e := &env{configPath: filepath.Join(dir, "other.toml"), defaultConfigs: []string{ours, old}}
	if _, err := e.config(); err == nil || !strings.Contains(err.Error(), "other.toml") {
		t.Fatalf("missing --config other.toml: %v", err)
	}
	// Ours, once it exists, is preferred; no file at all means defaults.
	if err := os.WriteFile(ours, []byte("data_dir = \""+dir+"\"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	e = &env{defaultConfigs: []string{ours, old}}
	if cfg, err := e.config(); err != nil || e.configRead != ours || len(cfg.Warnings) != 0 {
		t.Fatalf("with both files: read %q, %v", e.configRead, err)
	}
	e = &env{defaultConfigs: []string{filepath.Join(dir, "a"), filepath.Join(dir, "b")}}
	if _, err := e.config(); err != nil || e.configRead != "" {
		t.Fatalf("no file: read %q, %v", e.configRead, err)
	}
	var b bytes.Buffer
	cfg, _ := e.config()
	logConfig(newLogger(&b, cfg, false), "", cfg)
	if !strings.Contains(b.String(), "built-in defaults") {
		t.Fatalf("defaults not named in the log: %s", b.String())
	}
}
