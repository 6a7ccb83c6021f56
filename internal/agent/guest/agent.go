// Package guest is the guest side of the agent protocol: noid-agent's
// services (exec, console, sync, info, file put and get), its transports
// (virtio-serial port, vsock, unix socket) and, when it runs as PID 1, its
// duties as init (mounts, modules, switch root, reaping).
//
// One Agent serves any number of transports, but only one host connection
// (session) is live at a time: every HELLO with a new id replaces the
// previous session, whose processes get SIGHUP and whose streams die.
package guest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/noid-vm/noid/internal/agent/proto"
)

// Version is the agent's build version, reported in HELLO_ACK and Info.
// The build may override it with -ldflags "-X ...guest.Version=...".
var Version = "dev"

// Config configures an Agent. The zero value is usable for tests (but see
// System and ReapAll).
type Config struct {
	// Logger receives the agent's logs; nil discards them.
	Logger *slog.Logger
	// System performs the privileged operations of sync (clock, entropy,
	// hostname, network). Nil selects the real Linux implementation; tests
	// pass a fake so that they never touch the machine's clock.
	System System
	// EtcDir is where hostname, hosts and resolv.conf live; default /etc.
	EtcDir string
	// ReapAll makes the agent reap every child of the process (wait4(-1)),
	// as init must. Leave it false when the agent is not PID 1: it would
	// steal the exit status of every other child of the process.
	ReapAll bool
	// DrainTimeout is how long output is still read after a process
	// exited, for children that keep its stdout open. Default 250ms.
	DrainTimeout time.Duration
	// StallTimeout is how long a half-received frame may wait for its
	// remaining bytes before the agent gives up on it and rescans for a
	// sync marker (only for transports with read deadlines). Default 1.5s.
	StallTimeout time.Duration
	// Init records that the agent runs as PID 1 (reported by Info).
	Init bool
	// RootSwitched records that the agent switched to the root disk.
	RootSwitched bool
}

// Agent serves the agent protocol. Create it with New.
type Agent struct {
	cfg    Config
	log    *slog.Logger
	sys    System
	reaper *Reaper

	mu       sync.Mutex
	cur      *session
	sessions atomic.Uint64
}

// New returns an Agent. With cfg.ReapAll it starts the global reaper.
func New(cfg Config) *Agent {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.EtcDir == "" {
		cfg.EtcDir = "/etc"
	}
	if cfg.DrainTimeout <= 0 {
		cfg.DrainTimeout = 250 * time.Millisecond
	}
	if cfg.StallTimeout <= 0 {
		cfg.StallTimeout = 1500 * time.Millisecond
	}
	sys := cfg.System
	if sys == nil {
		sys = NewLinuxSystem()
	}
	return &Agent{cfg: cfg, log: cfg.Logger, sys: sys, reaper: NewReaper(cfg.ReapAll, cfg.Logger)}
}

// Reaper returns the agent's child reaper.
func (a *Agent) Reaper() *Reaper { return a.reaper }

// transport is one byte stream the agent reads frames from.
type transport struct {
	name string
	r    io.Reader
	fw   *proto.FrameWriter
	// closer ends a socket transport when its session is replaced; nil for
	// a port, which stays open forever.
	closer io.Closer
	// hangup is returned by r when the host side went away but the
	// transport itself stays usable (virtio-serial).
	hangup error
}

// errHostGone is returned by a port reader when the host closed its side.
var errHostGone = errors.New("host closed the port")

// ServeConn serves one host connection (an accepted unix or vsock socket)
// until it ends, then closes it. Its session is replaced as soon as any
// transport receives a newer HELLO, which also closes conn.
func (a *Agent) ServeConn(ctx context.Context, conn io.ReadWriteCloser) error {
	defer conn.Close()
	t := &transport{name: "conn", r: conn, fw: proto.NewFrameWriter(conn), closer: conn}
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	return a.serve(ctx, t)
}

// Listener accepts host connections. It is satisfied by an adapted
// net.Listener (see NetListener) and by the vsock listener.
type Listener interface {
	Accept() (io.ReadWriteCloser, error)
	Close() error
}

// ServeListener accepts connections from l and serves each one with
// ServeConn until ctx ends or l fails. It closes l.
func (a *Agent) ServeListener(ctx context.Context, l Listener) error {
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()
	defer l.Close()
	for {
		conn, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return fmt.Errorf("accepting host connection: %w", err)
		}
		go func() {
			if err := a.ServeConn(ctx, conn); err != nil && ctx.Err() == nil {
				a.log.Debug("host connection ended", "err", err)
			}
		}()
	}
}

