// Package client is the host side of the agent protocol: it connects to a
// guest's noid-agent over any byte stream (virtio-serial socket, vsock, unix
// socket), performs the hello handshake, and runs execs, syncs and file
// copies as multiplexed, flow-controlled streams.
//
// Every call fails promptly once the connection is gone; nothing waits for a
// peer that will never answer.
package client

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/noid-vm/noid/internal/agent/proto"
	"github.com/noid-vm/noid/internal/errdefs"
)

// ErrClosed is wrapped by every error caused by the connection being gone
// (closed locally, dropped by the peer, or replaced by a newer connection on
// the agent's side). It wraps errdefs.ErrUnavailable.
var ErrClosed = fmt.Errorf("agent connection closed: %w", errdefs.ErrUnavailable)

// ErrExited is returned by writes to a process's stdin after it exited.
var ErrExited = errors.New("process exited")

// ErrUnsupported is wrapped by the error of a request that needs a feature
// the connected agent does not announce (an agent older than the feature,
// in a VM booted or restored from before it).
var ErrUnsupported = errors.New("the VM's agent does not support it")

// Options tune Connect. The zero value is usable.
type Options struct {
	// Logger receives debug logs; nil discards them.
	Logger *slog.Logger
	// HelloInterval is how often the HELLO is re-sent until the agent acks
	// it (the first one may be lost or swallowed after a restore).
	// Default 1s.
	HelloInterval time.Duration
	// KeepaliveInterval is how long the connection may go without a frame
	// from the agent while a call is pending (an exec, a file copy, a
	// unary request) before the host pings the agent. Default 5s.
	KeepaliveInterval time.Duration
	// KeepaliveTimeout is how long that ping may go unanswered before the
	// connection is declared dead: every pending call then fails with an
	// error wrapping ErrUnresponsive (and ErrClosed). A guest whose agent
	// was stopped, or that wrote half a frame onto the port, cannot hold a
	// call forever. Default 20s.
	KeepaliveTimeout time.Duration
	// RedialAfter is how long Dial waits for the agent to acknowledge a
	// connection's hello before it drops that connection and dials a new
	// one. Default 10s.
	RedialAfter time.Duration
}

