package client

import (
	"testing"

	"github.com/noid-vm/noid/internal/agent/proto"
)

// TestLegacyReason classifies the start failures of agents without
// Exit.Reason, by the exact messages those agents send.
func TestLegacyReason(t *testing.T) {
	for msg, want := range map[string]string{
		"nosuchcmd: executable file not found in PATH":                      proto.ReasonNotFound,
		"stat /nonexistent/program: no such file or directory":              proto.ReasonNotFound,
		"stat /etc/hostname/x: not a directory":                             proto.ReasonNotFound,
		"/etc/hostname: permission denied":                                  proto.ReasonNotExecutable,
		"/tmp: permission denied":                                           proto.ReasonNotExecutable,
		"starting ./x: fork/exec ./x: exec format error":                    proto.ReasonNotExecutable,
		"starting /bin/x: fork/exec /bin/x: permission denied":              proto.ReasonNotExecutable,
		"starting true: fork/exec /usr/bin/true: no such file or directory": "", // a bad cwd, or a missing interpreter
		"allocating a terminal: opening /dev/ptmx: no such device":          "",
		"empty argv": "",
	} {
		if got := legacyReason(msg); got != want {
			t.Errorf("legacyReason(%q) = %q, want %q", msg, got, want)
		}
	}
}
