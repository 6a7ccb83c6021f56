package client_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/noid-vm/noid/internal/agent/client"
	"github.com/noid-vm/noid/internal/agent/guest"
	"github.com/noid-vm/noid/internal/agent/proto"
)

// fakePort behaves like the guest end of a virtio-serial port: it stays
// open while hosts come and go. With no host attached, reads return 0 bytes
// (io.EOF) and writes block until a host attaches; a write cut short by a
// host leaving continues to the next host, as bytes queued in the port do.
type fakePort struct {
	mu   sync.Mutex
	cond *sync.Cond
	cur  *fakeHost
}

type fakeHost struct {
	p          *fakePort
	toGuestR   *io.PipeReader
	toGuestW   *io.PipeWriter
	toHostR    *io.PipeReader
	toHostW    *io.PipeWriter
	detachOnce sync.Once
}

var errSwapped = errors.New("host swapped")

func newFakePort() *fakePort {
	p := &fakePort{}
	p.cond = sync.NewCond(&p.mu)
	return p
}

// attach connects a new host. If one is attached it is replaced without the
// guest seeing a hangup, as after a snapshot restore.
func (p *fakePort) attach() *fakeHost {
	h := &fakeHost{p: p}
	h.toGuestR, h.toGuestW = io.Pipe()
	h.toHostR, h.toHostW = io.Pipe()
	p.mu.Lock()
	old := p.cur
	p.cur = h
	p.mu.Unlock()
	p.cond.Broadcast()
	if old != nil {
		old.toGuestW.CloseWithError(errSwapped)
		old.toHostR.Close()
		old.toHostW.Close()
	}
	return h
}

func (p *fakePort) Read(b []byte) (int, error) {
	for {
		p.mu.Lock()
		h := p.cur
		p.mu.Unlock()
		if h == nil {
			return 0, io.EOF
		}
		n, err := h.toGuestR.Read(b)
		if errors.Is(err, errSwapped) && n == 0 {
			continue
		}
		if err != nil && n == 0 {
			return 0, io.EOF // host hung up
		}
		return n, nil
	}
}

func (p *fakePort) Write(b []byte) (int, error) {
	total := 0
	for len(b) > 0 {
		p.mu.Lock()
		for p.cur == nil {
			p.cond.Wait()
		}
		h := p.cur
		p.mu.Unlock()
		n, err := h.toHostW.Write(b)
		total += n
		b = b[n:]
		if err != nil {
			// That host is gone; wait for the next one.
			p.mu.Lock()
			for p.cur == h {
				p.cond.Wait()
			}
			p.mu.Unlock()
		}
	}
	return total, nil
}

// host-side connection
func (h *fakeHost) Read(b []byte) (int, error)  { return h.toHostR.Read(b) }
func (h *fakeHost) Write(b []byte) (int, error) { return h.toGuestW.Write(b) }
func (h *fakeHost) Close() error {
	h.detachOnce.Do(func() {
		h.p.mu.Lock()
		if h.p.cur == h {
			h.p.cur = nil
		}
		h.p.mu.Unlock()
		h.p.cond.Broadcast()
		h.toGuestW.Close()
		h.toHostR.Close()
		h.toHostW.Close()
	})
	return nil
}

// startPID runs a process that prints its pid and then sleeps.
func startPID(t *testing.T, c *client.Client) (*client.Process, int) {
	t.Helper()
	p, err := c.Exec(context.Background(), proto.ExecRequest{Argv: []string{"sh", "-c", "echo $$; exec sleep 100"}, Stdin: true})
	if err != nil {
		t.Fatal(err)
	}
	var acc bytes.Buffer
	readUntil(t, p.Stdout(), &acc, "\n")
	pid, err := strconv.Atoi(strings.TrimSpace(acc.String()))
	if err != nil {
		t.Fatalf("pid output %q", acc.String())
	}
	return p, pid
}