// Dial connects to an agent over connections made by dial, as Connect
// does, but gives each connection only opts.RedialAfter to be
// acknowledged before it closes it and dials again, until ctx ends. On
// QEMU's virtio-serial, the first connection made after the host dropped
// one while the guest was paused (a guest stopped for lack of disk space,
// whose connection the keepalive closed) is never answered, while the
// next one is at once; a fresh connection costs nothing otherwise.
func Dial(ctx context.Context, dial func(context.Context) (io.ReadWriteCloser, error), opts Options) (*Client, error) {
	if opts.RedialAfter <= 0 {
		opts.RedialAfter = 10 * time.Second
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	for attempt := 1; ; attempt++ {
		conn, err := dial(ctx)
		if err != nil {
			return nil, err
		}
		hctx, cancel := context.WithTimeout(ctx, opts.RedialAfter)
		c, err := Connect(hctx, conn, opts)
		cancel()
		if err == nil || ctx.Err() != nil || !errors.Is(err, context.DeadlineExceeded) {
			if err != nil && ctx.Err() != nil {
				err = fmt.Errorf("agent hello: %w", ctx.Err())
			}
			return c, err
		}
		log.Debug("agent hello not acknowledged; dialling a new connection", "after", opts.RedialAfter, "attempt", attempt)
	}
}

// ErrUnresponsive is wrapped by the error of every call on a connection
// closed because the agent did not answer a keepalive ping in time.
var ErrUnresponsive = errors.New("the agent stopped answering")

// Client is a connection to one guest agent. It is safe for concurrent use.
type Client struct {
	conn io.ReadWriteCloser
	fw   *proto.FrameWriter
	dec  *proto.Decoder
	mux  *proto.Mux
	ack  proto.HelloAck
	log  *slog.Logger

	nextID atomic.Uint32

	mu    sync.Mutex
	calls map[uint32]*call

	done      chan struct{}
	closeOnce sync.Once
	err       error // set before done is closed

	// lastFrame is when the read loop last received a whole frame (unix
	// nanoseconds), for the keepalive.
	lastFrame atomic.Int64
}

// call tracks one open stream until its EXIT arrives.
type call struct {
	st   *proto.Stream
	exit chan proto.Exit // buffered, receives the EXIT payload once
	// sent is set once the OPEN was written: a ping sent later reaches
	// the agent after it.
	sent atomic.Bool
}

// Connect performs the hello handshake on conn and returns a connected
// Client. It writes the sync marker and a HELLO with a fresh random id
// (re-sent every Options.HelloInterval), then scans the incoming bytes for a
// HELLO_ACK carrying that id, skipping garbage and acks of older
// connections. If ctx ends first, or the handshake fails, conn is closed and
// the error is returned. After a successful Connect the Client owns conn.
func Connect(ctx context.Context, conn io.ReadWriteCloser, opts Options) (*Client, error) {
	if opts.HelloInterval <= 0 {
		opts.HelloInterval = time.Second
	}
	if opts.KeepaliveInterval <= 0 {
		opts.KeepaliveInterval = 5 * time.Second
	}
	if opts.KeepaliveTimeout <= 0 {
		opts.KeepaliveTimeout = 20 * time.Second
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	var idb [16]byte
	_, _ = rand.Read(idb[:])
	id := hex.EncodeToString(idb[:])
	c := &Client{
		conn:  conn,
		fw:    proto.NewFrameWriter(conn),
		dec:   proto.NewDecoder(conn),
		log:   log,
		calls: make(map[uint32]*call),
		done:  make(chan struct{}),
	}
	hello := proto.Frame{Type: proto.TypeHello, Payload: proto.Marshal(proto.Hello{ID: id, Version: proto.Version})}

	type result struct {
		ack     proto.HelloAck
		skipped int
		err     error
	}
	res := make(chan result, 1)
	acked := make(chan struct{})
	writerDone := make(chan struct{})
	go func() {
		defer close(writerDone)
		t := time.NewTicker(opts.HelloInterval)
		defer t.Stop()
		for {
			if err := c.fw.Send(hello); err != nil {
				return // the reader sees the broken conn too, or ctx ends
			}
			select {
			case <-acked:
				return
			case <-t.C:
			}
			select {
			case <-acked:
				return
			default:
				log.Debug("agent hello not acknowledged yet, re-sending", "id", id)
			}
		}
	}()
	go func() {
		skipped := 0
		for {
			n, err := c.dec.Resync()
			skipped += n
			if err != nil {
				res <- result{err: err, skipped: skipped}
				return
			}
			f, err := c.dec.ReadFrame()
			if err != nil {
				if errors.Is(err, proto.ErrBadFrame) {
					continue
				}
				res <- result{err: err, skipped: skipped}
				return
			}
			if f.Type != proto.TypeHelloAck {
				continue
			}
			var ack proto.HelloAck
			if proto.Unmarshal(f.Payload, &ack) != nil || ack.ID != id {
				continue // an ack for an older connection
			}
			res <- result{ack: ack, skipped: skipped}
			return
		}
	}()

	var r result
	select {
	case r = <-res:
	case <-ctx.Done():
		_ = conn.Close()
		<-res
		close(acked)
		<-writerDone
		return nil, fmt.Errorf("agent hello: %w", ctx.Err())
	}
	close(acked)
	if r.err == nil {
		// No HELLO goes out after Connect returns. One re-sent after the
		// agent acked is ignored by it (same id).
		<-writerDone
	}
	if r.err != nil {
		_ = conn.Close()
		<-writerDone
		return nil, fmt.Errorf("agent hello: %w: %w", ErrClosed, r.err)
	}
	if r.ack.Version != proto.Version {
		_ = conn.Close()
		<-writerDone
		return nil, fmt.Errorf("agent speaks protocol version %d, want %d: %w", r.ack.Version, proto.Version, errdefs.ErrUnavailable)
	}
	c.ack = r.ack
	c.mux = proto.NewMux(c.fw, proto.HostSide)
	log.Debug("agent connected", "id", id, "agent_version", r.ack.AgentVersion, "skipped_bytes", r.skipped)
	c.lastFrame.Store(time.Now().UnixNano())
	go c.readLoop()
	go c.keepalive(opts.KeepaliveInterval, opts.KeepaliveTimeout)
	return c, nil
}

// keepalive pings the agent when a call is pending and no frame arrived
// for interval, and closes the connection when the ping is not answered
// within timeout. An idle connection is never pinged (a restored or
// paused guest must not be woken for nothing); a dead one is found by the
// next call.
func (c *Client) keepalive(interval, timeout time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-c.done:
			return
		case <-t.C:
		}
		c.mu.Lock()
		pending := len(c.calls)
		var sent []uint32
		for id, cl := range c.calls {
			if cl.sent.Load() {
				sent = append(sent, id)
			}
		}
		c.mu.Unlock()
		if pending == 0 || time.Since(time.Unix(0, c.lastFrame.Load())) < interval {
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		var res proto.PingResult
		err := c.unary(ctx, proto.Open{Kind: proto.KindPing}, &res)
		cancel()
		if errors.Is(err, context.DeadlineExceeded) {
			c.log.Warn("agent did not answer a keepalive ping; closing the connection", "timeout", timeout, "pending_calls", pending)
			c.shutdown(fmt.Errorf("%w: no answer to a ping within %s while %d request(s) waited", ErrUnresponsive, timeout, pending))
			return
		}
		if err == nil && c.HasFeature(proto.FeatureStreamList) {
			c.failUnknown(sent, res.Streams)
		}
	}
}

// failUnknown fails the calls among sent (whose OPEN went out before the
// ping) that the agent did not list in its answer and that got no EXIT
// meanwhile: their OPEN never reached it (something else in the guest
// read the agent's port), and no answer will ever come.
func (c *Client) failUnknown(sent, known []uint32) {
	k := make(map[uint32]bool, len(known))
	for _, id := range known {
		k[id] = true
	}
	for _, id := range sent {
		if k[id] {
			continue
		}
		if cl := c.takeCall(id); cl != nil {
			c.log.Warn("the agent does not know a pending request; failing it", "stream", id)
			cl.st.Abort(fmt.Errorf("%w: the request never reached it (stream %d is unknown to the agent; a process in the guest may be reading the agent's port)", ErrUnresponsive, id))
		}
	}
}

// Agent returns the agent's HELLO_ACK: its version, boot id and pid.
func (c *Client) Agent() proto.HelloAck { return c.ack }

// HasFeature reports whether the agent announced feature (a
// proto.Feature* constant) in its HELLO_ACK.
func (c *Client) HasFeature(feature string) bool { return slices.Contains(c.ack.Features, feature) }

// Done is closed when the connection is gone.
func (c *Client) Done() <-chan struct{} { return c.done }

// Err returns why the connection is gone, or nil while it is up. The error
// wraps ErrClosed.
func (c *Client) Err() error {
	select {
	case <-c.done:
		return c.err
	default:
		return nil
	}
}

// Close closes the connection. Every pending call and process fails with an
// error wrapping ErrClosed.
func (c *Client) Close() error {
	c.shutdown(errors.New("closed by the host"))
	return nil
}

func (c *Client) shutdown(cause error) {
	c.closeOnce.Do(func() {
		c.err = fmt.Errorf("%w: %w", ErrClosed, cause)
		_ = c.conn.Close()
		c.mux.Close(c.err)
		c.mu.Lock()
		c.calls = map[uint32]*call{}
		c.mu.Unlock()
		close(c.done)
	})
}

func (c *Client) readLoop() {
	for {
		f, err := c.dec.ReadFrame()
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = errors.New("agent hung up")
			}
			c.shutdown(fmt.Errorf("reading from agent: %w", err))
			return
		}
		c.lastFrame.Store(time.Now().UnixNano())
		switch f.Type {
		case proto.TypeData, proto.TypeEOF, proto.TypeWindow:
			if err := c.mux.Dispatch(f); err != nil {
				c.shutdown(err)
				return
			}
		case proto.TypeExit:
			var e proto.Exit
			if err := proto.Unmarshal(f.Payload, &e); err != nil {
				e = proto.Exit{Code: -1, Error: fmt.Sprintf("bad EXIT from agent: %v", err)}
			}
			if cl := c.takeCall(f.Stream); cl != nil {
				cl.exit <- e
				cl.st.Abort(ErrExited)
			}
		case proto.TypeReset:
			var r proto.Reset
			_ = proto.Unmarshal(f.Payload, &r)
			if f.Stream == 0 {
				c.shutdown(fmt.Errorf("agent dropped the connection: %s", r.Error))
				return
			}
			if cl := c.takeCall(f.Stream); cl != nil {
				cl.st.Abort(fmt.Errorf("agent reset stream %d: %s", f.Stream, r.Error))
			}
		default:
			c.log.Debug("ignoring unexpected frame from agent", "frame", f.String())
		}
	}
}

