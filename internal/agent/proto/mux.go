package proto

import (
	"errors"
	"fmt"
	"io"
	"sync"
)

// Side says which end of a connection a Mux serves; it decides which
// channels a stream sends and which it receives.
type Side int

// The two sides of a connection.
const (
	// HostSide sends stdin (channel 0) and receives stdout and stderr.
	HostSide Side = iota
	// GuestSide sends stdout and stderr and receives stdin.
	GuestSide
)

// ErrStreamClosed is returned by reads and writes on a stream that was
// finished or removed locally.
var ErrStreamClosed = errors.New("stream closed")

// windowKey maps a channel to its flow-control window: stdin has its own,
// stdout and stderr share one (credited with flags=1).
func windowKey(ch uint8) int {
	if ch == ChanStdin {
		return 0
	}
	return 1
}

// Mux multiplexes flow-controlled streams over one connection. It is used by
// both sides: the connection's read loop hands DATA, EOF and WINDOW frames to
// Dispatch, which never blocks, and each stream's consumer and producer block
// only on their own stream.
type Mux struct {
	send   Sender
	side   Side
	window uint32

	mu      sync.Mutex
	streams map[uint32]*Stream
	err     error
	done    chan struct{}
}

// NewMux returns a Mux for one side of a connection, writing through send.
func NewMux(send Sender, side Side) *Mux {
	return &Mux{send: send, side: side, window: InitialWindow,
		streams: make(map[uint32]*Stream), done: make(chan struct{})}
}

// Sender returns the Sender the mux writes through.
func (m *Mux) Sender() Sender { return m.send }

// Done is closed when the mux is closed.
func (m *Mux) Done() <-chan struct{} { return m.done }

// Err returns the error the mux was closed with, or nil while it is open.
func (m *Mux) Err() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.err
}

// Open registers a new stream with the given id. It fails if the id is in
// use or the mux is closed.
func (m *Mux) Open(id uint32) (*Stream, error) {
	if id == 0 {
		return nil, fmt.Errorf("opening stream: id 0 is reserved")
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.err != nil {
		return nil, m.err
	}
	if _, ok := m.streams[id]; ok {
		return nil, fmt.Errorf("opening stream %d: already open", id)
	}
	s := &Stream{id: id, mux: m, done: make(chan struct{})}
	s.cond = sync.NewCond(&s.mu)
	s.credit[m.sendKey()] = int64(m.window)
	m.streams[id] = s
	return s, nil
}

func (m *Mux) sendKey() int {
	if m.side == HostSide {
		return 0
	}
	return 1
}

// receives reports whether this side receives data on channel ch.
func (m *Mux) receives(ch uint8) bool {
	if m.side == HostSide {
		return ch != ChanStdin
	}
	return ch == ChanStdin
}

// Stream returns the open stream with the given id, or nil.
func (m *Mux) Stream(id uint32) *Stream {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.streams[id]
}

// IDs returns the ids of the registered streams, in no order.
func (m *Mux) IDs() []uint32 {
	m.mu.Lock()
	defer m.mu.Unlock()
	ids := make([]uint32, 0, len(m.streams))
	for id := range m.streams {
		ids = append(ids, id)
	}
	return ids
}

// Len returns the number of registered streams.
func (m *Mux) Len() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.streams)
}

// remove unregisters s. Later frames for its id are ignored.
func (m *Mux) remove(s *Stream) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.streams[s.id] == s {
		delete(m.streams, s.id)
	}
}

// Dispatch delivers a DATA, EOF or WINDOW frame to its stream. It never
// blocks on a consumer. Frames for unknown streams are ignored. It returns an
// error only for frame types it does not handle; a peer that overruns its
// window has that stream aborted (and a RESET sent), the connection goes on.
func (m *Mux) Dispatch(f Frame) error {
	switch f.Type {
	case TypeData, TypeEOF, TypeWindow:
	default:
		return fmt.Errorf("mux cannot dispatch %s", f.Type)
	}
	s := m.Stream(f.Stream)
	if s == nil {
		return nil
	}
	switch f.Type {
	case TypeData:
		if !m.receives(f.Flags) {
			go s.Reset(fmt.Errorf("peer sent data on channel %d", f.Flags))
			return nil
		}
		s.deliver(f.Flags, f.Payload)
	case TypeEOF:
		if m.receives(f.Flags) {
			s.deliverEOF(f.Flags)
		}
	case TypeWindow:
		n, err := ParseWindow(f.Payload)
		if err != nil {
			return err
		}
		s.addCredit(f.Flags, n)
	}
	return nil
}

