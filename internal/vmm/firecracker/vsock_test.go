package firecracker

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/noid-vm/noid/internal/errdefs"
)

// vsockPeer is a real unix-socket listener playing Firecracker's side of the
// vsock handshake: it reads the CONNECT line, hands it to reply, and the
// connection to after (if the handshake succeeded).
type vsockPeer struct {
	path  string
	lines chan string
}

func startPeer(t *testing.T, dir string, reply func(c net.Conn, line string)) *vsockPeer {
	t.Helper()
	p := &vsockPeer{path: filepath.Join(dir, "v.sock"), lines: make(chan string, 16)}
	ln, err := net.Listen("unix", p.path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				line, err := bufio.NewReader(io.LimitReader(c, 64)).ReadString('\n')
				if err != nil {
					p.lines <- "ERR " + err.Error()
					return
				}
				p.lines <- line
				reply(c, line)
			}()
		}
	}()
	return p
}

func TestDialVsockHandshake(t *testing.T) {
	peer := startPeer(t, t.TempDir(), func(c net.Conn, line string) {
		// The OK line and the guest's first bytes arrive in one write: the
		// client must not swallow the bytes after the newline.
		c.Write([]byte("OK 1073741824\nhello from the guest\n"))
		buf := make([]byte, 5)
		if _, err := io.ReadFull(c, buf); err == nil {
			c.Write(buf) // echo what the host sends next
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	conn, err := DialVsock(ctx, peer.path, 1024)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if got := <-peer.lines; got != "CONNECT 1024\n" {
		t.Fatalf("peer read %q, want \"CONNECT 1024\\n\"", got)
	}
	r := bufio.NewReader(conn)
	first, err := r.ReadString('\n')
	if err != nil || first != "hello from the guest\n" {
		t.Fatalf("guest data after OK: %q %v", first, err)
	}
	conn.Write([]byte("ping!"))
	echo := make([]byte, 5)
	if _, err := io.ReadFull(r, echo); err != nil || string(echo) != "ping!" {
		t.Fatalf("echo %q %v", echo, err)
	}
}

// holdUntilEnd returns a channel closed when t ends: a peer that waits on
// it stays silent (and its connection open) for the rest of the test.
func holdUntilEnd(t *testing.T) <-chan struct{} {
	hold := make(chan struct{})
	t.Cleanup(func() { close(hold) })
	return hold
}

// TestDialVsockNoDeadlineLeftOnConn: the deadline the handshake set from
// ctx is cleared on the returned conn, so a read after it has passed
// succeeds. The peer writes its next line only once that deadline has
// passed, so the order does not depend on the machine's load.
func TestDialVsockNoDeadlineLeftOnConn(t *testing.T) {
	passed := make(chan struct{})
	hold := holdUntilEnd(t)
	peer := startPeer(t, t.TempDir(), func(c net.Conn, line string) {
		c.Write([]byte("OK 5\n"))
		select {
		case <-passed:
			c.Write([]byte("late\n"))
		case <-hold:
		}
	})
	// A short deadline keeps the test short. If a loaded machine makes the
	// handshake itself miss it, that is not what this test is about: try
	// again with a longer one.
	var conn net.Conn
	var ctx context.Context
	for d := 100 * time.Millisecond; conn == nil; d *= 2 {
		c, cancel := context.WithTimeout(context.Background(), d)
		defer cancel()
		var err error
		if conn, err = DialVsock(c, peer.path, 52); err != nil {
			if !errors.Is(err, context.DeadlineExceeded) || d >= 10*time.Second {
				t.Fatal(err)
			}
			t.Logf("the handshake missed a %v deadline, retrying with a longer one: %v", d, err)
		}
		ctx = c
	}
	defer conn.Close()
	<-ctx.Done()
	close(passed)
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil || line != "late\n" {
		t.Fatalf("read after handshake: %q %v", line, err)
	}
	if got := <-peer.lines; got != "CONNECT 52\n" {
		t.Fatalf("peer read %q", got)
	}
}

// TestDialVsockFailures: each broken peer gives its own error. The silent
// peer stays silent until the test ends, so only ctx's deadline can end
// that handshake (DeadlineExceeded, not DefaultHandshakeTimeout's error).
func TestDialVsockFailures(t *testing.T) {
	hold := holdUntilEnd(t)
	cases := []struct {
		name  string
		reply func(c net.Conn, line string)
		ctx   time.Duration
		want  string
		is    error
	}{
		{"closed without OK (no guest listener)", func(c net.Conn, _ string) {}, 2 * time.Second,
			"closed the connection without answering", nil},
		{"garbage reply", func(c net.Conn, _ string) { c.Write([]byte("HTTP/1.1 400 Bad Request\n")) }, 2 * time.Second,
			"unexpected reply", nil},
		{"OK without a port", func(c net.Conn, _ string) { c.Write([]byte("OK\n")) }, 2 * time.Second,
			"unexpected reply", nil},
		{"OK with a bad port", func(c net.Conn, _ string) { c.Write([]byte("OK x12\n")) }, 2 * time.Second,
			"unexpected reply", nil},
		{"partial line then close", func(c net.Conn, _ string) { c.Write([]byte("OK 10")) }, 2 * time.Second,
			"got \"OK 10\" so far", io.EOF},
		{"endless line", func(c net.Conn, _ string) { c.Write([]byte(strings.Repeat("A", 4096))) }, 2 * time.Second,
			"is not an OK line", nil},
		{"silence (timeout)", func(c net.Conn, _ string) { <-hold }, 150 * time.Millisecond,
			"reading the reply", context.DeadlineExceeded},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			peer := startPeer(t, t.TempDir(), tc.reply)
			ctx, cancel := context.WithTimeout(context.Background(), tc.ctx)
			defer cancel()
			conn, err := DialVsock(ctx, peer.path, 1024)
			if err == nil {
				conn.Close()
				t.Fatal("handshake succeeded")
			}
			t.Logf("%v", err)
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %q does not contain %q", err, tc.want)
			}
			if !errors.Is(err, ErrVsockHandshake) || !errors.Is(err, errdefs.ErrUnavailable) {
				t.Fatalf("error does not wrap ErrVsockHandshake and ErrUnavailable: %v", err)
			}
			if tc.is != nil && !errors.Is(err, tc.is) {
				t.Fatalf("error does not wrap %v: %v", tc.is, err)
			}
		})
	}
}

