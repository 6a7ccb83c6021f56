package proto

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sync"
)

// SyncMarker precedes every HELLO and HELLO_ACK frame. A receiver that lost
// track of frame boundaries scans the byte stream for it.
const SyncMarker = "\x00NOID-SYNC\xfe\x5a\xa5\x17\x42\x00"

// Sizes and limits of the framing.
const (
	// HeaderSize is the length of a frame header in bytes.
	HeaderSize = 12
	// MaxPayload is the largest payload a frame may carry.
	MaxPayload = 1 << 20
	// MaxDataChunk is the largest DATA payload this implementation sends.
	// Receivers accept up to MaxPayload.
	MaxDataChunk = 256 << 10
	// InitialWindow is the flow-control credit each direction of a stream
	// starts with, in bytes.
	InitialWindow = 1 << 20
	// Version is the protocol version carried in HELLO and HELLO_ACK.
	Version = 1
)

// Type is a frame type.
type Type uint8

// Frame types. See docs/agent-protocol.md for their meaning.
const (
	TypeHello    Type = 1
	TypeHelloAck Type = 2
	TypeOpen     Type = 3
	TypeData     Type = 4
	TypeEOF      Type = 5
	TypeWindow   Type = 6
	TypeControl  Type = 7
	TypeExit     Type = 8
	TypeReset    Type = 9
)

var typeNames = [...]string{"", "HELLO", "HELLO_ACK", "OPEN", "DATA", "EOF", "WINDOW", "CONTROL", "EXIT", "RESET"}

// String returns the frame type's protocol name.
func (t Type) String() string {
	if t.Valid() {
		return typeNames[t]
	}
	return fmt.Sprintf("TYPE(%d)", uint8(t))
}

// Valid reports whether t is a known frame type.
func (t Type) Valid() bool { return t >= TypeHello && t <= TypeReset }

// Channel numbers carried in the flags of DATA, EOF and WINDOW frames.
const (
	ChanStdin  uint8 = 0
	ChanStdout uint8 = 1
	ChanStderr uint8 = 2
)

// Errors returned by the framing layer.
var (
	// ErrBadFrame means a header was malformed: unknown type, non-zero
	// reserved field, bad channel or oversized length. The receiver must
	// resynchronise on the next sync marker.
	ErrBadFrame = errors.New("malformed frame")
	// ErrStalled means a frame started but its remaining bytes did not arrive
	// within the decoder's stall timeout, which happens after a snapshot
	// restore cut a frame in half.
	ErrStalled = errors.New("frame stalled mid-way")
)

// Frame is one protocol frame.
type Frame struct {
	// Type is the frame type.
	Type Type
	// Flags holds the channel number for DATA, EOF and WINDOW; 0 otherwise.
	Flags uint8
	// Stream is the stream id, 0 for connection-level frames.
	Stream uint32
	// Payload is the frame body. Frames returned by a Decoder share its
	// buffer: the payload is valid only until the next call.
	Payload []byte
}

// String describes the frame without its payload.
func (f Frame) String() string {
	return fmt.Sprintf("%s stream=%d flags=%d len=%d", f.Type, f.Stream, f.Flags, len(f.Payload))
}

// Header is a decoded frame header.
type Header struct {
	// Type is the frame type.
	Type Type
	// Flags is the channel for DATA, EOF and WINDOW, else 0.
	Flags uint8
	// Stream is the stream id.
	Stream uint32
	// Length is the payload length.
	Length uint32
}

// ParseHeader decodes and validates a 12-byte frame header.
func ParseHeader(b []byte) (Header, error) {
	if len(b) < HeaderSize {
		return Header{}, fmt.Errorf("%w: short header (%d bytes)", ErrBadFrame, len(b))
	}
	h := Header{
		Type:   Type(b[0]),
		Flags:  b[1],
		Stream: binary.BigEndian.Uint32(b[4:8]),
		Length: binary.BigEndian.Uint32(b[8:12]),
	}
	switch {
	case !h.Type.Valid():
		return h, fmt.Errorf("%w: unknown type %d", ErrBadFrame, b[0])
	case b[2] != 0 || b[3] != 0:
		return h, fmt.Errorf("%w: reserved field is %#x", ErrBadFrame, binary.BigEndian.Uint16(b[2:4]))
	case h.Length > MaxPayload:
		return h, fmt.Errorf("%w: length %d exceeds %d", ErrBadFrame, h.Length, MaxPayload)
	}
	switch h.Type {
	case TypeData, TypeEOF, TypeWindow:
		if h.Flags > ChanStderr {
			return h, fmt.Errorf("%w: channel %d", ErrBadFrame, h.Flags)
		}
	default:
		if h.Flags != 0 {
			return h, fmt.Errorf("%w: flags %#x on %s", ErrBadFrame, h.Flags, h.Type)
		}
	}
	switch h.Type {
	case TypeHello, TypeHelloAck:
		if h.Stream != 0 {
			return h, fmt.Errorf("%w: %s on stream %d", ErrBadFrame, h.Type, h.Stream)
		}
	case TypeOpen, TypeData, TypeEOF, TypeControl, TypeExit:
		if h.Stream == 0 {
			return h, fmt.Errorf("%w: %s on stream 0", ErrBadFrame, h.Type)
		}
	}
	if h.Type == TypeWindow && h.Length != 4 {
		return h, fmt.Errorf("%w: WINDOW payload of %d bytes", ErrBadFrame, h.Length)
	}
	if h.Type == TypeEOF && h.Length != 0 {
		return h, fmt.Errorf("%w: EOF payload of %d bytes", ErrBadFrame, h.Length)
	}
	return h, nil
}

