package manager

import (
	"errors"
	"fmt"
	"testing"

	"github.com/noid-vm/noid/internal/agent/client"
	"github.com/noid-vm/noid/internal/agent/proto"
	"github.com/noid-vm/noid/internal/api"
	"github.com/noid-vm/noid/internal/errdefs"
)

// TestExitMessage: what a process's Wait returned becomes the exec stream's
// last message: the command's own failures are exits with a shell's codes,
// the request's and noid's are errors of the right class.
func TestExitMessage(t *testing.T) {
	start := func(reason, msg string) error {
		return fmt.Errorf("wrapped: %w", &client.StartError{Name: "x", Reason: reason, Message: msg})
	}
	for _, c := range []struct {
		name    string
		ex      proto.Exit
		err     error
		want    api.StreamMsg
		wantErr error
		errText string
	}{
		{name: "ran", ex: proto.Exit{Code: 3}, want: api.StreamMsg{Type: api.MsgExit, Code: 3}},
		{name: "signal", ex: proto.Exit{Code: 137, Signal: 9}, want: api.StreamMsg{Type: api.MsgExit, Code: 137, ExitSig: 9}},
		{name: "timeout", ex: proto.Exit{Code: 124, TimedOut: true}, want: api.StreamMsg{Type: api.MsgExit, Code: 124, TimedOut: true}},
		{name: "not found", ex: proto.Exit{Code: -1}, err: start(proto.ReasonNotFound, "x: command not found"),
			want: api.StreamMsg{Type: api.MsgExit, Code: 127, Reason: api.ExitNotFound, Message: "x: command not found"}},
		{name: "not executable", ex: proto.Exit{Code: -1}, err: start(proto.ReasonNotExecutable, "/etc/hostname: permission denied"),
			want: api.StreamMsg{Type: api.MsgExit, Code: 126, Reason: api.ExitNotExecutable, Message: "/etc/hostname: permission denied"}},
		{name: "unknown user", ex: proto.Exit{Code: -1}, err: start(proto.ReasonUnknownUser, `no user "bob" in the guest's /etc/passwd`),
			wantErr: errdefs.ErrInvalidArgument, errText: `invalid argument: no user "bob" in the guest's /etc/passwd`},
		{name: "bad cwd", ex: proto.Exit{Code: -1}, err: start(proto.ReasonBadCwd, "working directory /x: no such file or directory"),
			wantErr: errdefs.ErrInvalidArgument, errText: "invalid argument: working directory /x: no such file or directory"},
		{name: "other start failure", ex: proto.Exit{Code: -1}, err: start("", "allocating a terminal: no ptys"),
			wantErr: errdefs.ErrInternal, errText: "internal error: the guest could not start the process: allocating a terminal: no ptys"},
		{name: "lost", err: errors.New("agent exec x: connection lost"),
			wantErr: errdefs.ErrUnavailable, errText: "unavailable: lost the process: agent exec x: connection lost"},
	} {
		got, err := ExitMessage(c.ex, c.err)
		if c.wantErr == nil {
			if err != nil || got != c.want {
				t.Errorf("%s: %+v, %v; want %+v", c.name, got, err, c.want)
			}
			continue
		}
		if !errors.Is(err, c.wantErr) || err.Error() != c.errText {
			t.Errorf("%s: %+v, %v; want error %q", c.name, got, err, c.errText)
		}
	}
	_, err := ExitMessage(proto.Exit{Code: -1}, start(proto.ReasonUnknownUser, "no user"))
	if errdefs.HintOf(err) == "" {
		t.Error("unknown user: no hint")
	}
}