// Close aborts every stream with err and refuses new ones. Close is
// idempotent; the first error wins.
func (m *Mux) Close(err error) {
	if err == nil {
		err = io.ErrClosedPipe
	}
	m.mu.Lock()
	if m.err != nil {
		m.mu.Unlock()
		return
	}
	m.err = err
	streams := m.streams
	m.streams = map[uint32]*Stream{}
	close(m.done)
	m.mu.Unlock()
	for _, s := range streams {
		s.Abort(err)
	}
}

// inbound is a receive buffer for one channel.
type inbound struct {
	buf []byte
	eof bool
}

// Stream is one multiplexed stream. Reads of a channel return data the peer
// sent on it; writes block until the peer has granted window credit.
type Stream struct {
	id   uint32
	mux  *Mux
	done chan struct{}

	mu      sync.Mutex
	cond    *sync.Cond
	in      [3]inbound
	pending [2]int64 // received but not yet consumed, per window
	unacked [2]int64 // consumed but not yet credited back, per window
	credit  [2]int64 // send credit, per window
	wclosed [3]bool  // EOF sent on channel
	err     error    // abort error
}

// ID returns the stream id.
func (s *Stream) ID() uint32 { return s.id }

// Done is closed when the stream is aborted (locally, by a RESET or because
// the connection closed) or finished with Finish.
func (s *Stream) Done() <-chan struct{} { return s.done }

// Err returns the error the stream was aborted with, or nil.
func (s *Stream) Err() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}

func (s *Stream) deliver(ch uint8, p []byte) {
	if len(p) == 0 {
		return
	}
	s.mu.Lock()
	if s.err != nil || s.in[ch].eof {
		s.mu.Unlock()
		return
	}
	k := windowKey(ch)
	if s.pending[k]+int64(len(p)) > int64(s.mux.window) {
		s.mu.Unlock()
		go s.Reset(fmt.Errorf("peer overran the flow-control window on channel %d", ch))
		return
	}
	s.pending[k] += int64(len(p))
	s.in[ch].buf = append(s.in[ch].buf, p...)
	s.mu.Unlock()
	s.cond.Broadcast()
}

func (s *Stream) deliverEOF(ch uint8) {
	s.mu.Lock()
	s.in[ch].eof = true
	s.mu.Unlock()
	s.cond.Broadcast()
}

func (s *Stream) addCredit(ch uint8, n uint32) {
	s.mu.Lock()
	k := windowKey(ch)
	if s.credit[k] < 1<<40 {
		s.credit[k] += int64(n)
	}
	s.mu.Unlock()
	s.cond.Broadcast()
}

// Read reads data received on channel ch. It returns io.EOF after the peer's
// EOF and the abort error after an abort (buffered data is returned first).
// Consumed bytes are credited back to the peer.
func (s *Stream) Read(ch uint8, p []byte) (int, error) {
	if ch > ChanStderr || !s.mux.receives(ch) {
		return 0, fmt.Errorf("stream %d: channel %d is not readable on this side", s.id, ch)
	}
	if len(p) == 0 {
		return 0, nil
	}
	s.mu.Lock()
	in := &s.in[ch]
	for len(in.buf) == 0 && !in.eof && s.err == nil {
		s.cond.Wait()
	}
	if len(in.buf) == 0 {
		err := s.err
		if in.eof {
			err = io.EOF
		}
		s.mu.Unlock()
		return 0, err
	}
	n := copy(p, in.buf)
	in.buf = in.buf[n:]
	if len(in.buf) == 0 {
		in.buf = nil // let a large backing array go
	}
	k := windowKey(ch)
	s.pending[k] -= int64(n)
	var credit int64
	if !in.eof && s.err == nil {
		s.unacked[k] += int64(n)
		if s.unacked[k] >= int64(s.mux.window/2) {
			credit, s.unacked[k] = s.unacked[k], 0
		}
	}
	s.mu.Unlock()
	if credit > 0 {
		// Credit the window of the channel read (1 for stdout and stderr).
		wch := ch
		if k == 1 {
			wch = ChanStdout
		}
		_ = s.mux.send.Send(Frame{Type: TypeWindow, Flags: wch, Stream: s.id, Payload: WindowPayload(uint32(credit))})
	}
	return n, nil
}

