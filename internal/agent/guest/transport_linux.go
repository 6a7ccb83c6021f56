package guest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/noid-vm/noid/internal/agent/proto"
)

// PortName is the virtio-serial port name the agent serves on.
const PortName = "noid.agent"

// ServePort serves a long-lived port such as a virtio-serial character
// device, which the agent opens once and keeps open forever (reopening it
// loses data). A read of zero bytes means the host side went away: the
// agent drops the session, keeps the port, waits for the host to come back
// (SIGIO from the driver when port is an *os.File, plus a short polling
// backoff) and scans for the next HELLO. Writes made while no host is
// connected block in the driver until one connects. ServePort returns only
// when ctx ends or the port fails for good.
func (a *Agent) ServePort(ctx context.Context, port io.ReadWriter) error {
	pr := &portReader{r: port, ctx: ctx}
	if dl, ok := port.(deadliner); ok {
		pr.dl = dl
		stop := context.AfterFunc(ctx, func() { _ = dl.SetReadDeadline(time.Unix(1, 0)) })
		defer stop()
	}
	if f, ok := port.(*os.File); ok {
		pr.file = f
		pr.sigio = make(chan os.Signal, 1)
		signal.Notify(pr.sigio, syscall.SIGIO)
		defer signal.Stop(pr.sigio)
		defer pr.setAsync(false)
	}
	t := &transport{name: "port", r: pr, fw: proto.NewFrameWriter(port), hangup: errHostGone}
	return a.serve(ctx, t)
}

type deadliner interface {
	SetReadDeadline(time.Time) error
}

// portReader turns "read returned 0 bytes" into one errHostGone, then waits
// for the host to return instead of spinning.
type portReader struct {
	r     io.Reader
	dl    deadliner
	ctx   context.Context
	file  *os.File
	sigio chan os.Signal
	async bool
	gone  bool
	delay time.Duration
}

func (p *portReader) SetReadDeadline(t time.Time) error {
	if p.dl == nil {
		return errors.ErrUnsupported
	}
	if p.ctx.Err() != nil {
		return nil // keep the cancellation deadline
	}
	return p.dl.SetReadDeadline(t)
}

func (p *portReader) Read(b []byte) (int, error) {
	for {
		n, err := p.r.Read(b)
		if n > 0 {
			if p.gone {
				p.gone = false
				p.setAsync(false)
			}
			return n, nil
		}
		if err != nil && !errors.Is(err, io.EOF) {
			if p.ctx.Err() != nil {
				return 0, p.ctx.Err()
			}
			return 0, err
		}
		if !p.gone {
			p.gone = true
			p.delay = 2 * time.Millisecond
			return 0, errHostGone
		}
		if err := p.waitHost(); err != nil {
			return 0, err
		}
	}
}

// waitHost waits for a sign that the host may be back: SIGIO, or the next
// step of a backoff capped at 100ms.
func (p *portReader) waitHost() error {
	if p.file != nil && !p.async {
		p.setAsync(true)
		return nil // re-read once after arming SIGIO, to close the race
	}
	t := time.NewTimer(p.delay)
	defer t.Stop()
	select {
	case <-p.sigio:
	case <-t.C:
		p.delay = min(2*p.delay, 100*time.Millisecond)
	case <-p.ctx.Done():
		return p.ctx.Err()
	}
	return nil
}

// setAsync turns O_ASYNC (SIGIO on port open, close and data) on or off.
func (p *portReader) setAsync(on bool) {
	if p.file == nil || p.async == on {
		return
	}
	rc, err := p.file.SyscallConn()
	if err != nil {
		return
	}
	_ = rc.Control(func(fd uintptr) {
		if on {
			_, _ = unix.FcntlInt(fd, unix.F_SETOWN, os.Getpid())
		}
		fl, err := unix.FcntlInt(fd, unix.F_GETFL, 0)
		if err != nil {
			return
		}
		if on {
			fl |= unix.O_ASYNC
		} else {
			fl &^= unix.O_ASYNC
		}
		_, _ = unix.FcntlInt(fd, unix.F_SETFL, fl)
	})
	p.async = on
}

// FindPort returns the /dev path of the virtio-serial port called name, by
// reading /sys/class/virtio-ports/*/name.
func FindPort(name string) (string, error) {
	names, err := filepath.Glob("/sys/class/virtio-ports/*/name")
	if err != nil {
		return "", err
	}
	for _, n := range names {
		b, err := os.ReadFile(n)
		if err != nil {
			continue
		}
		if strings.TrimSpace(string(b)) == name {
			return filepath.Join("/dev", filepath.Base(filepath.Dir(n))), nil
		}
	}
	return "", fmt.Errorf("no virtio-serial port named %q: %w", name, os.ErrNotExist)
}

// WaitPort polls for the virtio-serial port called name (and its device
// node) until it appears or ctx ends.
func WaitPort(ctx context.Context, name string) (string, error) {
	delay := time.Millisecond
	for {
		if p, err := FindPort(name); err == nil {
			if _, err := os.Stat(p); err == nil {
				return p, nil
			}
		}
		select {
		case <-ctx.Done():
			return "", fmt.Errorf("waiting for virtio-serial port %q: %w", name, ctx.Err())
		case <-time.After(delay):
		}
		delay = min(2*delay, 50*time.Millisecond)
	}
}

// OpenPort opens a port device (or any character device or socket path
// usable as one) read-write, for ServePort.
func OpenPort(path string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		return nil, fmt.Errorf("opening port %s: %w", path, err)
	}
	return f, nil
}

// NetListener adapts a net.Listener (unix socket, for tests and
// development) to a Listener.
func NetListener(l net.Listener) Listener { return netListener{l} }

type netListener struct{ l net.Listener }

func (n netListener) Accept() (io.ReadWriteCloser, error) { return n.l.Accept() }
func (n netListener) Close() error                        { return n.l.Close() }

// ListenVsock listens for host connections on vsock port (any CID).
func ListenVsock(port uint32) (Listener, error) {
	fd, err := unix.Socket(unix.AF_VSOCK, unix.SOCK_STREAM|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0)
	if err != nil {
		return nil, fmt.Errorf("creating vsock socket: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrVM{CID: unix.VMADDR_CID_ANY, Port: port}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("binding vsock port %d: %w", port, err)
	}
	if err := unix.Listen(fd, 16); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("listening on vsock port %d: %w", port, err)
	}
	return &vsockListener{f: os.NewFile(uintptr(fd), fmt.Sprintf("vsock:%d", port))}, nil
}

type vsockListener struct{ f *os.File }

func (l *vsockListener) Accept() (io.ReadWriteCloser, error) {
	rc, err := l.f.SyscallConn()
	if err != nil {
		return nil, err
	}
	var nfd int
	var aerr error
	err = rc.Read(func(fd uintptr) bool {
		nfd, _, aerr = unix.Accept4(int(fd), unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK)
		return !errors.Is(aerr, unix.EAGAIN)
	})
	if err != nil {
		return nil, err
	}
	if aerr != nil {
		return nil, aerr
	}
	return os.NewFile(uintptr(nfd), "vsock-conn"), nil
}

func (l *vsockListener) Close() error { return l.f.Close() }
