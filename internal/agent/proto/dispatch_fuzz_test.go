package proto

import (
	"bytes"
	"errors"
	"io"
	"testing"
)

type discard struct{}

func (discard) Send(Frame) error { return nil }

// FuzzHostDispatch plays arbitrary bytes, as a malicious guest would send
// them, into the host side: the decoder (with resync after bad frames) and
// the stream multiplexer with a few open streams. Nothing may panic or
// block, and a stream never buffers more than its flow-control window.
func FuzzHostDispatch(f *testing.F) {
	f.Add(EncodeFrame(Frame{Type: TypeData, Flags: ChanStdout, Stream: 1, Payload: []byte("out")}))
	f.Add(append(EncodeFrame(Frame{Type: TypeData, Flags: ChanStdin, Stream: 2, Payload: []byte("x")}),
		EncodeFrame(Frame{Type: TypeEOF, Flags: ChanStderr, Stream: 2})...))
	f.Add(EncodeFrame(Frame{Type: TypeWindow, Flags: ChanStdin, Stream: 3, Payload: WindowPayload(1 << 31)}))
	f.Add(EncodeFrame(Frame{Type: TypeData, Flags: ChanStderr, Stream: 9, Payload: []byte("unknown stream")}))
	f.Add([]byte("garbage" + SyncMarker))
	f.Fuzz(func(t *testing.T, data []byte) {
		m := NewMux(discard{}, HostSide)
		var streams []*Stream
		for id := uint32(1); id <= 3; id++ {
			s, err := m.Open(id)
			if err != nil {
				t.Fatal(err)
			}
			streams = append(streams, s)
		}
		d := NewDecoder(bytes.NewReader(data))
		for range 1000 {
			fr, err := d.ReadFrame()
			if errors.Is(err, ErrBadFrame) {
				if _, err := d.Resync(); err != nil {
					break
				}
				continue
			}
			if err == io.EOF || err == io.ErrUnexpectedEOF {
				break
			}
			if err != nil {
				t.Fatalf("decoder: %v", err)
			}
			switch fr.Type {
			case TypeData, TypeEOF, TypeWindow:
				if err := m.Dispatch(fr); err != nil && fr.Type != TypeWindow {
					t.Fatalf("dispatch %v: %v", fr, err)
				}
			default:
				if m.Dispatch(fr) == nil {
					t.Fatalf("dispatch accepted %v", fr)
				}
			}
		}
		for _, s := range streams {
			s.mu.Lock()
			for k, p := range s.pending {
				if p > int64(m.window) {
					t.Fatalf("stream %d buffers %d bytes on window %d", s.id, p, k)
				}
			}
			s.mu.Unlock()
		}
		m.Close(nil)
	})
}
