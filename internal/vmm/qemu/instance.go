package qemu

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/noid-vm/noid/internal/sandbox"
	"github.com/noid-vm/noid/internal/vmm"
)

// Instance is one running QEMU process. It implements vmm.Instance.
type Instance struct {
	spec vmm.Spec
	pid  int
	qmp  *QMP
	done chan struct{}

	pidfd *os.File

	// prepared is set for a VMM waiting for its snapshot's state (Load).
	prepared *preparedState
	// prepTimings are the times Prepare took (laying out the files,
	// starting the process).
	prepTimings vmm.Timings

	preMu   sync.Mutex
	preconn net.Conn // agent connection made at spawn, handed out once

	b      *Backend        // for the sandbox clean-up (nil in tests)
	cg     *sandbox.Cgroup // the QEMU's cgroup, removed once it has exited
	sbOnce sync.Once

	mu sync.Mutex // serialises state-changing operations (checkpoint, pause, resume)

	// ioStopped is signalled when QEMU stopped the guest on a disk write
	// error (BLOCK_IO_ERROR with action stop); nospace is set while the
	// guest waits, paused, for space (see watchSpace).
	ioStopped chan struct{}
	nospace   atomic.Bool
}

var (
	_ vmm.Instance    = (*Instance)(nil)
	_ vmm.SpaceWaiter = (*Instance)(nil)
)

// attach watches pid and connects to its QMP socket. b and cg (either may
// be nil) are the backend and cgroup whose sandbox the instance releases
// once the process has exited; if attach fails, the caller cleans up.
func attach(ctx context.Context, spec vmm.Spec, pid int, b *Backend, cg *sandbox.Cgroup) (_ *Instance, err error) {
	inst := &Instance{spec: spec, pid: pid, done: make(chan struct{}), b: b, cg: cg}
	fd, err := unix.PidfdOpen(pid, unix.PIDFD_NONBLOCK)
	if err != nil {
		return nil, fmt.Errorf("watching qemu pid %d: %w", pid, err)
	}
	inst.pidfd = os.NewFile(uintptr(fd), "pidfd")
	defer func() {
		if err != nil {
			inst.sbOnce.Do(func() {}) // the caller's to clean up, not the watcher's
		}
	}()
	go inst.watch()

	// The QMP socket was created before QEMU started, so connecting never
	// races with start-up: the greeting arrives once QEMU is ready. If QEMU
	// dies first, its listening socket closes and the dial fails.
	dctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	go func() {
		select {
		case <-inst.done:
			cancel()
		case <-dctx.Done():
		}
	}()
	q, err := DialQMP(dctx, qmpPath(spec))
	if err != nil {
		select {
		case <-inst.done:
			return nil, fmt.Errorf("qemu pid %d exited during start-up", pid)
		default:
		}
		return nil, fmt.Errorf("connecting to qemu pid %d: %w", pid, err)
	}
	inst.qmp = q
	inst.ioStopped = make(chan struct{}, 1)
	q.OnEvent(inst.noteEvent)
	go inst.watchSpace()
	return inst, nil
}

// watch closes done when the process exits, then removes its cgroup and
// releases its uid: a QEMU that died on its own (killed, crashed) must not
// keep them until its VM is destroyed or rewound, and an adopted one has no
// other watcher. The pidfd is pollable, so this waits in the runtime's
// poller rather than on an OS thread.
func (i *Instance) watch() {
	rc, err := i.pidfd.SyscallConn()
	if err != nil {
		close(i.done)
		return
	}
	rc.Read(func(fd uintptr) bool {
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		n, err := unix.Poll(fds, 0)
		if err == unix.EINTR {
			return false
		}
		return err != nil || n > 0
	})
	close(i.done)
	i.pidfd.Close()
	i.cleanupSandbox()
}

// preparedState is the snapshot a prepared VMM waits for.
type preparedState struct {
	dir string
	// ignoreShared loads a format-0 snapshot, whose device state was
	// saved with x-ignore-shared (its RAM is the memory file alone).
	ignoreShared bool
}

// Load gives a prepared QEMU its snapshot's device state and resumes it.
func (i *Instance) Load(ctx context.Context) (vmm.Timings, error) {
	t, err := i.LoadPaused(ctx)
	if err != nil {
		return t, err
	}
	start := time.Now()
	if err := i.qmp.Execute(ctx, "cont", nil, nil); err != nil {
		return t, fmt.Errorf("resuming after loading snapshot state: %w", err)
	}
	t.Load += time.Since(start)
	t.Total = t.Load
	return t, nil
}

