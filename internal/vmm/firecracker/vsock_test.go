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
	p := &vsockPeer{path: filepath.Join(dir, "v.sock"), lines: make(chan string, 8)}
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

func TestDialVsockNoDeadlineLeftOnConn(t *testing.T) {
	peer := startPeer(t, t.TempDir(), func(c net.Conn, line string) {
		c.Write([]byte("OK 5\n"))
		time.Sleep(300 * time.Millisecond)
		c.Write([]byte("late\n"))
	})
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	conn, err := DialVsock(ctx, peer.path, 52)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	// The handshake's 100 ms deadline has passed by the time the peer
	// writes; the read must still succeed.
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil || line != "late\n" {
		t.Fatalf("read after handshake: %q %v", line, err)
	}
	if got := <-peer.lines; got != "CONNECT 52\n" {
		t.Fatalf("peer read %q", got)
	}
}

func TestDialVsockFailures(t *testing.T) {
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
		{"silence (timeout)", func(c net.Conn, _ string) { time.Sleep(2 * time.Second) }, 150 * time.Millisecond,
			"reading the reply", context.DeadlineExceeded},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			peer := startPeer(t, t.TempDir(), tc.reply)
			ctx, cancel := context.WithTimeout(context.Background(), tc.ctx)
			defer cancel()
			start := time.Now()
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
			if time.Since(start) > tc.ctx+time.Second {
				t.Fatalf("took %v", time.Since(start))
			}
		})
	}
}

func TestDialVsockCancelledDuringHandshake(t *testing.T) {
	peer := startPeer(t, t.TempDir(), func(c net.Conn, _ string) { time.Sleep(2 * time.Second) })
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		time.Sleep(100 * time.Millisecond)
		cancel()
	}()
	start := time.Now()
	_, err := DialVsock(ctx, peer.path, 1024)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("got %v, want context.Canceled", err)
	}
	if time.Since(start) > time.Second {
		t.Fatalf("cancellation took %v", time.Since(start))
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
// a ctx deadline.
func TestDialVsockDefaultTimeout(t *testing.T) {
	if testing.Short() {
		t.Skip("waits for DefaultHandshakeTimeout")
	}
	peer := startPeer(t, t.TempDir(), func(c net.Conn, _ string) { time.Sleep(DefaultHandshakeTimeout + 2*time.Second) })
	start := time.Now()
	_, err := DialVsock(context.Background(), peer.path, 1024)
	if err == nil || !strings.Contains(err.Error(), "no answer in time") {
		t.Fatalf("got %v", err)
	}
	if d := time.Since(start); d < DefaultHandshakeTimeout-100*time.Millisecond || d > DefaultHandshakeTimeout+time.Second {
		t.Fatalf("took %v", d)
	}
}
