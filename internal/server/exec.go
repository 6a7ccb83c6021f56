package server

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"sync"
	"syscall"
	"time"

	"github.com/coder/websocket"

	"github.com/noid-vm/noid/internal/api"
	"github.com/noid-vm/noid/internal/errdefs"
)

func (s *Server) hExec(w http.ResponseWriter, r *http.Request) error {
	return s.serveExec(w, r, false)
}

func (s *Server) hConsole(w http.ResponseWriter, r *http.Request) error {
	return s.serveExec(w, r, true)
}

// Read limits of an exec WebSocket: the first message (the request, with
// its argv and environment) and every later one (stdin data, controls).
const (
	maxExecRequest = 4 << 20
	maxStreamMsg   = 256 << 10
)

// serveExec runs one process over a WebSocket. Errors before the upgrade are
// ordinary HTTP errors; after it they are sent as an error message.
//
// What a session holds is bounded: stdin is handed from the WebSocket
// reader to the process one message (at most maxStreamMsg) at a time, and
// the reader stops reading while the process's input is full (the agent's
// flow-control window), so a process that does not read its stdin holds
// up the client instead of the server's memory. Output has the agent's
// window. A user has at most [limits] sessions_per_user sessions open.
func (s *Server) serveExec(w http.ResponseWriter, r *http.Request, console bool) error {
	u := userOf(r.Context())
	g, err := s.mgr.Guest(r.Context(), u, vmRef(r))
	if err != nil {
		return err
	}
	release, err := s.sessions.acquire(u)
	if err != nil {
		return err
	}
	defer release()
	// The stream is not bounded by write_timeout: the upgrade goes to the
	// connection's own writer, and the hijacked connection keeps the
	// deadlines serveRoute cleared. Pings and a timeout on each write
	// drop a client that is gone.
	if dw, ok := w.(*deadlineWriter); ok {
		w = dw.Unwrap()
	}
	ws, err := websocket.Accept(w, r, &websocket.AcceptOptions{InsecureSkipVerify: true, CompressionMode: websocket.CompressionDisabled})
	if err != nil {
		return nil // Accept already wrote the response.
	}
	ws.SetReadLimit(maxExecRequest)
	// The WebSocket closes its connection when the context of a read or
	// write ends, so the stream's context does not end with the request's
	// (at a shutdown): the shutdown is told to the client first.
	ctx, cancel := context.WithCancel(context.WithoutCancel(r.Context()))
	defer cancel()
	writeTimeout := s.cfg.HTTP.Write()
	write := func(typ websocket.MessageType, b []byte) error {
		wctx, wcancel := context.WithTimeout(ctx, writeTimeout)
		defer wcancel()
		return ws.Write(wctx, typ, b)
	}
	sendErr := func(err error) {
		code, _ := errdefs.Classify(err)
		b, _ := json.Marshal(api.StreamMsg{Type: api.MsgError, Error: &api.ErrorDetail{Code: string(code), Message: err.Error(), Hint: errdefs.HintOf(err), RequestID: requestID(ctx)}})
		write(websocket.MessageText, b)
		ws.Close(websocket.StatusNormalClosure, "")
	}
	shutdown := make(chan struct{})
	stopWatch := context.AfterFunc(r.Context(), func() {
		if errors.Is(context.Cause(r.Context()), errShuttingDown) {
			sendErr(shutdownErr(r.Context(), context.Canceled))
			close(shutdown)
		}
		cancel()
	})
	defer stopWatch()
	go s.keepAlive(ctx, cancel, ws)

	rctx, rcancel := context.WithTimeout(ctx, 30*time.Second)
	typ, first, err := ws.Read(rctx)
	rcancel()
	if err != nil {
		ws.Close(websocket.StatusProtocolError, "expected exec request")
		return nil
	}
	if typ != websocket.MessageText {
		sendErr(fmt.Errorf("%w: the first message must be a JSON exec request", errdefs.ErrInvalidArgument))
		return nil
	}
	var req api.ExecRequest
	if json.Unmarshal(first, &req) != nil {
		sendErr(fmt.Errorf("%w: the first message must be a JSON exec request", errdefs.ErrInvalidArgument))
		return nil
	}
	proc, err := g.Exec(ctx, req, console)
	if err != nil {
		sendErr(err)
		return nil
	}
	started, _ := json.Marshal(api.StreamMsg{Type: api.MsgStarted})
	if err := write(websocket.MessageText, started); err != nil {
		proc.Signal(context.Background(), syscall.SIGKILL)
		return nil
	}
	ws.SetReadLimit(maxStreamMsg)

	// Client → process. Stdin goes through its own goroutine, so signals
	// and resizes sent before the input fills are not held up by a
	// process that reads slowly; once the writer is blocked on the
	// process, the reader waits for it (backpressure to the client).
	stdinCh := make(chan []byte) // one message held by each side, no queue
	go func() {
		stdin := proc.Stdin()
		defer stdin.Close()
		for b := range stdinCh {
			if _, err := stdin.Write(b); err != nil {
				for range stdinCh {
				}
				return
			}
		}
	}()
	go func() {
		stdinOpen := req.Stdin || console
		closeStdin := func() {
			if stdinOpen {
				stdinOpen = false
				close(stdinCh)
			}
		}
		if !stdinOpen {
			close(stdinCh)
		}
		for {
			typ, msg, err := ws.Read(ctx)
			if err != nil {
				// The client went away: hang up the process like a terminal would.
				if ctx.Err() == nil {
					proc.Signal(context.Background(), syscall.SIGHUP)
				}
				closeStdin()
				cancel()
				return
			}
			if typ == websocket.MessageBinary {
				if len(msg) > 1 && msg[0] == api.ChanStdin && stdinOpen {
					select {
					case stdinCh <- msg[1:]:
					case <-ctx.Done():
					}
				}
				continue
			}
			m, ok := clientMsg(msg)
			if !ok {
				continue
			}
			switch m.Type {
			case api.MsgStdinEOF:
				closeStdin()
			case api.MsgSignal:
				proc.Signal(ctx, syscall.Signal(m.Signal))
			case api.MsgResize:
				proc.Resize(ctx, uint16(m.Rows), uint16(m.Cols))
			}
		}
	}()

	// Process → client.
	var wg sync.WaitGroup
	pump := func(ch byte, rd io.Reader) {
		defer wg.Done()
		if rd == nil {
			return
		}
		buf := make([]byte, 32<<10+1)
		buf[0] = ch
		for {
			n, err := rd.Read(buf[1:])
			if n > 0 {
				if werr := write(websocket.MessageBinary, buf[:n+1]); werr != nil {
					cancel()
					io.Copy(io.Discard, rd)
					return
				}
			}
			if err != nil {
				return
			}
		}
	}
	wg.Add(2)
	go pump(api.ChanStdout, proc.Stdout())
	go pump(api.ChanStderr, proc.Stderr())
	pumped := make(chan struct{})
	go func() { wg.Wait(); close(pumped) }()
	select {
	case <-pumped:
	case <-shutdown:
		// The client was told; the pumps end when the manager closes the
		// agent connection.
		return nil
	}
	msg, err := g.ExitMessage(proc.Wait())
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		sendErr(err)
		return nil
	}
	b, _ := json.Marshal(msg)
	write(websocket.MessageText, b)
	ws.Close(websocket.StatusNormalClosure, "")
	return nil
}