func (c *Client) takeCall(id uint32) *call {
	c.mu.Lock()
	defer c.mu.Unlock()
	cl := c.calls[id]
	delete(c.calls, id)
	return cl
}

// open allocates a stream, registers it and sends its OPEN frame.
func (c *Client) open(ctx context.Context, o proto.Open) (*call, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := c.Err(); err != nil {
		return nil, err
	}
	id := c.nextID.Add(1)
	st, err := c.mux.Open(id)
	if err != nil {
		return nil, c.connErr(err)
	}
	cl := &call{st: st, exit: make(chan proto.Exit, 1)}
	c.mu.Lock()
	c.calls[id] = cl
	c.mu.Unlock()
	if err := st.Send(proto.TypeOpen, proto.Marshal(o)); err != nil {
		c.takeCall(id)
		st.Abort(err)
		return nil, c.connErr(fmt.Errorf("sending %s request: %w", o.Kind, err))
	}
	cl.sent.Store(true)
	return cl, nil
}

// connErr prefers the connection's own error, which says why it is gone.
func (c *Client) connErr(err error) error {
	if cerr := c.Err(); cerr != nil {
		return cerr
	}
	return err
}

// wait waits for the call's EXIT, the stream's abort or ctx. When ctx ends
// first the stream is reset (the agent stops the work) and ctx's error is
// returned.
func (c *Client) wait(ctx context.Context, cl *call) (proto.Exit, error) {
	select {
	case e := <-cl.exit:
		// The read loop aborts the stream right after handing over the
		// EXIT: once wait returns, controls (Signal) fail with ErrExited.
		<-cl.st.Done()
		return e, nil
	case <-cl.st.Done():
	case <-ctx.Done():
		select {
		case e := <-cl.exit:
			return e, nil
		default:
		}
		c.takeCall(cl.st.ID())
		cl.st.Reset(ctx.Err())
		return proto.Exit{}, ctx.Err()
	}
	select {
	case e := <-cl.exit:
		return e, nil
	default:
	}
	return proto.Exit{}, c.connErr(cl.st.Err())
}