// TestDialVsockCancelledDuringHandshake: cancelling ctx while the peer is
// silent (it stays so until the test ends) ends the handshake at once,
// with context.Canceled.
func TestDialVsockCancelledDuringHandshake(t *testing.T) {
	hold := holdUntilEnd(t)
	peer := startPeer(t, t.TempDir(), func(c net.Conn, _ string) { <-hold })
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		<-peer.lines // the handshake is under way
		cancel()
	}()
	start := time.Now()
	_, err := DialVsock(ctx, peer.path, 1024)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("got %v, want context.Canceled", err)
	}
	// Without the cancellation the handshake would end only at its own
	// DefaultHandshakeTimeout (with the same error): that is the one other
	// way out, so it is the bound, about a thousand times what a
	// cancellation takes.
	if d := time.Since(start); d >= DefaultHandshakeTimeout {
		t.Fatalf("the handshake ended %v after it started, at DefaultHandshakeTimeout (%v), not at the cancellation", d, DefaultHandshakeTimeout)
	}
}

func TestDialVsockNoSocket(t *testing.T) {
	_, err := DialVsock(context.Background(), filepath.Join(t.TempDir(), "missing.sock"), 1024)
	if err == nil || !errors.Is(err, os.ErrNotExist) && !strings.Contains(err.Error(), "no such file") {
		t.Fatalf("got %v", err)
	}
	if errors.Is(err, ErrVsockHandshake) {
		t.Fatal("a missing socket is not a handshake failure")
	}
}

// TestDialVsockDefaultTimeout checks the handshake ends on its own without
// a ctx deadline, and not before DefaultHandshakeTimeout (a lower bound,
// which load cannot break; the upper one is only a guard against a hang).
func TestDialVsockDefaultTimeout(t *testing.T) {
	if testing.Short() {
		t.Skip("waits for DefaultHandshakeTimeout")
	}
	hold := holdUntilEnd(t)
	peer := startPeer(t, t.TempDir(), func(c net.Conn, _ string) { <-hold })
	start := time.Now()
	errc := make(chan error, 1)
	go func() {
		_, err := DialVsock(context.Background(), peer.path, 1024)
		errc <- err
	}()
	var err error
	select {
	case err = <-errc:
	case <-time.After(DefaultHandshakeTimeout + time.Minute):
		t.Fatalf("the handshake with a silent peer did not end %v after DefaultHandshakeTimeout", time.Minute)
	}
	if err == nil || !strings.Contains(err.Error(), "no answer in time") {
		t.Fatalf("got %v", err)
	}
	if d := time.Since(start); d < DefaultHandshakeTimeout {
		t.Fatalf("gave up after %v, before DefaultHandshakeTimeout (%v)", d, DefaultHandshakeTimeout)
	}
}
