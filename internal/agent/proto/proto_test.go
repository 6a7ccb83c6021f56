package proto

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"testing"
	"testing/iotest"
	"time"
)

func TestHeaderRoundTrip(t *testing.T) {
	frames := []Frame{
		{Type: TypeHello, Payload: []byte(`{"id":"x","version":1}`)},
		{Type: TypeOpen, Stream: 7, Payload: []byte(`{"kind":"ping"}`)},
		{Type: TypeData, Flags: ChanStderr, Stream: 1 << 31, Payload: bytes.Repeat([]byte{0}, MaxPayload)},
		{Type: TypeEOF, Flags: ChanStdout, Stream: 3},
		{Type: TypeWindow, Flags: ChanStdin, Stream: 3, Payload: WindowPayload(12345)},
		{Type: TypeReset, Payload: []byte(`{"error":"x"}`)},
	}
	var stream []byte
	for _, f := range frames {
		stream = append(stream, EncodeFrame(f)...)
	}
	d := NewDecoder(iotest.OneByteReader(bytes.NewReader(stream)))
	for i, want := range frames {
		if want.Type == TypeHello {
			if n, err := d.Resync(); err != nil || n != 0 {
				t.Fatalf("resync: %d %v", n, err)
			}
		}
		got, err := d.ReadFrame()
		if err != nil {
			t.Fatalf("frame %d: %v", i, err)
		}
		if got.Type != want.Type || got.Flags != want.Flags || got.Stream != want.Stream || !bytes.Equal(got.Payload, want.Payload) {
			t.Fatalf("frame %d: got %v want %v", i, got, want)
		}
	}
	if _, err := d.ReadFrame(); err != io.EOF {
		t.Fatalf("at end: %v", err)
	}
}

func TestParseHeaderRejects(t *testing.T) {
	enc := func(typ, flags, r1, r2 byte, stream, length uint32) []byte {
		return []byte{typ, flags, r1, r2, byte(stream >> 24), byte(stream >> 16), byte(stream >> 8), byte(stream),
			byte(length >> 24), byte(length >> 16), byte(length >> 8), byte(length)}
	}
	bad := map[string][]byte{
		"type 0":           enc(0, 0, 0, 0, 1, 0),
		"type 10":          enc(10, 0, 0, 0, 1, 0),
		"reserved":         enc(byte(TypeData), 0, 0, 1, 1, 0),
		"oversize":         enc(byte(TypeData), 0, 0, 0, 1, MaxPayload+1),
		"channel 3":        enc(byte(TypeData), 3, 0, 0, 1, 0),
		"flags on open":    enc(byte(TypeOpen), 1, 0, 0, 1, 0),
		"hello on stream":  enc(byte(TypeHello), 0, 0, 0, 1, 0),
		"open on stream 0": enc(byte(TypeOpen), 0, 0, 0, 0, 0),
		"window length":    enc(byte(TypeWindow), 0, 0, 0, 1, 3),
		"eof payload":      enc(byte(TypeEOF), 0, 0, 0, 1, 1),
		"short":            enc(byte(TypeData), 0, 0, 0, 1, 0)[:11],
	}
	for name, h := range bad {
		if _, err := ParseHeader(h); !errors.Is(err, ErrBadFrame) {
			t.Errorf("%s: err %v, want ErrBadFrame", name, err)
		}
	}
	if _, err := ParseHeader(enc(byte(TypeData), 2, 0, 0, 1, MaxPayload)); err != nil {
		t.Errorf("valid header rejected: %v", err)
	}
}

// A marker between frames (a re-sent HELLO) is skipped transparently.
func TestMarkerBetweenFrames(t *testing.T) {
	var stream []byte
	stream = append(stream, EncodeFrame(Frame{Type: TypeEOF, Stream: 1, Flags: 1})...)
	stream = append(stream, EncodeFrame(Frame{Type: TypeHello, Payload: []byte("{}")})...)
	stream = append(stream, EncodeFrame(Frame{Type: TypeEOF, Stream: 2, Flags: 1})...)
	d := NewDecoder(iotest.OneByteReader(bytes.NewReader(stream)))
	for _, want := range []Type{TypeEOF, TypeHello, TypeEOF} {
		f, err := d.ReadFrame()
		if err != nil || f.Type != want {
			t.Fatalf("got %v %v, want %v", f, err, want)
		}
	}
}

