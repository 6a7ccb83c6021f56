package servercli

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"

	"github.com/noid-vm/noid/internal/config"
)

// TestLoggerFormats: log_format json writes one object a line with the
// vm, user and request_id fields; under the journal each line starts with
// its syslog priority and carries no time of its own.
func TestLoggerFormats(t *testing.T) {
	var b bytes.Buffer
	log := newLogger(&b, &config.Config{LogLevel: "info", LogFormat: "json"}, false).With("vm", "dev", "user", "alice")
	log.Info("request", "request_id", "abc")
	log.Debug("hidden")
	var rec map[string]any
	if err := json.Unmarshal(b.Bytes(), &rec); err != nil {
		t.Fatalf("a json log line: %v: %q", err, b.String())
	}
	if rec["msg"] != "request" || rec["vm"] != "dev" || rec["user"] != "alice" || rec["request_id"] != "abc" || rec["level"] != "INFO" || rec["time"] == nil {
		t.Errorf("json record: %v", rec)
	}

	for _, format := range []string{"text", "json"} {
		b.Reset()
		log = newLogger(&b, &config.Config{LogLevel: "debug", LogFormat: format}, true).With("vm", "dev")
		log.Debug("d")
		log.Info("i", "user", "alice")
		log.Warn("w")
		log.Error("e")
		lines := strings.Split(strings.TrimSpace(b.String()), "\n")
		if len(lines) != 4 {
			t.Fatalf("%s: %d lines: %q", format, len(lines), b.String())
		}
		for i, prefix := range []string{"<7>", "<6>", "<4>", "<3>"} {
			if !strings.HasPrefix(lines[i], prefix) || strings.Contains(lines[i], "time") || !strings.Contains(lines[i], "dev") {
				t.Errorf("%s: journal line %d: %q, want the prefix %s, vm and no time", format, i, lines[i], prefix)
			}
		}
		if !strings.Contains(lines[1], "alice") {
			t.Errorf("%s: %q lacks the user", format, lines[1])
		}
	}
	if _, err := config.Parse([]byte("log_format = \"xml\"\n")); err == nil || !strings.Contains(err.Error(), "log_format must be text or json") {
		t.Errorf("log_format = xml: %v", err)
	}
}
