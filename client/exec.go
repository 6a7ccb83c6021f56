package client

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"syscall"

	"github.com/coder/websocket"

	"github.com/noid-vm/noid/internal/api"
	"github.com/noid-vm/noid/internal/errdefs"
)

// ExecIO connects a remote process to local streams.
type ExecIO struct {
	// Stdin, when set, is forwarded to the process until EOF (set
	// ExecRequest.Stdin too). Nil means the process sees an empty stdin.
	Stdin io.Reader
	// Stdout and Stderr receive the process's output as it is produced
	// (with a TTY everything arrives on Stdout). Nil discards.
	Stdout, Stderr io.Writer
	// Resize delivers terminal size changes (rows, cols) for TTY sessions.
	Resize <-chan WindowSize
	// Signals are delivered to the remote process group.
	Signals <-chan syscall.Signal
}

// WindowSize is a terminal size.
type WindowSize struct{ Rows, Cols int }

// ExitStatus is how a remote process ended.
type ExitStatus struct {
	// Code is the exit code; 128+N when killed by signal N; 124 on timeout.
	Code int
	// Signal is the signal that killed the process, if any.
	Signal int
	// TimedOut is set when the request's timeout killed the process.
	TimedOut bool
	// Reason is set when the command could not be run at all: ReasonNotFound
	// (Code 127) or ReasonNotExecutable (Code 126).
	Reason string
	// Message, with Reason, is a one-line description for the user, such
	// as "nosuchcmd: command not found".
	Message string
}

// Reasons of an ExitStatus whose command could not be run.
const (
	// ReasonNotFound: the command does not exist (exit code 127).
	ReasonNotFound = api.ExitNotFound
	// ReasonNotExecutable: the command exists but cannot be executed
	// (exit code 126).
	ReasonNotExecutable = api.ExitNotExecutable
)

// Exec runs a process in vm and streams its input and output. It returns when
// the process has exited and all output has been written.
func (c *Client) Exec(ctx context.Context, vm string, req ExecRequest, eio ExecIO) (ExitStatus, error) {
	if eio.Stdin != nil {
		req.Stdin = true
	}
	return c.stream(ctx, vmPath(vm, "/exec", nil), req, eio)
}

// Console opens an interactive login shell on a PTY in vm.
func (c *Client) Console(ctx context.Context, vm string, rows, cols int, eio ExecIO) (ExitStatus, error) {
	return c.ConsoleWith(ctx, vm, ExecRequest{Rows: rows, Cols: cols}, eio)
}

// ConsoleWith opens an interactive login shell on a PTY in vm with the
// settings of req: Rows, Cols, Env, Cwd and User apply, Argv is ignored and
// TTY and Stdin are always on.
func (c *Client) ConsoleWith(ctx context.Context, vm string, req ExecRequest, eio ExecIO) (ExitStatus, error) {
	req.Argv, req.TTY, req.Stdin = nil, true, true
	return c.stream(ctx, vmPath(vm, "/console", nil), req, eio)
}

func (c *Client) wsURL(path string) string {
	return "ws" + strings.TrimPrefix(c.base, "http") + path
}

func (c *Client) stream(ctx context.Context, path string, req ExecRequest, eio ExecIO) (ExitStatus, error) {
	hdr := http.Header{}
	if c.token != "" {
		hdr.Set("Authorization", "Bearer "+c.token)
	}
	ws, resp, err := websocket.Dial(ctx, c.wsURL(path), &websocket.DialOptions{HTTPClient: c.hc, HTTPHeader: hdr, CompressionMode: websocket.CompressionDisabled})
	if err != nil {
		if resp != nil && resp.StatusCode != http.StatusSwitchingProtocols {
			if resp.Body != nil {
				defer resp.Body.Close()
			}
			return ExitStatus{}, decodeError(resp)
		}
		return ExitStatus{}, fmt.Errorf("%w: cannot reach noid-server at %s: %v", ErrUnavailable, c.target, err)
	}
	defer ws.CloseNow()
	ws.SetReadLimit(8 << 20)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	b, _ := json.Marshal(req)
	if err := ws.Write(ctx, websocket.MessageText, b); err != nil {
		return ExitStatus{}, fmt.Errorf("sending exec request: %w", err)
	}
	var wmu sync.Mutex // serialise writers for clarity
	send := func(typ websocket.MessageType, p []byte) error {
		wmu.Lock()
		defer wmu.Unlock()
		return ws.Write(ctx, typ, p)
	}
	sendMsg := func(m api.StreamMsg) error {
		b, _ := json.Marshal(m)
		return send(websocket.MessageText, b)
	}

	started := false
	startInput := func() {
		if eio.Stdin != nil {
			go func() {
				buf := make([]byte, 32<<10+1)
				buf[0] = api.ChanStdin
				for {
					n, err := eio.Stdin.Read(buf[1:])
					if n > 0 {
						if send(websocket.MessageBinary, buf[:n+1]) != nil {
							return
						}
					}
					if err != nil {
						sendMsg(api.StreamMsg{Type: api.MsgStdinEOF})
						return
					}
				}
			}()
		}
		go func() {
			for {
				select {
				case <-ctx.Done():
					return
				case sz, ok := <-eio.Resize:
					if !ok {
						eio.Resize = nil
						continue
					}
					sendMsg(api.StreamMsg{Type: api.MsgResize, Rows: sz.Rows, Cols: sz.Cols})
				case sig, ok := <-eio.Signals:
					if !ok {
						eio.Signals = nil
						continue
					}
					sendMsg(api.StreamMsg{Type: api.MsgSignal, Signal: int(sig)})
				}
			}
		}()
	}

	for {
		typ, msg, err := ws.Read(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return ExitStatus{}, ctx.Err()
			}
			return ExitStatus{}, fmt.Errorf("%w: exec stream ended without an exit status: %v", ErrUnavailable, err)
		}
		if typ == websocket.MessageBinary {
			if len(msg) < 1 {
				continue
			}
			var w io.Writer
			switch msg[0] {
			case api.ChanStdout:
				w = eio.Stdout
			case api.ChanStderr:
				w = eio.Stderr
			}
			if w != nil {
				if _, err := w.Write(msg[1:]); err != nil {
					return ExitStatus{}, fmt.Errorf("writing output: %w", err)
				}
			}
			continue
		}
		var m api.StreamMsg
		if err := json.Unmarshal(msg, &m); err != nil {
			continue
		}
		switch m.Type {
		case api.MsgStarted:
			if !started {
				started = true
				startInput()
			}
		case api.MsgExit:
			ws.Close(websocket.StatusNormalClosure, "")
			return ExitStatus{Code: m.Code, Signal: m.ExitSig, TimedOut: m.TimedOut, Reason: m.Reason, Message: m.Message}, nil
		case api.MsgError:
			if m.Error == nil {
				return ExitStatus{}, errors.New("exec failed")
			}
			return ExitStatus{}, &errdefs.Error{Code: errdefs.Code(m.Error.Code), Message: m.Error.Message, Hint: m.Error.Hint, RequestID: m.Error.RequestID}
		}
	}
}