// unary runs a request whose reply is a single EXIT frame and decodes its
// result into out (if non-nil). An EXIT with Error set becomes an error; the
// result is decoded either way.
func (c *Client) unary(ctx context.Context, o proto.Open, out any) error {
	cl, err := c.open(ctx, o)
	if err != nil {
		return fmt.Errorf("agent %s: %w", o.Kind, err)
	}
	e, err := c.wait(ctx, cl)
	if err != nil {
		return fmt.Errorf("agent %s: %w", o.Kind, err)
	}
	if out != nil && len(e.Result) > 0 {
		if err := proto.Unmarshal(e.Result, out); err != nil {
			return fmt.Errorf("agent %s: %w", o.Kind, err)
		}
	}
	if e.Error != "" || e.Code != 0 {
		return fmt.Errorf("agent %s failed (code %d): %s", o.Kind, e.Code, e.Error)
	}
	return nil
}

// Ping checks that the agent answers on this connection.
func (c *Client) Ping(ctx context.Context) error {
	return c.unary(ctx, proto.Open{Kind: proto.KindPing}, nil)
}

// Info returns the agent's version and the guest's kernel, boot id and uptime.
func (c *Client) Info(ctx context.Context) (proto.Info, error) {
	var info proto.Info
	err := c.unary(ctx, proto.Open{Kind: proto.KindInfo}, &info)
	return info, err
}

// Sync sets the guest clock, reseeds its RNG and applies the network
// identity in s (see proto.Sync). The result says what was done; if some
// step failed, the result lists it and an error is returned as well.
func (c *Client) Sync(ctx context.Context, s proto.Sync) (proto.SyncResult, error) {
	var r proto.SyncResult
	err := c.unary(ctx, proto.Open{Kind: proto.KindSync, Sync: &s}, &r)
	return r, err
}

