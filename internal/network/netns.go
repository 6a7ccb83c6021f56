package network

import (
	"context"
	"fmt"
	"net"
	"runtime"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// nsNone is the "no namespace given" handle: work in the namespace of the
// calling thread, which for noid-server is the host's.
func nsNone() netns.NsHandle { return netns.None() }

// newHandle opens a netlink handle whose sockets live in ns (or in the
// caller's namespace when ns is nsNone()).
func newHandle(ns netns.NsHandle) (*netlink.Handle, error) {
	if ns.IsOpen() {
		h, err := netlink.NewHandleAt(ns)
		if err != nil {
			return nil, fmt.Errorf("netlink handle in netns: %w", err)
		}
		return h, nil
	}
	h, err := netlink.NewHandle()
	if err != nil {
		return nil, fmt.Errorf("netlink handle: %w", err)
	}
	return h, nil
}

// inNS runs fn on an OS thread that has been switched into ns, for the few
// things that are bound to the calling thread's namespace rather than to a
// netlink socket: creating TAPs (/dev/net/tun), /proc/sys/net and sockets.
// If ns is not open, fn runs directly.
//
// fn runs on a dedicated goroutine locked to its thread; if the thread
// cannot be switched back, the goroutine exits still locked, which makes
// the Go runtime destroy the thread, so no other goroutine ever runs in the
// wrong namespace.
func inNS(ns netns.NsHandle, fn func() error) error {
	if !ns.IsOpen() {
		return fn()
	}
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("get current netns: %w", err)
			return
		}
		defer orig.Close()
		if err := netns.Set(ns); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("enter netns: %w", err)
			return
		}
		ferr := fn()
		if err := netns.Set(orig); err != nil {
			// Stay locked: the thread dies with this goroutine.
			errc <- fmt.Errorf("leave netns: %w", err)
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// nsDialer dials from inside ns (or normally when ns is not open).
func nsDialer(ns netns.NsHandle) func(ctx context.Context, network, addr string) (net.Conn, error) {
	var d net.Dialer
	if !ns.IsOpen() {
		return d.DialContext
	}
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		var c net.Conn
		err := inNS(ns, func() error {
			var err error
			c, err = d.DialContext(ctx, network, addr)
			return err
		})
		return c, err
	}
}

// InNamespace runs fn on an OS thread switched into ns (directly when ns
// is not open), as inNS: for a child process to start in ns (a child
// inherits the namespace of the thread that forks it), pass its Start.
func InNamespace(ns netns.NsHandle, fn func() error) error { return inNS(ns, fn) }

// NewNamespace creates a new, empty network namespace and returns a handle
// to it; the namespace lives until the handle is closed and no process is
// left in it. The calling goroutine's thread stays where it was.
func NewNamespace() (netns.NsHandle, error) {
	var h netns.NsHandle
	err := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, gerr := netns.Get()
		if gerr != nil {
			runtime.UnlockOSThread()
			err <- fmt.Errorf("get current netns: %w", gerr)
			return
		}
		defer orig.Close()
		var nerr error
		h, nerr = netns.New() // unshare(CLONE_NEWNET) on this thread
		if serr := netns.Set(orig); serr != nil {
			// Stay locked: the thread dies with this goroutine.
			err <- fmt.Errorf("leave the new netns: %w", serr)
			return
		}
		runtime.UnlockOSThread()
		if nerr != nil {
			nerr = fmt.Errorf("new netns: %w", nerr)
		}
		err <- nerr
	}()
	if e := <-err; e != nil {
		if h.IsOpen() {
			h.Close()
		}
		return netns.None(), e
	}
	return h, nil
}