func TestBadFrameConsumesNothing(t *testing.T) {
	stream := append([]byte{0xff, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}, EncodeFrame(Frame{Type: TypeHello, Payload: []byte("{}")})...)
	d := NewDecoder(bytes.NewReader(stream))
	if _, err := d.ReadFrame(); !errors.Is(err, ErrBadFrame) {
		t.Fatalf("want ErrBadFrame, got %v", err)
	}
	n, err := d.Resync()
	if err != nil || n != 13 {
		t.Fatalf("resync skipped %d, %v; want 13", n, err)
	}
	f, err := d.ReadFrame()
	if err != nil || f.Type != TypeHello {
		t.Fatalf("after resync: %v %v", f, err)
	}
}

// A marker swallowed by the previous frame's payload is found by Resync.
func TestResyncLooksIntoPreviousFrame(t *testing.T) {
	hello := EncodeFrame(Frame{Type: TypeHello, Payload: []byte(`{"id":"new"}`)})
	// A DATA header claiming 20 bytes, then only part of it, then a hello:
	// the frame completes with the first bytes of the hello, the rest of the
	// hello is read as the next header.
	for _, cut := range []int{4, 10, 16, 19} {
		old := AppendFrame(nil, Frame{Type: TypeData, Stream: 1, Payload: make([]byte, 20)})[:HeaderSize+20-cut]
		stream := append(append([]byte{}, old...), hello...)
		d := NewDecoder(bytes.NewReader(stream))
		found := false
		for range 4 {
			f, err := d.ReadFrame()
			if errors.Is(err, ErrBadFrame) {
				if _, err := d.Resync(); err != nil {
					t.Fatalf("cut %d: resync: %v", cut, err)
				}
				continue
			}
			if err != nil {
				t.Fatalf("cut %d: %v", cut, err)
			}
			if f.Type == TypeHello {
				found = true
				break
			}
		}
		if !found {
			t.Fatalf("cut %d: hello not found", cut)
		}
	}
}

func TestStallTimeout(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	d := NewDecoder(a)
	d.StallTimeout = 50 * time.Millisecond
	hdr := AppendFrame(nil, Frame{Type: TypeData, Stream: 1, Payload: make([]byte, 100)})
	go func() { _, _ = b.Write(hdr[:HeaderSize+10]) }()
	// Nothing else is written: only the stall timer can end this read. The
	// minute is a guard against a hang, not a speed bound.
	errc := make(chan error, 1)
	go func() { _, err := d.ReadFrame(); errc <- err }()
	select {
	case err := <-errc:
		if !errors.Is(err, ErrStalled) {
			t.Fatalf("want ErrStalled, got %v", err)
		}
	case <-time.After(time.Minute):
		t.Fatal("a half frame was never reported as stalled")
	}
	// Nothing was consumed: the frame completes when the rest arrives.
	go func() { _, _ = b.Write(hdr[HeaderSize+10:]) }()
	f, err := d.ReadFrame()
	if err != nil || f.Type != TypeData || len(f.Payload) != 100 {
		t.Fatalf("after stall: %v %v", f, err)
	}
	// Waiting between frames is not a stall.
	d.StallTimeout = 10 * time.Millisecond
	go func() {
		time.Sleep(100 * time.Millisecond)
		_, _ = b.Write(EncodeFrame(Frame{Type: TypeEOF, Stream: 1, Flags: 1}))
	}()
	if f, err := d.ReadFrame(); err != nil || f.Type != TypeEOF {
		t.Fatalf("idle wait: %v %v", f, err)
	}
}

func TestFrameWriterEpochs(t *testing.T) {
	var buf bytes.Buffer
	fw := NewFrameWriter(&buf)
	old := fw.Bind()
	if err := old.Send(Frame{Type: TypeEOF, Stream: 1}); err != nil {
		t.Fatal(err)
	}
	fw.Advance()
	if err := old.Send(Frame{Type: TypeEOF, Stream: 1}); !errors.Is(err, ErrStale) {
		t.Fatalf("stale sender: %v", err)
	}
	if err := fw.Bind().Send(Frame{Type: TypeHelloAck, Payload: []byte("{}")}); err != nil {
		t.Fatal(err)
	}
	want := append(EncodeFrame(Frame{Type: TypeEOF, Stream: 1}), EncodeFrame(Frame{Type: TypeHelloAck, Payload: []byte("{}")})...)
	if !bytes.Equal(buf.Bytes(), want) {
		t.Fatalf("wire bytes %x, want %x", buf.Bytes(), want)
	}
}

