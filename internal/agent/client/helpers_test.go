package client_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/noid-vm/noid/internal/agent/client"
	"github.com/noid-vm/noid/internal/agent/guest"
	"github.com/noid-vm/noid/internal/agent/proto"
)

// testTimeout bounds every wait in these tests, so a bug shows up as a
// failure instead of a hung test binary.
const testTimeout = 20 * time.Second

func testLogger(t testing.TB) *slog.Logger {
	if os.Getenv("NOID_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.DiscardHandler)
}

// socketpair returns two connected unix stream sockets as net.Conns.
func socketpair(t testing.TB) (net.Conn, net.Conn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conn := func(fd int) net.Conn {
		f := os.NewFile(uintptr(fd), "socketpair")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	return conn(fds[0]), conn(fds[1])
}

// fakeSystem records privileged sync operations instead of performing them.
type fakeSystem struct {
	mu       sync.Mutex
	now      time.Time
	clock    []time.Time
	entropy  [][]byte
	reseeds  int
	hostname string
	net      guest.NetState
	calls    []string
}

func (f *fakeSystem) record(c string) { f.calls = append(f.calls, c) }
func (f *fakeSystem) Now() time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.now
}
func (f *fakeSystem) SetClock(t time.Time) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.clock = append(f.clock, t)
	f.now = t
	f.record("clock")
	return nil
}
func (f *fakeSystem) AddEntropy(b []byte) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.entropy = append(f.entropy, append([]byte(nil), b...))
	f.record("entropy")
	return nil
}
func (f *fakeSystem) ReseedCRNG() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.reseeds++
	f.record("reseed")
	return nil
}
func (f *fakeSystem) Hostname() (string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.hostname, nil
}
func (f *fakeSystem) SetHostname(n string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.hostname = n
	f.record("hostname")
	return nil
}
func (f *fakeSystem) NetState(string) (guest.NetState, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.net, nil
}
func (f *fakeSystem) SetMAC(_, mac string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.net.MAC = mac
	f.record("mac")
	return nil
}
func (f *fakeSystem) SetIPv4(_, cidr string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.net.IPv4 = []string{cidr}
	f.record("ipv4")
	return nil
}
func (f *fakeSystem) SetGateway(_, gw string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.net.Gateway = gw
	f.record("gateway")
	return nil
}

type env struct {
	agent *guest.Agent
	sys   *fakeSystem
	etc   string
	ctx   context.Context
}

// newAgent returns an agent that is not init, with a fake System.
func newAgent(t testing.TB) *env {
	t.Helper()
	sys := &fakeSystem{now: time.Unix(1000, 0), hostname: "old", net: guest.NetState{MAC: "02:00:00:00:00:01"}}
	etc := t.TempDir()
	a := guest.New(guest.Config{Logger: testLogger(t), System: sys, EtcDir: etc,
		StallTimeout: 200 * time.Millisecond})
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	return &env{agent: a, sys: sys, etc: etc, ctx: ctx}
}

// serveConn runs the agent on one end of a socketpair and returns the other.
func (e *env) serveConn(t testing.TB) net.Conn {
	host, g := socketpair(t)
	go func() { _ = e.agent.ServeConn(e.ctx, g) }()
	t.Cleanup(func() { host.Close() })
	return host
}

func connect(t testing.TB, conn io.ReadWriteCloser) *client.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	c, err := client.Connect(ctx, conn, client.Options{Logger: testLogger(t), HelloInterval: 300 * time.Millisecond})
	if err != nil {
		t.Fatalf("Connect: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// newClient returns a client connected to a fresh agent over a socketpair.
func newClient(t testing.TB) (*client.Client, *env) {
	e := newAgent(t)
	return connect(t, e.serveConn(t)), e
}

type result struct {
	stdout, stderr string
	exit           proto.Exit
	err            error
}

// run executes req, feeding stdin (if not nil), and collects everything.
func run(t testing.TB, c *client.Client, req proto.ExecRequest, stdin []byte) result {
	t.Helper()
	if stdin != nil {
		req.Stdin = true
	}
	p, err := c.Exec(context.Background(), req)
	if err != nil {
		t.Fatalf("Exec %q: %v", req.Argv, err)
	}
	return collect(t, p, stdin)
}

func collect(t testing.TB, p *client.Process, stdin []byte) result {
	t.Helper()
	var out, errb bytes.Buffer
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); _, _ = io.Copy(&out, p.Stdout()) }()
	go func() { defer wg.Done(); _, _ = io.Copy(&errb, p.Stderr()) }()
	if stdin != nil {
		go func() {
			w := p.Stdin()
			_, _ = w.Write(stdin)
			_ = w.Close()
		}()
	}
	done := make(chan result, 1)
	go func() {
		wg.Wait()
		exit, err := p.Wait()
		done <- result{out.String(), errb.String(), exit, err}
	}()
	select {
	case r := <-done:
		return r
	case <-time.After(testTimeout):
		t.Fatalf("process did not finish within %v", testTimeout)
		return result{}
	}
}

// waitTimeout waits for ch or fails the test.
func waitTimeout[T any](t testing.TB, ch <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(testTimeout):
		t.Fatalf("timed out waiting for %s", what)
		var zero T
		return zero
	}
}

// readUntil reads r until the accumulated output contains want.
func readUntil(t testing.TB, r io.Reader, acc *bytes.Buffer, want string) {
	t.Helper()
	done := make(chan error, 1)
	go func() {
		buf := make([]byte, 4096)
		for !strings.Contains(acc.String(), want) {
			n, err := r.Read(buf)
			acc.Write(buf[:n])
			if err != nil {
				done <- err
				return
			}
		}
		done <- nil
	}()
	if err := waitTimeout(t, done, "output "+want); err != nil {
		t.Fatalf("reading until %q: %v (got %q)", want, err, acc.String())
	}
}

// processGone reports whether pid no longer exists (reaped).
func processGone(pid int) bool {
	err := unix.Kill(pid, 0)
	return errors.Is(err, unix.ESRCH)
}

// eventually polls cond until it holds or the test timeout passes. It is an
// assertion on an eventual state, not a readiness wait.
func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(testTimeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: condition never held", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
