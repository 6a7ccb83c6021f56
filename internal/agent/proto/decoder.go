package proto

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"time"
)

// deadliner is implemented by transports that support read deadlines
// (*os.File on pollable descriptors, net.Conn).
type deadliner interface {
	SetReadDeadline(t time.Time) error
}

// Decoder reads frames from a byte stream and resynchronises on the sync
// marker after errors.
//
// A Decoder keeps the bytes of the previous frame and of a partly received
// frame in its buffer until they are no longer needed, so that Resync can
// find a sync marker that was swallowed by a frame whose length was cut off
// (for example, the host wrote half a frame, the VM was checkpointed, and
// after the restore a new host's HELLO completed the old frame's payload).
type Decoder struct {
	r   io.Reader
	dl  deadliner
	buf []byte
	// buf[prev:off] is the previous frame, buf[off:end] unread bytes.
	prev, off, end int
	// StallTimeout, when positive and the reader supports read deadlines,
	// bounds how long ReadFrame waits for the rest of a frame once its first
	// byte arrived. On expiry ReadFrame returns ErrStalled without consuming
	// anything.
	StallTimeout time.Duration
	deadlineSet  bool
	err          error
}

// NewDecoder returns a Decoder reading from r.
func NewDecoder(r io.Reader) *Decoder {
	d := &Decoder{r: r, buf: make([]byte, 64<<10)}
	if dl, ok := r.(deadliner); ok {
		d.dl = dl
	}
	return d
}

// Reset discards all buffered bytes, for example after the peer of a
// virtio-serial port went away and a new one will start afresh.
func (d *Decoder) Reset() {
	d.prev, d.off, d.end = 0, 0, 0
	d.err = nil
}

// Buffered returns the number of unread bytes held in the buffer.
func (d *Decoder) Buffered() int { return d.end - d.off }

// fill makes at least n unread bytes available. midFrame says whether a
// frame has begun, which arms the stall timeout.
func (d *Decoder) fill(n int, midFrame bool) error {
	for d.end-d.off < n {
		if d.err != nil {
			err := d.err
			d.err = nil
			return err
		}
		if d.off+n > len(d.buf) {
			d.compact(n)
		}
		stall := midFrame && d.StallTimeout > 0 && d.dl != nil
		if stall {
			_ = d.dl.SetReadDeadline(time.Now().Add(d.StallTimeout))
			d.deadlineSet = true
		} else if d.deadlineSet {
			_ = d.dl.SetReadDeadline(time.Time{})
			d.deadlineSet = false
		}
		m, err := d.r.Read(d.buf[d.end:])
		d.end += m
		if err == nil {
			continue
		}
		if stall && m == 0 && errors.Is(err, os.ErrDeadlineExceeded) {
			// One short grace read: a deadline can fire together with data
			// that arrived while this goroutine was not running.
			_ = d.dl.SetReadDeadline(time.Now().Add(10 * time.Millisecond))
			m, err = d.r.Read(d.buf[d.end:])
			d.end += m
			if m > 0 && (err == nil || errors.Is(err, os.ErrDeadlineExceeded)) {
				continue
			}
			_ = d.dl.SetReadDeadline(time.Time{})
			d.deadlineSet = false
			if err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
				return ErrStalled
			}
		}
		if d.end-d.off >= n {
			d.err = err // report once the bytes we have are used up
			return nil
		}
		if err == io.EOF && d.end > d.off {
			return io.ErrUnexpectedEOF
		}
		return err
	}
	return nil
}

// compact moves the retained bytes (previous frame and unread data) to the
// front of the buffer, growing it so that n unread bytes fit. The previous
// frame is dropped if keeping it would need more than two maximal frames.
func (d *Decoder) compact(n int) {
	const limit = 2*(MaxPayload+HeaderSize) + len(SyncMarker)
	keep := d.prev
	need := d.off - keep + n
	if need > limit {
		keep, need = d.off, n
	}
	if need > len(d.buf) {
		nb := make([]byte, max(min(2*len(d.buf), limit), need))
		copy(nb, d.buf[keep:d.end])
		d.buf = nb
	} else {
		copy(d.buf, d.buf[keep:d.end])
	}
	d.prev -= keep
	d.off -= keep
	d.end -= keep
}

// ReadFrame reads the next frame. On ErrBadFrame or ErrStalled the frame is
// not consumed (a sync marker before it may be); the caller should call
// Resync, which rescans from the previous frame. The returned payload is valid until
// the next call on d.
//
// A sync marker at a frame boundary is skipped: a host may send
// marker+HELLO at any time (for example a re-sent HELLO), and 0x00 is not a
// valid frame type, so it cannot be mistaken for a frame.
func (d *Decoder) ReadFrame() (Frame, error) {
	if err := d.fill(HeaderSize, false); err != nil {
		return Frame{}, err
	}
	if d.buf[d.off] == SyncMarker[0] {
		if err := d.fill(len(SyncMarker), true); err != nil {
			return Frame{}, err
		}
		if string(d.buf[d.off:d.off+len(SyncMarker)]) == SyncMarker {
			d.off += len(SyncMarker)
			if err := d.fill(HeaderSize, true); err != nil {
				return Frame{}, err
			}
		}
	}
	h, err := ParseHeader(d.buf[d.off : d.off+HeaderSize])
	if err != nil {
		return Frame{}, err
	}
	total := HeaderSize + int(h.Length)
	if err := d.fill(total, true); err != nil {
		return Frame{}, err
	}
	f := Frame{Type: h.Type, Flags: h.Flags, Stream: h.Stream,
		Payload: d.buf[d.off+HeaderSize : d.off+total : d.off+total]}
	d.prev = d.off
	d.off += total
	return f, nil
}

// Resync discards bytes up to and including the next sync marker and returns
// how many bytes it skipped. The search starts at the beginning of the
// previous frame, because a marker may hide in a frame that swallowed it.
// Bytes before the marker are lost; Resync blocks until a marker arrives or
// the reader fails.
func (d *Decoder) Resync() (int, error) {
	d.off = d.prev
	skipped := 0
	marker := []byte(SyncMarker)
	for {
		if i := bytes.Index(d.buf[d.off:d.end], marker); i >= 0 {
			d.off += i + len(marker)
			d.prev = d.off
			return skipped + i, nil
		}
		// Keep the last len(marker)-1 bytes: a marker may straddle the end.
		if keep := len(marker) - 1; d.end-d.off > keep {
			skipped += d.end - d.off - keep
			d.off = d.end - keep
		}
		d.prev = d.off
		if err := d.fill(d.end-d.off+1, false); err != nil {
			return skipped, fmt.Errorf("scanning for sync marker: %w", err)
		}
	}
}
