package network

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

func requireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates network namespaces, bridges, TAPs and nftables tables")
	}
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		t.Skipf("needs /dev/net/tun: %v", err)
	}
}

// newNS creates a fresh, anonymous network namespace with lo up, without
// moving the test's own thread. It is destroyed (by closing its last
// reference) when the test ends.
func newNS(t testing.TB) netns.NsHandle {
	t.Helper()
	ns, err := NewNamespace()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ns.Close() })
	h := nsHandle(t, ns)
	lo, err := h.LinkByName("lo")
	if err != nil {
		t.Fatal(err)
	}
	if err := h.LinkSetUp(lo); err != nil {
		t.Fatal(err)
	}
	return ns
}

func nsHandle(t testing.TB, ns netns.NsHandle) *netlink.Handle {
	t.Helper()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Close)
	return h
}

// inside runs fn in ns (sockets it creates stay there).
func inside(t testing.TB, ns netns.NsHandle, fn func() error) {
	t.Helper()
	if err := inNS(ns, fn); err != nil {
		t.Fatal(err)
	}
}

func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// testConfig is the config every test uses: defaults, DNS on a high port.
func testConfig() Config {
	return Config{DNSPort: 5353}
}

func newTestManager(t testing.TB, ns netns.NsHandle, cfg Config) *Manager {
	t.Helper()
	m, err := New(context.Background(), cfg, testLogger(t), WithNetNS(ns))
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

// tcpServer listens in ns on addr and answers every connection with the
// peer's address as it sees it ("ip:port\n").
func tcpServer(t testing.TB, ns netns.NsHandle, addr string) net.Listener {
	t.Helper()
	var ln net.Listener
	inside(t, ns, func() error {
		var err error
		ln, err = net.Listen("tcp4", addr)
		return err
	})
	var wg sync.WaitGroup
	t.Cleanup(wg.Wait) // runs after ln.Close (cleanups are LIFO)
	t.Cleanup(func() { ln.Close() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			fmt.Fprintf(c, "%s\n", c.RemoteAddr())
			c.Close()
		}
	}()
	return ln
}

// dialFrom connects from ns to addr (optionally from laddr) and returns
// what the server said: its view of our address.
func dialFrom(ns netns.NsHandle, laddr, addr string, timeout time.Duration) (string, error) {
	var line string
	err := inNS(ns, func() error {
		d := net.Dialer{Timeout: timeout}
		if laddr != "" {
			a, err := net.ResolveTCPAddr("tcp4", laddr)
			if err != nil {
				return err
			}
			d.LocalAddr = a
		}
		c, err := d.Dial("tcp4", addr)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(timeout))
		line, err = bufio.NewReader(c).ReadString('\n')
		if err == io.EOF && line != "" {
			err = nil
		}
		line = strings.TrimSpace(line)
		return err
	})
	return line, err
}

const (
	okTimeout      = 5 * time.Second
	blockedTimeout = 700 * time.Millisecond
)

// mustReach asserts that a TCP connection from ns to addr works and returns
// the source address the server saw.
func mustReach(t testing.TB, ns netns.NsHandle, laddr, addr, what string) string {
	t.Helper()
	seen, err := dialFrom(ns, laddr, addr, okTimeout)
	if err != nil {
		t.Fatalf("%s: expected %s to be reachable, got %v", what, addr, err)
	}
	return seen
}

// mustNotReach asserts that a TCP connection from ns to addr fails.
func mustNotReach(t testing.TB, ns netns.NsHandle, laddr, addr, what string) {
	t.Helper()
	seen, err := dialFrom(ns, laddr, addr, blockedTimeout)
	if err == nil {
		t.Fatalf("%s: expected %s to be blocked, but the server answered (it saw %s)", what, addr, seen)
	}
}

func hostPort(a netip.Addr, port int) string {
	return netip.AddrPortFrom(a, uint16(port)).String()
}