// LoadPaused gives a prepared QEMU its snapshot's device state and leaves
// its vCPUs stopped until Resume.
func (i *Instance) LoadPaused(ctx context.Context) (vmm.Timings, error) {
	var t vmm.Timings
	start := time.Now()
	p := i.prepared
	if p == nil {
		return t, fmt.Errorf("qemu for vm %s was not prepared for loading state", i.spec.Name)
	}
	if err := i.incomingPaused(ctx, filepath.Join(p.dir, vmm.SnapState), p.ignoreShared); err != nil {
		return t, fmt.Errorf("loading snapshot state: %w", err)
	}
	i.prepared = nil
	t.Load = time.Since(start)
	t.Total = t.Load
	return t, nil
}

// Moved records the new paths of the VM's files and its name.
func (i *Instance) Moved(spec vmm.Spec) {
	i.mu.Lock()
	defer i.mu.Unlock()
	i.spec.Name, i.spec.Dir = spec.Name, spec.Dir
	i.spec.Disk, i.spec.MemFile, i.spec.SerialLog = spec.Disk, spec.MemFile, spec.SerialLog
}

// ensureRunning resumes a VM that an earlier server left paused, for example
// by dying in the middle of a checkpoint. A VM still waiting for its
// incoming state never got it, so it is reported as broken.
func (i *Instance) ensureRunning(ctx context.Context) error {
	// A checkpoint cut short by the server's death leaves its migration
	// behind: streaming into a pipe nobody reads, or waiting, vCPUs
	// stopped, in pre-switchover for a continue that never comes.
	// Cancelling it resumes the VM.
	var ms migrationStatus
	if err := i.qmp.Execute(ctx, "query-migrate", nil, &ms); err != nil {
		return err
	}
	switch ms.Status {
	case "setup", "active", "pre-switchover", "device", "cancelling", "wait-unplug":
		if err := i.qmp.Execute(ctx, "migrate_cancel", nil, nil); err != nil {
			return fmt.Errorf("cancelling a checkpoint cut short: %w", err)
		}
		for ms.Status != "cancelled" && ms.Status != "failed" && ms.Status != "completed" {
			select {
			case <-ctx.Done():
				return fmt.Errorf("cancelling a checkpoint cut short: %w", ctx.Err())
			case <-time.After(2 * time.Millisecond):
			}
			if err := i.qmp.Execute(ctx, "query-migrate", nil, &ms); err != nil {
				return err
			}
		}
	}
	var st struct {
		Status string `json:"status"`
	}
	if err := i.qmp.Execute(ctx, "query-status", nil, &st); err != nil {
		return err
	}
	switch st.Status {
	case "running":
		return nil
	case "inmigrate":
		return fmt.Errorf("the vm was being restored when the server stopped and never received its state")
	}
	if err := i.contAfterMigration(ctx); err != nil {
		return fmt.Errorf("resuming vm left in state %s: %w", st.Status, err)
	}
	return nil
}

// Pid returns QEMU's pid.
func (i *Instance) Pid() int { return i.pid }

// Done is closed when QEMU has exited.
func (i *Instance) Done() <-chan struct{} { return i.done }

// DialAgent connects to the guest agent's virtio-serial chardev socket.
func (i *Instance) DialAgent(ctx context.Context) (net.Conn, error) {
	i.preMu.Lock()
	pre := i.preconn
	i.preconn = nil
	i.preMu.Unlock()
	if pre != nil {
		return pre, nil
	}
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", agentPath(i.spec))
	if err != nil {
		return nil, fmt.Errorf("connecting to agent socket of vm %s: %w", i.spec.Name, err)
	}
	return c, nil
}

func (i *Instance) alive() error {
	select {
	case <-i.done:
		return fmt.Errorf("qemu for vm %s has exited", i.spec.Name)
	default:
		return nil
	}
}

// Pause stops the vCPUs.
func (i *Instance) Pause(ctx context.Context) error {
	i.mu.Lock()
	defer i.mu.Unlock()
	return i.qmp.Execute(ctx, "stop", nil, nil)
}

// Resume restarts the vCPUs.
func (i *Instance) Resume(ctx context.Context) error {
	i.mu.Lock()
	defer i.mu.Unlock()
	return i.qmp.Execute(ctx, "cont", nil, nil)
}

