package client_test

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/noid-vm/noid/internal/agent/client"
	"github.com/noid-vm/noid/internal/agent/proto"
)

// hostileLink sits between the host and a real agent and forwards bytes
// both ways until the test makes it misbehave the way a hostile or stopped
// guest does: stop forwarding the agent's bytes (an agent stopped with
// SIGSTOP or ptrace), or inject bytes into what the host reads (a process
// in the guest writing onto the agent's port).
type hostileLink struct {
	mu      sync.Mutex
	frozen  bool
	toHost  net.Conn // the proxy's end of the host's socket
	stopped chan struct{}
	// steal drops what the host sends (a process in the guest reading
	// the port); stolen counts the bytes dropped.
	steal  bool
	stolen int
}

// newHostileLink serves e's agent behind a link and returns the host's end.
func newHostileLink(t *testing.T, e *env) (net.Conn, *hostileLink) {
	t.Helper()
	host, proxyHost := socketpair(t)
	proxyGuest, g := socketpair(t)
	go func() { _ = e.agent.ServeConn(e.ctx, g) }()
	l := &hostileLink{toHost: proxyHost, stopped: make(chan struct{})}
	go func() {
		buf := make([]byte, 32<<10)
		for {
			n, err := proxyHost.Read(buf)
			if n > 0 {
				l.mu.Lock()
				if l.steal {
					l.stolen += n
				} else {
					_, _ = proxyGuest.Write(buf[:n])
				}
				l.mu.Unlock()
			}
			if err != nil {
				return
			}
		}
	}()
	go func() {
		buf := make([]byte, 32<<10)
		for {
			n, err := proxyGuest.Read(buf)
			if n > 0 {
				l.mu.Lock()
				if !l.frozen {
					_, _ = proxyHost.Write(buf[:n])
				}
				l.mu.Unlock()
			}
			if err != nil {
				return
			}
		}
	}()
	t.Cleanup(func() { host.Close(); proxyHost.Close(); proxyGuest.Close(); g.Close() })
	return host, l
}

// freeze drops everything the agent sends from now on.
func (l *hostileLink) freeze() {
	l.mu.Lock()
	l.frozen = true
	l.mu.Unlock()
}

// inject writes b to the host between two of the agent's writes.
func (l *hostileLink) inject(t *testing.T, b []byte) {
	t.Helper()
	l.mu.Lock()
	defer l.mu.Unlock()
	if _, err := l.toHost.Write(b); err != nil {
		t.Fatal(err)
	}
}