// Put extracts the tar stream read from tarStream into dstDir in the guest
// (created if missing). Entries that would land outside dstDir, through
// ".." or symlinks, make the put fail; entries before the bad one stay.
// Modes and modification times are kept.
func (c *Client) Put(ctx context.Context, dstDir string, tarStream io.Reader) (proto.PutResult, error) {
	var res proto.PutResult
	cl, err := c.open(ctx, proto.Open{Kind: proto.KindPut, Put: &proto.PutRequest{Dir: dstDir}})
	if err != nil {
		return res, fmt.Errorf("agent put %s: %w", dstDir, err)
	}
	stop := context.AfterFunc(ctx, func() { cl.st.Reset(ctx.Err()) })
	defer stop()
	w := cl.st.Writer(proto.ChanStdin)
	_, cerr := io.Copy(w, tarStream)
	if cerr == nil {
		cerr = w.Close()
	}
	// The agent may have answered (an error) before taking all input.
	e, err := c.wait(ctx, cl)
	if err != nil {
		if cerr != nil && !errors.Is(cerr, ErrExited) {
			err = cerr
		}
		return res, fmt.Errorf("agent put %s: %w", dstDir, err)
	}
	if len(e.Result) > 0 {
		_ = proto.Unmarshal(e.Result, &res)
	}
	if e.Error != "" || e.Code != 0 {
		return res, fmt.Errorf("agent put %s: %s", dstDir, e.Error)
	}
	// The agent may finish at the tar end-of-archive marker before our EOF
	// arrives; writes then fail with ErrExited, which is no error.
	if cerr != nil && !errors.Is(cerr, ErrExited) {
		return res, fmt.Errorf("agent put %s: reading tar stream: %w", dstDir, cerr)
	}
	return res, nil
}

// Get returns a tar stream of path in the guest (a file, or a directory
// with everything below it; symlinks are stored, not followed). Entry names
// start with path's base name. Get fails immediately when path cannot be
// read; a later failure is returned by Read instead of io.EOF. Close the
// reader to release the stream; closing early aborts the transfer.
func (c *Client) Get(ctx context.Context, path string) (io.ReadCloser, error) {
	cl, err := c.open(ctx, proto.Open{Kind: proto.KindGet, Get: &proto.GetRequest{Path: path}})
	if err != nil {
		return nil, fmt.Errorf("agent get %s: %w", path, err)
	}
	stop := context.AfterFunc(ctx, func() { cl.st.Reset(ctx.Err()) })
	defer stop()
	g := &getReader{c: c, cl: cl, path: path}
	// Wait for the first bytes or the end, so a missing path fails here.
	buf := make([]byte, 32<<10)
	n, rerr := cl.st.Read(proto.ChanStdout, buf)
	g.first = buf[:n]
	if rerr != nil {
		if err := g.finish(ctx, rerr); err != io.EOF {
			return nil, err
		}
		g.err = io.EOF
	}
	return g, nil
}

type getReader struct {
	c     *Client
	cl    *call
	path  string
	first []byte
	err   error
	once  sync.Once
}

// finish turns the end of the data channel into the final error: io.EOF on
// success, the agent's error otherwise.
func (g *getReader) finish(ctx context.Context, rerr error) error {
	if rerr != io.EOF {
		if ctx.Err() != nil {
			return fmt.Errorf("agent get %s: %w", g.path, ctx.Err())
		}
		// Aborted: ErrExited means EXIT arrived, which we read below.
		if !errors.Is(rerr, ErrExited) {
			return fmt.Errorf("agent get %s: %w", g.path, g.c.connErr(rerr))
		}
	}
	e, err := g.c.wait(ctx, g.cl)
	if err != nil {
		return fmt.Errorf("agent get %s: %w", g.path, err)
	}
	if e.Error != "" || e.Code != 0 {
		return fmt.Errorf("agent get %s: %s", g.path, e.Error)
	}
	return io.EOF
}

func (g *getReader) Read(p []byte) (int, error) {
	if len(g.first) > 0 {
		n := copy(p, g.first)
		g.first = g.first[n:]
		return n, nil
	}
	if g.err != nil {
		return 0, g.err
	}
	n, err := g.cl.st.Read(proto.ChanStdout, p)
	if err != nil {
		g.err = g.finish(context.Background(), err)
		if n > 0 {
			return n, nil
		}
		return 0, g.err
	}
	return n, nil
}

func (g *getReader) Close() error {
	g.once.Do(func() {
		if g.err == nil {
			g.c.takeCall(g.cl.st.ID())
			g.cl.st.Reset(errors.New("get closed by the host"))
		}
	})
	return nil
}