// waitFails asserts that Wait returns an error wrapping client.ErrClosed
// promptly.
func waitFails(t *testing.T, p *client.Process) {
	t.Helper()
	ch := make(chan error, 1)
	go func() { _, err := p.Wait(); ch <- err }()
	err := waitTimeout(t, ch, "Wait of a process on a dead connection")
	if err == nil || !errors.Is(err, client.ErrClosed) {
		t.Fatalf("Wait error = %v, want ErrClosed", err)
	}
}

func checkNewWorks(t *testing.T, c *client.Client) {
	t.Helper()
	r := run(t, c, proto.ExecRequest{Argv: []string{"echo", "fresh"}}, nil)
	if r.err != nil || r.stdout != "fresh\n" {
		t.Fatalf("exec on the new connection: %+v", r)
	}
}

// The host leaves a virtio-serial port mid-stream (the guest sees a hangup)
// and a new host connects: old streams die, their processes get SIGHUP, the
// new connection works.
func TestReconnectPortAfterHangup(t *testing.T) {
	e := newAgent(t)
	port := newFakePort()
	go func() { _ = e.agent.ServePort(e.ctx, port) }()

	c1 := connect(t, port.attach())
	p1, pid := startPID(t, c1)
	in := p1.Stdin()
	if _, err := in.Write([]byte("data in flight")); err != nil {
		t.Fatal(err)
	}
	c1.Close()
	waitFails(t, p1)
	eventually(t, "old process killed by SIGHUP and reaped", func() bool { return processGone(pid) })

	c2 := connect(t, port.attach())
	checkNewWorks(t, c2)
	info, err := c2.Info(context.Background())
	if err != nil || info.Sessions != 2 {
		t.Fatalf("info %+v %v", info, err)
	}
}

// A new host HELLO arrives on the port without any hangup, as after a
// restore: the previous connection's state is dropped.
func TestReconnectPortWithoutHangup(t *testing.T) {
	e := newAgent(t)
	port := newFakePort()
	go func() { _ = e.agent.ServePort(e.ctx, port) }()

	c1 := connect(t, port.attach())
	p1, pid := startPID(t, c1)
	// Output still flowing on the old connection while the new host arrives.
	busy, err := c1.Exec(context.Background(), proto.ExecRequest{Argv: []string{"yes"}})
	if err != nil {
		t.Fatal(err)
	}
	var acc bytes.Buffer
	readUntil(t, busy.Stdout(), &acc, "y\ny\n")

	c2 := connect(t, port.attach()) // replaces the host under the guest's feet
	waitFails(t, p1)
	waitFails(t, busy)
	eventually(t, "old process killed", func() bool { return processGone(pid) })
	checkNewWorks(t, c2)
	// Nothing of the old connection leaks into the new one.
	for range 3 {
		checkNewWorks(t, c2)
	}
}

