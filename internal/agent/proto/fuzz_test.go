package proto

import (
	"bytes"
	"errors"
	"io"
	"testing"
)

// FuzzDecodeFrame feeds arbitrary bytes to the decoder the way the agent
// reads them: frames, and a resync after every malformed one. The decoder
// must never panic, must never return a frame that violates the limits,
// and every frame it returns must re-encode to exactly the bytes it came
// from.
func FuzzDecodeFrame(f *testing.F) {
	f.Add([]byte{})
	f.Add(EncodeFrame(Frame{Type: TypeHello, Payload: []byte(`{"id":"a","version":1}`)}))
	f.Add(EncodeFrame(Frame{Type: TypeData, Flags: 1, Stream: 3, Payload: []byte("hello")}))
	f.Add(append(EncodeFrame(Frame{Type: TypeWindow, Stream: 3, Payload: WindowPayload(7)}), 0xff, 0, 0))
	f.Add([]byte(SyncMarker + SyncMarker + "\x04\x01\x00\x00\x00\x00\x00\x01\x00\x00\x00\x02hi"))
	f.Fuzz(func(t *testing.T, data []byte) {
		d := NewDecoder(bytes.NewReader(data))
		for range 1000 {
			start := d.off
			fr, err := d.ReadFrame()
			if err != nil {
				if errors.Is(err, ErrBadFrame) {
					if _, err := d.Resync(); err != nil {
						return
					}
					continue
				}
				if err == io.EOF || err == io.ErrUnexpectedEOF {
					return
				}
				t.Fatalf("unexpected error %v", err)
			}
			if len(fr.Payload) > MaxPayload || !fr.Type.Valid() {
				t.Fatalf("frame out of limits: %v", fr)
			}
			enc := AppendFrame(nil, fr)
			got := bytes.TrimPrefix(d.buf[start:d.off], []byte(SyncMarker))
			if !bytes.Equal(enc, got) {
				t.Fatalf("re-encoding differs:\n got %x\nwant %x", enc, got)
			}
		}
	})
}

// FuzzResync puts arbitrary garbage (the remains of an old connection)
// before a marker and a HELLO and runs the agent's scanning loop: it must
// always find that HELLO, however the garbage ends (half frames included).
// A frame that cannot complete is treated like a stalled one.
func FuzzResync(f *testing.F) {
	hdr := func(t Type, length uint32) []byte {
		return AppendFrame(nil, Frame{Type: t, Stream: 1, Payload: make([]byte, length)})[:HeaderSize]
	}
	f.Add([]byte{}, []byte("id1"))
	f.Add([]byte("random garbage"), []byte("x"))
	f.Add(append([]byte(SyncMarker), hdr(TypeData, 1000)...), []byte("swallowed"))
	f.Add(append([]byte(SyncMarker), hdr(TypeHello, 20)...), []byte("hello-eats-hello"))
	f.Add(append([]byte(SyncMarker), hdr(TypeData, 5)...), []byte("short"))
	f.Add([]byte(SyncMarker[:7]), []byte("partial marker"))
	f.Add(EncodeFrame(Frame{Type: TypeHello, Payload: []byte(`{"id":"old"}`)}), []byte("new"))
	f.Fuzz(func(t *testing.T, garbage, id []byte) {
		want := append([]byte(`{"id":"`), bytes.ReplaceAll(id, []byte(`"`), nil)...)
		want = append(want, `"}`...)
		stream := append(append([]byte{}, garbage...), EncodeFrame(Frame{Type: TypeHello, Payload: want})...)
		d := NewDecoder(bytes.NewReader(stream))
		scanning := true
		for range 10000 {
			var fr Frame
			var err error
			if scanning {
				if _, err = d.Resync(); err != nil {
					t.Fatalf("marker not found: %v", err)
				}
			}
			fr, err = d.ReadFrame()
			switch {
			case err == nil:
			case errors.Is(err, ErrBadFrame), err == io.ErrUnexpectedEOF:
				scanning = true
				continue
			default:
				t.Fatalf("hello not found: %v", err)
			}
			if fr.Type == TypeHello && bytes.Equal(fr.Payload, want) {
				return
			}
			scanning = scanning && fr.Type != TypeHello
		}
		t.Fatal("loop did not terminate")
	})
}
