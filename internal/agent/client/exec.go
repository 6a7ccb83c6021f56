package client

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"syscall"

	"github.com/noid-vm/noid/internal/agent/proto"
)

// Process is a process started in the guest by Exec or Console.
//
// Its stdout and stderr share one flow-control window: read both
// concurrently (as with os/exec pipes), or a process that writes a lot to
// the one nobody reads stalls.
type Process struct {
	c    *Client
	cl   *call
	req  proto.ExecRequest
	name string

	once sync.Once
	exit proto.Exit
	err  error
}

// Exec starts req.Argv in the guest and returns at once, without waiting
// for the agent to confirm the start: a process that cannot be started
// reports it through Wait. ctx bounds only the sending of the request; use
// req.TimeoutMS or Signal to bound the process itself.
func (c *Client) Exec(ctx context.Context, req proto.ExecRequest) (*Process, error) {
	if len(req.Argv) == 0 {
		return nil, errors.New("agent exec: empty argv")
	}
	return c.start(ctx, proto.Open{Kind: proto.KindExec, Exec: &req}, req, req.Argv[0])
}

// Console starts an interactive login shell (bash if the guest has it,
// otherwise sh) on a new terminal. Argv and TTY in req are ignored; Env,
// Rows, Cols and Cwd apply. Stdin is always enabled.
func (c *Client) Console(ctx context.Context, req proto.ExecRequest) (*Process, error) {
	req.Argv, req.TTY, req.Stdin = nil, true, true
	return c.start(ctx, proto.Open{Kind: proto.KindConsole, Exec: &req}, req, "console")
}

func (c *Client) start(ctx context.Context, o proto.Open, req proto.ExecRequest, name string) (*Process, error) {
	if req.User != "" && !c.HasFeature(proto.FeatureExecUser) {
		// An older agent would ignore the user and run the process as root.
		return nil, fmt.Errorf("agent exec %s as user %q: %w: it predates running commands as another user", name, req.User, ErrUnsupported)
	}
	cl, err := c.open(ctx, o)
	if err != nil {
		return nil, fmt.Errorf("agent exec %s: %w", name, err)
	}
	return &Process{c: c, cl: cl, req: req, name: name}, nil
}

// StreamID returns the protocol stream id of the process, for logs.
func (p *Process) StreamID() uint32 { return p.cl.st.ID() }

// Stdin returns the process's standard input. Close sends EOF (with a TTY,
// the agent then types ^D). Writes fail unless the request set Stdin.
func (p *Process) Stdin() io.WriteCloser {
	if !p.req.Stdin {
		return noStdin{}
	}
	return stdinWriter{p.cl.st.Writer(proto.ChanStdin)}
}

type stdinWriter struct{ w io.WriteCloser }

func (s stdinWriter) Write(b []byte) (int, error) { return s.w.Write(b) }
func (s stdinWriter) Close() error {
	if err := s.w.Close(); err != nil && !errors.Is(err, ErrExited) {
		return err
	}
	return nil
}

type noStdin struct{}

func (noStdin) Write([]byte) (int, error) {
	return 0, errors.New("agent exec: stdin was not requested (set ExecRequest.Stdin)")
}
func (noStdin) Close() error { return nil }

// Stdout returns the process's standard output (with a TTY, the terminal's
// output). It returns io.EOF once the agent has sent all output.
func (p *Process) Stdout() io.Reader { return p.cl.st.Reader(proto.ChanStdout) }

// Stderr returns the process's standard error; with a TTY it is empty.
func (p *Process) Stderr() io.Reader {
	if p.req.TTY {
		return eofReader{}
	}
	return p.cl.st.Reader(proto.ChanStderr)
}

type eofReader struct{}

func (eofReader) Read([]byte) (int, error) { return 0, io.EOF }

func (p *Process) control(ctx context.Context, ctl proto.Control) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	select {
	case <-p.cl.st.Done():
		return fmt.Errorf("agent exec %s: %w", p.name, p.c.connErr(p.cl.st.Err()))
	default:
	}
	if err := p.cl.st.Send(proto.TypeControl, proto.Marshal(ctl)); err != nil {
		return fmt.Errorf("agent exec %s: %w", p.name, p.c.connErr(err))
	}
	return nil
}

// Signal sends sig to the process's process group. It fails with an error
// wrapping ErrExited once the process has exited.
func (p *Process) Signal(ctx context.Context, sig syscall.Signal) error {
	return p.control(ctx, proto.Control{Signal: int(sig)})
}

// Resize changes the terminal size of a TTY process.
func (p *Process) Resize(ctx context.Context, rows, cols uint16) error {
	if rows == 0 || cols == 0 {
		return fmt.Errorf("agent exec %s: resize to %dx%d: rows and cols must be positive", p.name, rows, cols)
	}
	return p.control(ctx, proto.Control{Rows: rows, Cols: cols})
}

// Wait waits for the process to exit and returns its exit status. It
// returns an error if the process could not be started (Exit.Code is then -1
// and Exit.Error says why; the error is a *StartError) or if the connection
// was lost. Wait may be called several times and concurrently; output not
// read yet stays readable.
func (p *Process) Wait() (proto.Exit, error) {
	p.once.Do(func() {
		p.exit, p.err = p.c.wait(context.Background(), p.cl)
		if p.err != nil {
			p.err = fmt.Errorf("agent exec %s: %w", p.name, p.err)
		} else if p.exit.Error != "" {
			reason := p.exit.Reason
			if reason == "" {
				reason = legacyReason(p.exit.Error)
			}
			p.err = &StartError{Name: p.name, Reason: reason, Message: p.exit.Error}
		}
	})
	return p.exit, p.err
}

// StartError is the error of Wait for a process the agent could not start.
type StartError struct {
	// Name is the program (argv[0]) or "console".
	Name string
	// Reason is one of the proto.Reason* constants, or empty when the
	// failure is of another kind (or the agent did not say).
	Reason string
	// Message is the agent's description, such as
	// "nosuchcmd: command not found".
	Message string
}

// Error returns "agent exec <name>: <message>".
func (e *StartError) Error() string { return "agent exec " + e.Name + ": " + e.Message }

// legacyReason classifies the start failures of agents that predate
// Exit.Reason by their messages, which those agents no longer change:
// running VMs and checkpoints keep their agent across server upgrades.
func legacyReason(msg string) string {
	switch {
	case strings.HasSuffix(msg, ": executable file not found in PATH"),
		strings.HasPrefix(msg, "stat ") && (strings.HasSuffix(msg, ": no such file or directory") || strings.HasSuffix(msg, ": not a directory")):
		return proto.ReasonNotFound
	case strings.HasSuffix(msg, ": permission denied"), // not executable, or a directory
		strings.HasPrefix(msg, "starting ") && strings.HasSuffix(msg, ": exec format error"):
		return proto.ReasonNotExecutable
	}
	return ""
}
