package guest

import (
	"fmt"
	"sync"

	"github.com/noid-vm/noid/internal/agent/proto"
)

// session is the state of one host connection: its streams and handlers.
type session struct {
	a    *Agent
	id   string
	n    uint64
	t    *transport
	send proto.Sender
	mux  *proto.Mux

	mu       sync.Mutex
	handlers map[uint32]*handler
	closed   bool
}

// handler is the agent side of one open stream.
type handler struct {
	st *proto.Stream
	// ctl receives CONTROL frames in order; buffered so the read loop never
	// blocks on it.
	ctl chan proto.Control
	// hangup, if set, is called when the session is dropped or the host
	// resets the stream (exec: SIGHUP to the process group). dead records
	// that this happened, for a hangup registered afterwards.
	mu     sync.Mutex
	hangup func()
	dead   bool
}

// setHangup registers f, calling it at once if the stream is already dead.
func (h *handler) setHangup(f func()) {
	h.mu.Lock()
	h.hangup = f
	dead := h.dead
	h.mu.Unlock()
	if dead {
		f()
	}
}

// doHangup marks the stream dead and runs the registered hangup, if any.
func (h *handler) doHangup() {
	h.mu.Lock()
	h.dead = true
	f := h.hangup
	h.mu.Unlock()
	if f != nil {
		f()
	}
}

func (s *session) isClosed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed
}

// close drops the session: every stream is aborted and every process gets
// SIGHUP. It is idempotent.
func (s *session) close(cause error) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return
	}
	s.closed = true
	hs := s.handlers
	s.handlers = map[uint32]*handler{}
	s.mu.Unlock()
	for _, h := range hs {
		h.doHangup()
	}
	s.mux.Close(cause)
	if len(hs) > 0 {
		s.a.log.Info("dropped streams of the previous host connection", "session", s.n, "streams", len(hs))
	}
}

func (s *session) removeHandler(id uint32) {
	s.mu.Lock()
	delete(s.handlers, id)
	s.mu.Unlock()
}

func (s *session) handler(id uint32) *handler {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.handlers[id]
}

// handle processes one frame from the host. It never blocks on a stream.
func (s *session) handle(f proto.Frame) {
	switch f.Type {
	case proto.TypeData, proto.TypeEOF, proto.TypeWindow:
		_ = s.mux.Dispatch(f)
	case proto.TypeOpen:
		s.open(f)
	case proto.TypeControl:
		h := s.handler(f.Stream)
		if h == nil {
			return
		}
		var c proto.Control
		if err := proto.Unmarshal(f.Payload, &c); err != nil {
			s.a.log.Warn("ignoring malformed CONTROL", "stream", f.Stream)
			return
		}
		select {
		case h.ctl <- c:
		default:
			s.a.log.Warn("dropping CONTROL: too many pending", "stream", f.Stream)
		}
	case proto.TypeReset:
		h := s.handler(f.Stream)
		if h == nil {
			return
		}
		var r proto.Reset
		_ = proto.Unmarshal(f.Payload, &r)
		s.removeHandler(f.Stream)
		h.doHangup()
		h.st.Abort(fmt.Errorf("host reset the stream: %s", r.Error))
	default:
		s.a.log.Debug("ignoring unexpected frame", "frame", f.String())
	}
}

// open starts the service for an OPEN frame in its own goroutine.
func (s *session) open(f proto.Frame) {
	var o proto.Open
	perr := proto.Unmarshal(f.Payload, &o)
	st, err := s.mux.Open(f.Stream)
	if err != nil {
		// Duplicate id or closed session: answer on the wire only.
		_ = s.send.Send(proto.Frame{Type: proto.TypeReset, Stream: f.Stream,
			Payload: proto.Marshal(proto.Reset{Error: err.Error()})})
		return
	}
	h := &handler{st: st, ctl: make(chan proto.Control, 32)}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		st.Abort(proto.ErrStale)
		return
	}
	s.handlers[f.Stream] = h
	s.mu.Unlock()
	if perr != nil {
		s.finish(h, proto.Exit{Code: -1, Error: fmt.Sprintf("bad OPEN: %v", perr)})
		return
	}
	switch o.Kind {
	case proto.KindExec, proto.KindConsole:
		if o.Exec == nil {
			s.finish(h, proto.Exit{Code: -1, Error: o.Kind + ": missing request"})
			return
		}
		go s.runExec(h, *o.Exec, o.Kind == proto.KindConsole)
	case proto.KindSync:
		if o.Sync == nil {
			s.finish(h, proto.Exit{Code: -1, Error: "sync: missing request"})
			return
		}
		go s.runSync(h, *o.Sync)
	case proto.KindInfo:
		go s.finish(h, s.result(s.info()))
	case proto.KindPing:
		// Streams stay in the mux until their EXIT is sent, so a stream
		// missing here was never opened on this connection or is done.
		go s.finish(h, s.result(proto.PingResult{Streams: s.mux.IDs()}))
	case proto.KindPut:
		if o.Put == nil {
			s.finish(h, proto.Exit{Code: -1, Error: "put: missing request"})
			return
		}
		go s.runPut(h, *o.Put)
	case proto.KindGet:
		if o.Get == nil {
			s.finish(h, proto.Exit{Code: -1, Error: "get: missing request"})
			return
		}
		go s.runGet(h, *o.Get)
	default:
		s.finish(h, proto.Exit{Code: -1, Error: fmt.Sprintf("unknown stream kind %q", o.Kind)})
	}
}

// result wraps a unary reply into a successful EXIT.
func (s *session) result(v any) proto.Exit {
	return proto.Exit{Result: proto.Marshal(v)}
}

// finish sends the stream's EXIT (its last frame) and forgets the stream.
func (s *session) finish(h *handler, e proto.Exit) {
	s.removeHandler(h.st.ID())
	select {
	case <-h.st.Done():
		return // reset by the host or dropped with the session
	default:
	}
	if err := h.st.Send(proto.TypeExit, proto.Marshal(e)); err != nil {
		s.a.log.Debug("cannot send EXIT", "stream", h.st.ID(), "err", err)
	}
	h.st.Abort(proto.ErrStreamClosed)
}