// Over sockets (vsock, unix), each host connection is a new socket; a HELLO
// on a new one closes the old one.
func TestReconnectListenerNewHelloDropsOld(t *testing.T) {
	e := newAgent(t)
	sock := filepath.Join(t.TempDir(), "agent.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = e.agent.ServeListener(e.ctx, guest.NetListener(l)) }()
	dial := func() net.Conn {
		conn, err := net.Dial("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		return conn
	}
	c1 := connect(t, dial())
	p1, pid := startPID(t, c1)

	c2 := connect(t, dial())
	waitTimeout(t, c1.Done(), "old client to notice it was replaced")
	if !errors.Is(c1.Err(), client.ErrClosed) {
		t.Fatalf("old client error %v", c1.Err())
	}
	waitFails(t, p1)
	eventually(t, "old process killed", func() bool { return processGone(pid) })
	checkNewWorks(t, c2)
	if err := c1.Ping(context.Background()); err == nil {
		t.Fatal("ping on the replaced connection succeeded")
	}
}

// When the agent side of the connection goes away, everything pending on the
// host fails promptly.
func TestConnectionDropFailsEverything(t *testing.T) {
	e := newAgent(t)
	host, g := socketpair(t)
	done := make(chan struct{})
	go func() { defer close(done); _ = e.agent.ServeConn(e.ctx, g) }()
	c := connect(t, host)
	p, pid := startPID(t, c)
	unary := make(chan error, 1)
	stdinErr := make(chan error, 1)
	go func() {
		_, err := p.Stdin().Write(make([]byte, 8<<20)) // blocks on flow control
		stdinErr <- err
	}()
	g.Close() // the guest end vanishes
	waitTimeout(t, c.Done(), "client to notice the drop")
	waitFails(t, p)
	if err := waitTimeout(t, stdinErr, "blocked stdin write"); err == nil {
		t.Fatal("stdin write succeeded on a dead connection")
	}
	go func() { _, err := c.Sync(context.Background(), proto.Sync{}); unary <- err }()
	if err := waitTimeout(t, unary, "sync on a dead connection"); !errors.Is(err, client.ErrClosed) {
		t.Fatalf("sync error %v", err)
	}
	if _, err := c.Exec(context.Background(), proto.ExecRequest{Argv: []string{"true"}}); err == nil {
		t.Fatal("exec on a dead connection succeeded")
	}
	waitTimeout(t, done, "agent to finish the connection")
	eventually(t, "process of the dropped connection killed", func() bool { return processGone(pid) })
}

// A pending unary call whose context ends returns promptly.
func TestCallContextCancel(t *testing.T) {
	c, _ := newClient(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := c.Ping(ctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("ping with cancelled ctx: %v", err)
	}
	if err := c.Ping(context.Background()); err != nil {
		t.Fatal(err)
	}
}

// Connect gives up when its context ends and nobody answers.
func TestConnectDeadline(t *testing.T) {
	host, peer := socketpair(t)
	defer peer.Close()
	go func() { _, _ = io.Copy(io.Discard, peer) }() // reads, never answers
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	errc := make(chan error, 1)
	go func() {
		_, err := client.Connect(ctx, host, client.Options{})
		errc <- err
	}()
	// The peer never answers: only the deadline can end Connect.
	if err := waitTimeout(t, errc, "Connect to give up at its deadline"); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Connect error %v", err)
	}
}

// Garbage and broken frames before the HELLO are skipped by the agent.
func TestGarbageBeforeHello(t *testing.T) {
	random := make([]byte, 100000)
	_, _ = rand.Read(random)
	random = bytes.ReplaceAll(random, []byte(proto.SyncMarker), nil)
	dataHdr := func(length uint32, payload []byte) []byte {
		b := proto.AppendFrame(nil, proto.Frame{Type: proto.TypeData, Stream: 1, Payload: make([]byte, length)})
		return append(b[:proto.HeaderSize], payload...)
	}
	cases := map[string][]byte{
		"random bytes":               random,
		"marker then bad header":     append([]byte(proto.SyncMarker), 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
		"marker then oversize":       append([]byte(proto.SyncMarker), 1, 0, 0, 0, 0, 0, 0, 0, 0x7f, 0xff, 0xff, 0xff),
		"marker then a non-hello":    append([]byte(proto.SyncMarker), proto.EncodeFrame(proto.Frame{Type: proto.TypeOpen, Stream: 1, Payload: []byte(`{"kind":"exec","exec":{"argv":["touch","/tmp/should-not-run"]}}`)})...),
		"truncated marker":           []byte(proto.SyncMarker)[:9],
		"old hello, truncated":       proto.EncodeFrame(proto.Frame{Type: proto.TypeHello, Payload: []byte(`{"id":"old","version":1}`)})[:30],
		"half frame, long remainder": dataHdr(5000, []byte("0123456789")),
		// The new HELLO completes the old frame's payload and its tail is
		// read as a header: the agent must find the marker inside it.
		"half frame, short remainder": dataHdr(20, []byte("01234")),
		"header only":                 dataHdr(3, nil),
	}
	for name, junk := range cases {
		t.Run(name, func(t *testing.T) {
			e := newAgent(t)
			host := e.serveConn(t)
			if _, err := host.Write(junk); err != nil {
				t.Fatal(err)
			}
			c := connect(t, host)
			checkNewWorks(t, c)
		})
	}
}

// The host skips garbage, stale acks and acks of other connections.
func TestHostSkipsGarbageAndStaleAcks(t *testing.T) {
	host, g := socketpair(t)
	defer g.Close()
	go func() {
		dec := proto.NewDecoder(g)
		if _, err := dec.Resync(); err != nil {
			return
		}
		f, err := dec.ReadFrame()
		if err != nil || f.Type != proto.TypeHello {
			return
		}
		var h proto.Hello
		_ = proto.Unmarshal(f.Payload, &h)
		var b []byte
		b = append(b, "tail of an old frame"...)
		b = append(b, proto.SyncMarker[:10]...)
		b = append(b, proto.EncodeFrame(proto.Frame{Type: proto.TypeHelloAck, Payload: proto.Marshal(proto.HelloAck{ID: "someone-else", Version: 1})})...)
		b = append(b, proto.EncodeFrame(proto.Frame{Type: proto.TypeExit, Stream: 1, Payload: []byte(`{}`)})...)
		b = append(b, proto.SyncMarker...)
		b = append(b, 0xee, 0, 0, 0)
		b = append(b, proto.EncodeFrame(proto.Frame{Type: proto.TypeHelloAck, Payload: proto.Marshal(proto.HelloAck{ID: h.ID, Version: 1, PID: 4242})})...)
		_, _ = g.Write(b)
		_, _ = io.Copy(io.Discard, g)
	}()
	c := connect(t, host)
	if c.Agent().PID != 4242 {
		t.Fatalf("ack %+v", c.Agent())
	}
	// This agent announces no features, like the agents from before them:
	// a request for another user is refused here rather than run as root
	// by an agent that ignores the field.
	if c.HasFeature(proto.FeatureExecUser) {
		t.Fatal("feature announced by an ack without features")
	}
	if _, err := c.Exec(context.Background(), proto.ExecRequest{Argv: []string{"id"}, User: "noid"}); !errors.Is(err, client.ErrUnsupported) {
		t.Fatalf("exec as a user on an agent without the feature: %v", err)
	}
	if _, err := c.Console(context.Background(), proto.ExecRequest{User: "noid"}); !errors.Is(err, client.ErrUnsupported) {
		t.Fatalf("console as a user on an agent without the feature: %v", err)
	}
}

// After a restore the agent may sit in the middle of a frame of the old
// connection (its host wrote half a frame before the checkpoint). A new
// host's HELLO on the same byte stream must still be found, whether it is
// swallowed whole by the stalled frame, completes it, or is cut anywhere.
func TestResyncMidFrameOnLiveConnection(t *testing.T) {
	for _, missing := range []int{5000, 200, 40, 20, 16, 7, 1} {
		t.Run(strconv.Itoa(missing), func(t *testing.T) {
			e := newAgent(t)
			host := e.serveConn(t)
			// The old host: handshake by hand, start a process, then write
			// half of a DATA frame.
			if _, err := host.Write(proto.EncodeFrame(proto.Frame{Type: proto.TypeHello, Payload: proto.Marshal(proto.Hello{ID: "old", Version: 1})})); err != nil {
				t.Fatal(err)
			}
			dec := proto.NewDecoder(host)
			if _, err := dec.Resync(); err != nil {
				t.Fatal(err)
			}
			if f, err := dec.ReadFrame(); err != nil || f.Type != proto.TypeHelloAck {
				t.Fatalf("old handshake: %v %v", f, err)
			}
			pidFile := filepath.Join(t.TempDir(), "pid")
			open := proto.Open{Kind: proto.KindExec, Exec: &proto.ExecRequest{
				Argv: []string{"sh", "-c", `echo $$ > "$1.tmp"; mv "$1.tmp" "$1"; exec sleep 100`, "sh", pidFile}, Stdin: true}}
			if _, err := host.Write(proto.EncodeFrame(proto.Frame{Type: proto.TypeOpen, Stream: 1, Payload: proto.Marshal(open)})); err != nil {
				t.Fatal(err)
			}
			full := proto.EncodeFrame(proto.Frame{Type: proto.TypeData, Flags: proto.ChanStdin, Stream: 1, Payload: bytes.Repeat([]byte("x"), missing+10)})
			if _, err := host.Write(full[:len(full)-missing]); err != nil {
				t.Fatal(err)
			}
			// The old process runs; the agent has read the frames before the
			// half frame.
			var pid int
			eventually(t, "old process to start", func() bool {
				b, err := os.ReadFile(pidFile)
				pid, _ = strconv.Atoi(strings.TrimSpace(string(b)))
				return err == nil
			})
			// connect bounds the handshake by testTimeout (a guard against
			// a hang); how long a resync takes is not asserted.
			c := connect(t, host)
			checkNewWorks(t, c)
			eventually(t, "old process killed", func() bool { return processGone(pid) })
		})
	}
}

// A HELLO re-sent with the live connection's id (the host re-sends until
// acked) is ignored, even between frames of the live connection; one with a
// new id replaces the connection.
func TestRepeatedHelloOnLiveConnection(t *testing.T) {
	e := newAgent(t)
	host := e.serveConn(t)
	hello := func(id string) []byte {
		return proto.EncodeFrame(proto.Frame{Type: proto.TypeHello, Payload: proto.Marshal(proto.Hello{ID: id, Version: 1})})
	}
	ping := func(stream uint32) []byte {
		return proto.EncodeFrame(proto.Frame{Type: proto.TypeOpen, Stream: stream, Payload: proto.Marshal(proto.Open{Kind: proto.KindPing})})
	}
	dec := proto.NewDecoder(host)
	next := func() proto.Frame {
		t.Helper()
		ch := make(chan proto.Frame, 1)
		go func() {
			f, err := dec.ReadFrame()
			if err != nil {
				t.Error(err)
			}
			f.Payload = append([]byte(nil), f.Payload...)
			ch <- f
		}()
		return waitTimeout(t, ch, "a frame from the agent")
	}
	var b []byte
	b = append(b, hello("A")...)
	b = append(b, ping(1)...)
	b = append(b, hello("A")...) // duplicate: ignored
	b = append(b, ping(2)...)
	if _, err := host.Write(b); err != nil {
		t.Fatal(err)
	}
	if f := next(); f.Type != proto.TypeHelloAck {
		t.Fatalf("got %v, want HELLO_ACK", f)
	}
	// Both pings answered (in any order), no second ack.
	exits := map[uint32]bool{}
	for range 2 {
		f := next()
		if f.Type != proto.TypeExit {
			t.Fatalf("got %v, want EXIT", f)
		}
		exits[f.Stream] = true
	}
	if !exits[1] || !exits[2] {
		t.Fatalf("exits for streams %v, want 1 and 2", exits)
	}
	// A new id: a new ack, and the old streams are gone.
	if _, err := host.Write(append(hello("B"), ping(1)...)); err != nil {
		t.Fatal(err)
	}
	f := next()
	var ack proto.HelloAck
	if f.Type != proto.TypeHelloAck || proto.Unmarshal(f.Payload, &ack) != nil || ack.ID != "B" {
		t.Fatalf("got %v (%s), want HELLO_ACK B", f, f.Payload)
	}
	if f := next(); f.Type != proto.TypeExit || f.Stream != 1 {
		t.Fatalf("got %v, want EXIT on 1", f)
	}
}

// A host that re-sends its HELLO very often still gets one clean connection.
func TestFastHelloResend(t *testing.T) {
	e := newAgent(t)
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	c, err := client.Connect(ctx, e.serveConn(t), client.Options{HelloInterval: time.Microsecond})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for range 5 {
		checkNewWorks(t, c)
	}
}