func connectKeepalive(t *testing.T, conn net.Conn) *client.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	c, err := client.Connect(ctx, conn, client.Options{Logger: testLogger(t), HelloInterval: 300 * time.Millisecond,
		KeepaliveInterval: 50 * time.Millisecond, KeepaliveTimeout: 300 * time.Millisecond})
	if err != nil {
		t.Fatalf("Connect: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// startSleep starts a silent process on c.
func startSleep(t *testing.T, c *client.Client) *client.Process {
	t.Helper()
	p, err := c.Exec(context.Background(), proto.ExecRequest{Argv: []string{"sleep", "100"}})
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// waitUnresponsive asserts that p's Wait fails with an error saying the
// agent stopped answering (ErrUnresponsive, wrapped in ErrClosed).
func waitUnresponsive(t *testing.T, p *client.Process) {
	t.Helper()
	ch := make(chan error, 1)
	go func() { _, err := p.Wait(); ch <- err }()
	err := waitTimeout(t, ch, "Wait of a process whose agent stopped answering")
	if !errors.Is(err, client.ErrUnresponsive) || !errors.Is(err, client.ErrClosed) {
		t.Fatalf("Wait error = %v, want ErrUnresponsive and ErrClosed", err)
	}
	if !strings.Contains(err.Error(), "stopped answering") {
		t.Errorf("the error does not say what happened: %v", err)
	}
}

// An agent that stops sending anything (stopped, or its bytes stolen) no
// longer holds a running exec forever: the keepalive ping goes unanswered
// and the call fails with ErrUnresponsive. Without the keepalive, Wait of
// `sleep 100` on a silent connection never returned.
func TestKeepaliveFailsCallsOfSilentAgent(t *testing.T) {
	e := newAgent(t)
	host, link := newHostileLink(t, e)
	p := startSleep(t, connectKeepalive(t, host))
	link.freeze()
	waitUnresponsive(t, p)
}

// A guest process writes the header of a frame onto the port and never
// the rest: the host's decoder waits for a payload that the agent's own
// replies then fill. The keepalive finds the connection dead.
func TestKeepaliveFailsCallsAfterHalfFrame(t *testing.T) {
	e := newAgent(t)
	host, link := newHostileLink(t, e)
	p := startSleep(t, connectKeepalive(t, host))
	hdr := make([]byte, proto.HeaderSize)
	hdr[0] = byte(proto.TypeData)
	hdr[1] = proto.ChanStdout
	binary.BigEndian.PutUint32(hdr[4:], 999)
	binary.BigEndian.PutUint32(hdr[8:], proto.MaxPayload)
	link.inject(t, append(hdr, "half a payload"...))
	waitUnresponsive(t, p)
}

// A healthy agent answers the pings: a silent process that outlives many
// keepalive intervals still completes with its exit code.
func TestKeepaliveKeepsHealthySilentCall(t *testing.T) {
	e := newAgent(t)
	host, _ := newHostileLink(t, e)
	c := connectKeepalive(t, host)
	r := run(t, c, proto.ExecRequest{Argv: []string{"sh", "-c", "sleep 1; exit 7"}}, nil)
	if r.err != nil || r.exit.Code != 7 {
		t.Fatalf("silent exec on a healthy agent: exit %+v, err %v", r.exit, r.err)
	}
	if c.Err() != nil {
		t.Fatalf("the connection was closed: %v", c.Err())
	}
}

// Dial gives a connection whose hello is never acknowledged (on QEMU, the
// first one after the host dropped a connection while the guest was
// paused) RedialAfter, then dials a new one, which the agent answers.
func TestDialRedialsUnansweredHello(t *testing.T) {
	e := newAgent(t)
	dials := 0
	dial := func(ctx context.Context) (io.ReadWriteCloser, error) {
		dials++
		if dials == 1 {
			host, deaf := socketpair(t)
			go func() { _, _ = io.Copy(io.Discard, deaf) }() // reads, never answers
			t.Cleanup(func() { deaf.Close() })
			return host, nil
		}
		return e.serveConn(t), nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	c, err := client.Dial(ctx, dial, client.Options{Logger: testLogger(t), HelloInterval: 100 * time.Millisecond, RedialAfter: 300 * time.Millisecond})
	if err != nil {
		t.Fatalf("Dial: %v (after %d dials)", err, dials)
	}
	defer c.Close()
	if dials != 2 {
		t.Errorf("Dial dialled %d times, want 2", dials)
	}
	if err := c.Ping(ctx); err != nil {
		t.Fatalf("ping over the second connection: %v", err)
	}
}

// Dial stops at its context's end when no connection is ever answered.
func TestDialGivesUpAtDeadline(t *testing.T) {
	dial := func(ctx context.Context) (io.ReadWriteCloser, error) {
		host, deaf := socketpair(t)
		go func() { _, _ = io.Copy(io.Discard, deaf) }()
		t.Cleanup(func() { deaf.Close() })
		return host, nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	_, err := client.Dial(ctx, dial, client.Options{RedialAfter: 100 * time.Millisecond})
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Dial error %v, want the context's deadline", err)
	}
}

// A process in the guest reads the OPEN of an exec off the port: the agent
// never hears of the request and keeps answering pings. The keepalive's
// ping lists the agent's streams (feature stream_list) and the request
// fails instead of waiting forever.
func TestKeepaliveFailsRequestTheAgentNeverGot(t *testing.T) {
	e := newAgent(t)
	host, link := newHostileLink(t, e)
	c := connectKeepalive(t, host)
	link.mu.Lock()
	link.steal = true
	link.mu.Unlock()
	p, err := c.Exec(context.Background(), proto.ExecRequest{Argv: []string{"true"}})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "the OPEN to be stolen", func() bool {
		link.mu.Lock()
		defer link.mu.Unlock()
		if link.stolen > 0 {
			link.steal = false
			return true
		}
		return false
	})
	ch := make(chan error, 1)
	go func() { _, err := p.Wait(); ch <- err }()
	err = waitTimeout(t, ch, "Wait of a process whose request never reached the agent")
	if !errors.Is(err, client.ErrUnresponsive) || !strings.Contains(err.Error(), "never reached") {
		t.Fatalf("Wait error = %v, want ErrUnresponsive saying the request never reached the agent", err)
	}
	// The connection itself is fine.
	if err := c.Ping(context.Background()); err != nil {
		t.Fatalf("ping after the stolen request: %v", err)
	}
}