// setMigrationCaps sets the migration capabilities this QEMU uses next,
// each on or off, and its migration parameters: no bandwidth limit (a
// migration here never leaves the host) and no announcements after an
// incoming one. QEMU otherwise has the guest's virtio-net announce itself
// five times in the first second after a load (a config interrupt each,
// and the guest kernel sends gratuitous ARP and neighbour advertisements):
// guest work on a cold translation cache, in the window where the agent
// syncs and the user's first command runs, announcing an identity that a
// clone's sync then replaces. The agent announces the address itself once
// it changed it, and a bridge learns a rewound VM's new TAP port from its
// first frame.
func (i *Instance) setMigrationCaps(ctx context.Context, caps map[string]bool) error {
	var list []map[string]any
	for name, on := range caps {
		list = append(list, map[string]any{"capability": name, "state": on})
	}
	if err := i.qmp.Execute(ctx, "migrate-set-capabilities", map[string]any{"capabilities": list}, nil); err != nil {
		return err
	}
	return i.qmp.Execute(ctx, "migrate-set-parameters", map[string]any{"max-bandwidth": int64(1) << 40, "announce-rounds": 0}, nil)
}

// incomingPaused loads the device state stream at path into a QEMU
// started with -S -incoming defer, which stays paused once it has loaded.
// ignoreShared loads a stream saved with x-ignore-shared.
func (i *Instance) incomingPaused(ctx context.Context, path string, ignoreShared bool) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("opening %s: %w", path, err)
	}
	defer f.Close()
	if err := i.setMigrationCaps(ctx, map[string]bool{"x-ignore-shared": ignoreShared}); err != nil {
		return err
	}
	if err := i.qmp.SendFD(ctx, "vmstate", f); err != nil {
		return err
	}
	if err := i.qmp.Execute(ctx, "migrate-incoming", map[string]any{"uri": "fd:vmstate"}, nil); err != nil {
		return err
	}
	return i.waitIncoming(ctx)
}

// waitIncoming waits until the incoming migration has loaded and the VM is paused.
func (i *Instance) waitIncoming(ctx context.Context) error {
	delay := 200 * time.Microsecond
	for {
		var st struct {
			Status  string `json:"status"`
			Running bool   `json:"running"`
		}
		if err := i.qmp.Execute(ctx, "query-status", nil, &st); err != nil {
			return err
		}
		switch st.Status {
		case "paused", "postmigrate", "running":
			return nil
		case "inmigrate":
		default:
			if st.Status == "internal-error" || st.Status == "shutdown" || st.Status == "guest-panicked" {
				return fmt.Errorf("incoming migration ended in state %s", st.Status)
			}
		}
		var mig struct {
			Status    string `json:"status"`
			ErrorDesc string `json:"error-desc"`
		}
		if err := i.qmp.Execute(ctx, "query-migrate", nil, &mig); err == nil && mig.Status == "failed" {
			return fmt.Errorf("incoming migration failed: %s", mig.ErrorDesc)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-i.done:
			return errors.New("qemu exited while loading the snapshot (state file corrupt or mismatched?)")
		case <-time.After(delay):
		}
		if delay < 5*time.Millisecond {
			delay *= 2
		}
	}
}

// Kill stops QEMU with SIGKILL and waits until it is gone. It closes the
// instance's connections too: QMP, and the agent connection made at spawn
// if nothing took it (a spare discarded unused).
func (i *Instance) Kill(ctx context.Context) error {
	if i.qmp != nil {
		i.qmp.Close()
	}
	i.closePreconn()
	if err := i.alive(); err != nil {
		i.cleanupSandbox()
		return nil
	}
	// The pidfd makes the signal race-free against pid reuse; Control
	// keeps it open while in use, and fails once watch has closed it
	// because the process is gone.
	var serr error
	if rc, err := i.pidfd.SyscallConn(); err == nil {
		if cerr := rc.Control(func(fd uintptr) { serr = unix.PidfdSendSignal(int(fd), unix.SIGKILL, nil, 0) }); cerr != nil {
			serr = nil
		}
	}
	if serr != nil && serr != unix.ESRCH {
		return fmt.Errorf("killing qemu pid %d: %w", i.pid, serr)
	}
	select {
	case <-i.done:
		i.cleanupSandbox()
		return nil
	case <-ctx.Done():
		return fmt.Errorf("waiting for qemu pid %d to exit: %w", i.pid, ctx.Err())
	}
}

// Close releases the QMP connection without stopping QEMU.
func (i *Instance) Close() error {
	if i.qmp != nil {
		i.qmp.Close()
	}
	i.closePreconn()
	return nil
}

// closePreconn closes the agent connection made at spawn, unless DialAgent
// handed it out.
func (i *Instance) closePreconn() {
	i.preMu.Lock()
	defer i.preMu.Unlock()
	if i.preconn != nil {
		i.preconn.Close()
		i.preconn = nil
	}
}

func killPid(pid int) {
	syscall.Kill(pid, syscall.SIGKILL)
}