// streamPing is how often an exec or console stream pings its client.
var streamPing = 30 * time.Second

// keepAlive pings the client of a stream every streamPing and ends the
// stream (cancel) when a pong does not come within write_timeout: the
// client is gone, though its connection may not say so.
func (s *Server) keepAlive(ctx context.Context, cancel context.CancelFunc, ws *websocket.Conn) {
	t := time.NewTicker(streamPing)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		pctx, pcancel := context.WithTimeout(ctx, s.cfg.HTTP.Write())
		err := ws.Ping(pctx)
		pcancel()
		if err != nil {
			if ctx.Err() == nil {
				s.log.Info("exec stream: the client does not answer pings; hanging up", "request_id", requestID(ctx), "err", err)
			}
			cancel()
			return
		}
	}
}

// clientMsg decodes a text message a client sends during an exec. It
// reports false for anything to ignore: bad JSON, unknown types, a signal
// outside 1..64, a terminal size outside 1..9999.
func clientMsg(b []byte) (api.StreamMsg, bool) {
	var m api.StreamMsg
	if json.Unmarshal(b, &m) != nil {
		return m, false
	}
	switch m.Type {
	case api.MsgStdinEOF:
		return m, true
	case api.MsgSignal:
		return m, m.Signal > 0 && m.Signal < 65
	case api.MsgResize:
		return m, m.Rows > 0 && m.Cols > 0 && m.Rows < 10000 && m.Cols < 10000
	}
	return m, false
}