// loopMux connects a host mux and a guest mux through frame dispatch.
type dispatchSender struct{ peer **Mux }

func (d dispatchSender) Send(f Frame) error {
	f.Payload = append([]byte(nil), f.Payload...)
	switch f.Type {
	case TypeData, TypeEOF, TypeWindow:
		return (*d.peer).Dispatch(f)
	}
	return nil
}

func muxPair() (host, guest *Mux) {
	host = NewMux(dispatchSender{&guest}, HostSide)
	guest = NewMux(dispatchSender{&host}, GuestSide)
	return host, guest
}

func TestMuxFlowControl(t *testing.T) {
	host, guest := muxPair()
	hs, _ := host.Open(1)
	gs, _ := guest.Open(1)
	// The guest can send exactly one window before the host reads.
	wrote := make(chan int, 1)
	go func() {
		n, _ := gs.Write(ChanStdout, make([]byte, InitialWindow+1000))
		wrote <- n
	}()
	select {
	case n := <-wrote:
		t.Fatalf("write of more than a window finished (%d) without a reader", n)
	case <-time.After(100 * time.Millisecond):
	}
	// Reading half a window returns credit and unblocks the writer.
	buf := make([]byte, InitialWindow)
	total := 0
	for total < InitialWindow/2 {
		n, err := hs.Read(ChanStdout, buf[:InitialWindow/2-total])
		if err != nil {
			t.Fatal(err)
		}
		total += n
	}
	select {
	case n := <-wrote:
		if n != InitialWindow+1000 {
			t.Fatalf("wrote %d", n)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("writer not unblocked by credit")
	}
	// stdout and stderr share the window, stdin has its own.
	gs2, _ := guest.Open(2)
	hs2, _ := host.Open(2)
	if n, err := hs2.Write(ChanStdin, make([]byte, InitialWindow)); err != nil || n != InitialWindow {
		t.Fatalf("stdin window: %d %v", n, err)
	}
	_ = gs2
	// Abort unblocks a blocked writer.
	go func() { gs2.Abort(errors.New("gone")) }()
	if _, err := gs2.Write(ChanStdout, make([]byte, 2*InitialWindow)); err == nil {
		t.Fatal("write on an aborted stream succeeded")
	}
}

func TestMuxRejectsOverrun(t *testing.T) {
	var sent []Frame
	host := NewMux(senderFunc(func(f Frame) error { sent = append(sent, f); return nil }), HostSide)
	s, _ := host.Open(1)
	if err := host.Dispatch(Frame{Type: TypeData, Flags: ChanStdout, Stream: 1, Payload: make([]byte, InitialWindow)}); err != nil {
		t.Fatal(err)
	}
	if err := host.Dispatch(Frame{Type: TypeData, Flags: ChanStderr, Stream: 1, Payload: []byte{1}}); err != nil {
		t.Fatal(err)
	}
	select {
	case <-s.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("overrun did not abort the stream")
	}
	// Data for unknown streams is ignored.
	if err := host.Dispatch(Frame{Type: TypeData, Flags: ChanStdout, Stream: 99, Payload: []byte{1}}); err != nil {
		t.Fatal(err)
	}
}

type senderFunc func(Frame) error

func (f senderFunc) Send(fr Frame) error { return f(fr) }

func TestMuxCloseFailsEverything(t *testing.T) {
	host, _ := muxPair()
	s, _ := host.Open(1)
	errc := make(chan error, 1)
	go func() { _, err := s.Read(ChanStdout, make([]byte, 1)); errc <- err }()
	host.Close(os.ErrClosed)
	select {
	case err := <-errc:
		if !errors.Is(err, os.ErrClosed) {
			t.Fatalf("read error %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("read not unblocked by Close")
	}
	if _, err := host.Open(2); err == nil {
		t.Fatal("Open after Close succeeded")
	}
}