// serve is the read loop of one transport. It scans for a HELLO, then reads
// frames of the session it started until the transport fails, the framing
// breaks (then it scans again) or another HELLO arrives.
func (a *Agent) serve(ctx context.Context, t *transport) error {
	dec := proto.NewDecoder(t.r)
	dec.StallTimeout = a.cfg.StallTimeout
	var sess *session
	scanning := true
	for {
		if ctx.Err() != nil {
			a.drop(sess, ctx.Err(), false)
			return ctx.Err()
		}
		var f proto.Frame
		var err error
		if scanning {
			var skipped int
			skipped, err = dec.Resync()
			if skipped > 0 {
				a.log.Debug("skipped bytes before sync marker", "transport", t.name, "bytes", skipped)
			}
			if err == nil {
				f, err = dec.ReadFrame()
			}
		} else {
			f, err = dec.ReadFrame()
		}
		if err != nil {
			switch {
			case errors.Is(err, proto.ErrBadFrame), errors.Is(err, proto.ErrStalled):
				if !scanning {
					a.log.Warn("lost frame boundaries, dropping the connection and rescanning", "transport", t.name, "err", err)
					a.drop(sess, err, true)
					sess, scanning = nil, true
				}
				continue
			case t.hangup != nil && errors.Is(err, t.hangup):
				if sess != nil {
					a.log.Info("host left", "transport", t.name)
				}
				a.drop(sess, err, false)
				sess, scanning = nil, true
				dec.Reset()
				continue
			default:
				a.drop(sess, err, false)
				if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
					return nil
				}
				return fmt.Errorf("reading from %s: %w", t.name, err)
			}
		}
		if f.Type == proto.TypeHello {
			var h proto.Hello
			if err := proto.Unmarshal(f.Payload, &h); err != nil || h.ID == "" {
				a.log.Warn("ignoring malformed HELLO", "transport", t.name)
				continue
			}
			if sess != nil && !scanning && sess.id == h.ID && !sess.isClosed() {
				continue // a re-sent HELLO of the live connection
			}
			sess = a.startSession(t, h)
			scanning = sess == nil
			continue
		}
		if scanning {
			continue // only a HELLO may follow a marker we scanned for
		}
		if sess.isClosed() {
			// Replaced by a HELLO on another transport.
			sess, scanning = nil, true
			if t.closer != nil {
				return nil
			}
			continue
		}
		sess.handle(f)
	}
}

// startSession replaces the current session with a new one on t and
// acknowledges the HELLO.
func (a *Agent) startSession(t *transport, h proto.Hello) *session {
	n := a.sessions.Add(1)
	a.mu.Lock()
	old := a.cur
	t.fw.Advance() // old senders on this transport go quiet
	send := t.fw.Bind()
	s := &session{a: a, id: h.ID, n: n, t: t, send: send,
		mux:      proto.NewMux(send, proto.GuestSide),
		handlers: make(map[uint32]*handler)}
	a.cur = s
	a.mu.Unlock()
	if old != nil {
		old.close(fmt.Errorf("%w (new host connection)", proto.ErrStale))
		if old.t != t && old.t.closer != nil {
			old.t.closer.Close()
		}
	}
	ack := proto.HelloAck{ID: h.ID, Version: proto.Version, AgentVersion: Version, BootID: bootID(), PID: os.Getpid(), Features: proto.Features}
	if err := send.Send(proto.Frame{Type: proto.TypeHelloAck, Payload: proto.Marshal(ack)}); err != nil {
		a.log.Warn("cannot acknowledge HELLO", "transport", t.name, "err", err)
		s.close(err)
		return nil
	}
	a.log.Info("host connected", "transport", t.name, "session", n, "host_version", h.Version)
	return s
}

// drop ends sess if it is still current. With notify, the host is told with
// a RESET on stream 0 that it must reconnect.
func (a *Agent) drop(sess *session, cause error, notify bool) {
	if sess == nil {
		return
	}
	a.mu.Lock()
	if a.cur == sess {
		a.cur = nil
	}
	a.mu.Unlock()
	if notify {
		_ = sess.send.Send(proto.Frame{Type: proto.TypeReset, Payload: proto.Marshal(proto.Reset{Error: "agent lost frame boundaries: " + cause.Error()})})
	}
	sess.close(cause)
}

// bootID returns the kernel's boot id, or "" if unavailable.
func bootID() string {
	b, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return ""
	}
	return string(trimNL(b))
}

func trimNL(b []byte) []byte {
	for len(b) > 0 && (b[len(b)-1] == '\n' || b[len(b)-1] == ' ') {
		b = b[:len(b)-1]
	}
	return b
}
