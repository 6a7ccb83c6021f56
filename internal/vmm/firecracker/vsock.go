package firecracker

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/noid-vm/noid/internal/errdefs"
)

// DefaultHandshakeTimeout bounds the CONNECT handshake of DialVsock when ctx
// has no earlier deadline.
const DefaultHandshakeTimeout = 5 * time.Second

// ErrVsockHandshake is wrapped by every DialVsock error that happens after
// the unix socket connected: Firecracker (or the guest) did not accept the
// connection to the guest port. It also wraps errdefs.ErrUnavailable, so the
// caller can treat it as "agent not reachable yet" and retry.
var ErrVsockHandshake = fmt.Errorf("vsock handshake failed: %w", errdefs.ErrUnavailable)

// maxReplyLine bounds Firecracker's "OK <port>\n" reply.
const maxReplyLine = 32

// DialVsock opens a stream to port on the guest behind Firecracker's vsock
// unix socket udsPath. Firecracker's host side of virtio-vsock is that unix
// socket: the host connects, writes "CONNECT <port>\n", and Firecracker
// answers "OK <host port>\n" once the guest accepted, or closes the
// connection if nothing listens on the port. After the OK line the
// connection is a plain byte stream to the guest.
//
// The handshake is bounded by ctx and by DefaultHandshakeTimeout; the
// returned connection has no deadline. The reply is read one byte at a
// time, so no guest data that follows the OK line is lost.
func DialVsock(ctx context.Context, udsPath string, port uint32) (net.Conn, error) {
	conn, err := dialUnix(ctx, udsPath)
	if err != nil {
		return nil, fmt.Errorf("dialing guest vsock port %d via %s: %w", port, udsPath, err)
	}
	fail := func(cause error, format string, args ...any) (net.Conn, error) {
		conn.Close()
		msg := fmt.Sprintf(format, args...)
		if cause != nil {
			return nil, fmt.Errorf("dialing guest vsock port %d via %s: %s: %w: %w",
				port, udsPath, msg, ErrVsockHandshake, cause)
		}
		return nil, fmt.Errorf("dialing guest vsock port %d via %s: %s: %w",
			port, udsPath, msg, ErrVsockHandshake)
	}

	deadline := time.Now().Add(DefaultHandshakeTimeout)
	ctxDeadline := false
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline, ctxDeadline = d, true
	}
	handshakeErr := func(err error) error {
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			return err
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if ctxDeadline {
			return context.DeadlineExceeded
		}
		return fmt.Errorf("no answer in time (%v): %w", DefaultHandshakeTimeout, err)
	}
	conn.SetDeadline(deadline)
	// Unblock the handshake at once if ctx is cancelled.
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()

	if _, err := fmt.Fprintf(conn, "CONNECT %d\n", port); err != nil {
		return fail(handshakeErr(err), "sending CONNECT")
	}
	line, err := readLine(conn, maxReplyLine)
	if err != nil {
		switch {
		case errors.Is(err, io.EOF) && line == "":
			return fail(nil, "firecracker closed the connection without answering "+
				"(no guest listener on the port, or the guest's vsock driver is not up)")
		case errors.Is(err, errLineTooLong):
			return fail(nil, "reply %q... is not an OK line", line)
		default:
			return fail(handshakeErr(err), "reading the reply (got %q so far)", line)
		}
	}
	rest, ok := strings.CutPrefix(line, "OK ")
	if !ok {
		return fail(nil, "unexpected reply %q, want \"OK <port>\"", line)
	}
	if _, err := strconv.ParseUint(rest, 10, 32); err != nil {
		return fail(nil, "unexpected reply %q, want \"OK <port>\"", line)
	}
	if !stop() && ctx.Err() != nil {
		return fail(ctx.Err(), "cancelled")
	}
	conn.SetDeadline(time.Time{})
	return conn, nil
}

var errLineTooLong = errors.New("line too long")

// readLine reads up to and excluding '\n', one byte at a time.
func readLine(r io.Reader, max int) (string, error) {
	var b strings.Builder
	buf := make([]byte, 1)
	for {
		n, err := r.Read(buf)
		if n == 1 {
			if buf[0] == '\n' {
				return b.String(), nil
			}
			if b.Len() >= max {
				return b.String(), errLineTooLong
			}
			b.WriteByte(buf[0])
			continue
		}
		if err != nil {
			return b.String(), err
		}
	}
}