// AppendFrame appends the encoding of f (header and payload, no marker) to b.
// It panics if the payload exceeds MaxPayload, which is a programming error.
func AppendFrame(b []byte, f Frame) []byte {
	if len(f.Payload) > MaxPayload {
		panic(fmt.Sprintf("proto: payload of %d bytes exceeds MaxPayload", len(f.Payload)))
	}
	var h [HeaderSize]byte
	h[0] = byte(f.Type)
	h[1] = f.Flags
	binary.BigEndian.PutUint32(h[4:8], f.Stream)
	binary.BigEndian.PutUint32(h[8:12], uint32(len(f.Payload)))
	b = append(b, h[:]...)
	return append(b, f.Payload...)
}

// EncodeFrame returns the encoding of f, preceded by SyncMarker when f is a
// HELLO or HELLO_ACK.
func EncodeFrame(f Frame) []byte {
	var b []byte
	if f.Type == TypeHello || f.Type == TypeHelloAck {
		b = append(b, SyncMarker...)
	}
	return AppendFrame(b, f)
}

// WindowPayload encodes a WINDOW credit increment.
func WindowPayload(n uint32) []byte {
	return binary.BigEndian.AppendUint32(nil, n)
}

// ParseWindow decodes a WINDOW payload.
func ParseWindow(p []byte) (uint32, error) {
	if len(p) != 4 {
		return 0, fmt.Errorf("%w: WINDOW payload of %d bytes", ErrBadFrame, len(p))
	}
	return binary.BigEndian.Uint32(p), nil
}

// Sender writes whole frames. Implementations are safe for concurrent use and
// never interleave two frames.
type Sender interface {
	Send(f Frame) error
}

// ErrStale is returned by a bound Sender after its FrameWriter moved on to a
// new epoch (a new host connection replaced the old one).
var ErrStale = errors.New("connection replaced by a newer one")

// FrameWriter serialises frames onto a byte stream. Each frame (with its sync
// marker, for HELLO and HELLO_ACK) is written with a single Write call under
// a mutex, so frames from concurrent senders never interleave.
//
// A FrameWriter has an epoch. Senders returned by Bind write only while the
// epoch they were bound to is current; Advance starts a new epoch, so the
// writers of an abandoned connection stop reaching the wire.
type FrameWriter struct {
	mu    sync.Mutex
	w     io.Writer
	buf   []byte
	epoch uint64
	err   error
}

// NewFrameWriter returns a FrameWriter writing to w.
func NewFrameWriter(w io.Writer) *FrameWriter { return &FrameWriter{w: w} }

// Send writes f regardless of epoch. A write error is sticky: every later
// Send returns it.
func (fw *FrameWriter) Send(f Frame) error {
	fw.mu.Lock()
	defer fw.mu.Unlock()
	return fw.sendLocked(f)
}

func (fw *FrameWriter) sendLocked(f Frame) error {
	if fw.err != nil {
		return fw.err
	}
	b := fw.buf[:0]
	if f.Type == TypeHello || f.Type == TypeHelloAck {
		b = append(b, SyncMarker...)
	}
	b = AppendFrame(b, f)
	_, err := fw.w.Write(b)
	if cap(b) <= 2*MaxDataChunk {
		fw.buf = b[:0]
	}
	if err != nil {
		fw.err = fmt.Errorf("writing %s frame: %w", f.Type, err)
		return fw.err
	}
	return nil
}

// Advance starts a new epoch and returns it. Senders bound to earlier epochs
// fail with ErrStale from now on; a frame already being written completes.
// Advance also clears a sticky write error, for transports such as a
// virtio-serial port that stay usable after a peer went away.
func (fw *FrameWriter) Advance() uint64 {
	fw.mu.Lock()
	defer fw.mu.Unlock()
	fw.epoch++
	fw.err = nil
	return fw.epoch
}

// Bind returns a Sender that writes through fw only while fw is still in the
// current epoch.
func (fw *FrameWriter) Bind() Sender {
	fw.mu.Lock()
	defer fw.mu.Unlock()
	return &boundSender{fw: fw, epoch: fw.epoch}
}

type boundSender struct {
	fw    *FrameWriter
	epoch uint64
}

func (b *boundSender) Send(f Frame) error {
	b.fw.mu.Lock()
	defer b.fw.mu.Unlock()
	if b.fw.epoch != b.epoch {
		return ErrStale
	}
	return b.fw.sendLocked(f)
}