// Write sends p as DATA on channel ch, waiting for window credit as needed.
// It returns early with the abort error if the stream is aborted.
func (s *Stream) Write(ch uint8, p []byte) (int, error) {
	if ch > ChanStderr || s.mux.receives(ch) {
		return 0, fmt.Errorf("stream %d: channel %d is not writable on this side", s.id, ch)
	}
	k := windowKey(ch)
	n := 0
	for len(p) > 0 {
		s.mu.Lock()
		for s.credit[k] <= 0 && s.err == nil && !s.wclosed[ch] {
			s.cond.Wait()
		}
		if s.err != nil || s.wclosed[ch] {
			err := s.err
			if err == nil {
				err = ErrStreamClosed
			}
			s.mu.Unlock()
			return n, err
		}
		c := int(min(s.credit[k], int64(len(p)), MaxDataChunk))
		s.credit[k] -= int64(c)
		s.mu.Unlock()
		if err := s.mux.send.Send(Frame{Type: TypeData, Flags: ch, Stream: s.id, Payload: p[:c]}); err != nil {
			return n, err
		}
		n += c
		p = p[c:]
	}
	return n, nil
}

// CloseWrite sends EOF on channel ch. Later writes fail. It is idempotent.
func (s *Stream) CloseWrite(ch uint8) error {
	s.mu.Lock()
	if s.wclosed[ch] || s.err != nil {
		err := s.err
		s.mu.Unlock()
		return err
	}
	s.wclosed[ch] = true
	s.mu.Unlock()
	s.cond.Broadcast()
	return s.mux.send.Send(Frame{Type: TypeEOF, Flags: ch, Stream: s.id})
}

// Send writes a frame of the given type and payload on this stream
// (OPEN, CONTROL, EXIT).
func (s *Stream) Send(t Type, payload []byte) error {
	return s.mux.send.Send(Frame{Type: t, Stream: s.id, Payload: payload})
}

// Abort fails the stream locally with err: blocked and later reads (after
// buffered data) and writes return err, and the stream is unregistered.
// Nothing is sent to the peer. Abort is idempotent; the first error wins.
func (s *Stream) Abort(err error) {
	if err == nil {
		err = ErrStreamClosed
	}
	s.mu.Lock()
	if s.err != nil {
		s.mu.Unlock()
		return
	}
	s.err = err
	close(s.done)
	s.mu.Unlock()
	s.cond.Broadcast()
	s.mux.remove(s)
}

// Reset aborts the stream locally and sends a RESET frame carrying err to
// the peer.
func (s *Stream) Reset(err error) {
	if err == nil {
		err = ErrStreamClosed
	}
	s.mu.Lock()
	already := s.err != nil
	s.mu.Unlock()
	s.Abort(err)
	if !already {
		_ = s.Send(TypeReset, Marshal(Reset{Error: err.Error()}))
	}
}

// Finish unregisters the stream after its last frame (EXIT). Buffered input
// stays readable; further peer frames for its id are ignored.
func (s *Stream) Finish() {
	s.mux.remove(s)
}

// Reader returns an io.Reader for channel ch.
func (s *Stream) Reader(ch uint8) io.Reader { return chanReader{s, ch} }

// Writer returns an io.WriteCloser for channel ch; Close sends EOF.
func (s *Stream) Writer(ch uint8) io.WriteCloser { return chanWriter{s, ch} }

type chanReader struct {
	s  *Stream
	ch uint8
}

func (r chanReader) Read(p []byte) (int, error) { return r.s.Read(r.ch, p) }

type chanWriter struct {
	s  *Stream
	ch uint8
}

func (w chanWriter) Write(p []byte) (int, error) { return w.s.Write(w.ch, p) }
func (w chanWriter) Close() error                { return w.s.CloseWrite(w.ch) }
