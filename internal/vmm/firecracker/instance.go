package firecracker

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/noid-vm/noid/internal/errdefs"
	"github.com/noid-vm/noid/internal/storage"
	"github.com/noid-vm/noid/internal/vmm"
)

// diffFile is the name of a Diff snapshot's memory layer inside a
// checkpoint directory while it is being merged; it never survives a
// successful checkpoint.
const diffFile = "memory.diff"

// instance is one running Firecracker process.
type instance struct {
	b    *Backend
	spec vmm.Spec
	lay  layout
	api  *Client
	pid  int

	pidfd       int           // -1 when pidfd_open is unavailable
	wake        int           // eventfd that stops an adopted process's watcher, or -1
	watcherDone chan struct{} // closed when an adopted process's watcher returns
	done        chan struct{} // closed when the process has exited
	closeOnce   sync.Once
	closed      atomic.Bool

	version string // the running process's version (GET /version)

	mu         sync.Mutex // serialises Checkpoint, Pause, Resume
	trackDirty bool       // dirty page tracking is on in this process
	base       string     // memory file the dirty bitmap is relative to; "" means the next checkpoint is Full
	diffBroken bool       // the store cannot merge diffs; always take Full snapshots
}

var _ vmm.Instance = (*instance)(nil)

func newInstance(b *Backend, spec vmm.Spec, l layout, pid int) *instance {
	return &instance{
		b: b, spec: spec, lay: l, pid: pid,
		api:   NewClient(l.host(fcAPISock)),
		pidfd: -1, wake: -1,
		done:       make(chan struct{}),
		trackDirty: l.TrackDirty,
	}
}

// Pid returns the Firecracker process id.
func (in *instance) Pid() int { return in.pid }

// Done is closed when the Firecracker process has exited.
func (in *instance) Done() <-chan struct{} { return in.done }

func (in *instance) exited() bool {
	select {
	case <-in.done:
		return true
	default:
		return false
	}
}

// name is the VM's name for error messages.
func (in *instance) name() string {
	if in.spec.Name != "" {
		return in.spec.Name
	}
	return in.spec.ID
}

// DialAgent connects to the guest agent's vsock port through Firecracker's
// vsock socket.
func (in *instance) DialAgent(ctx context.Context) (net.Conn, error) {
	if in.exited() {
		return nil, fmt.Errorf("dialing the agent of VM %s: %w", in.name(), errdefs.ErrNotRunning)
	}
	conn, err := DialVsock(ctx, in.lay.host(fcVsock), in.b.cfg.AgentPort)
	if err != nil {
		return nil, fmt.Errorf("dialing the agent of VM %s: %w", in.name(), err)
	}
	return conn, nil
}

// Pause stops the vCPUs.
func (in *instance) Pause(ctx context.Context) error {
	in.mu.Lock()
	defer in.mu.Unlock()
	if in.exited() {
		return fmt.Errorf("pausing VM %s: %w", in.name(), errdefs.ErrNotRunning)
	}
	if err := in.api.Pause(ctx); err != nil {
		return fmt.Errorf("pausing VM %s: %w", in.name(), err)
	}
	return nil
}

// Resume restarts the vCPUs.
func (in *instance) Resume(ctx context.Context) error {
	in.mu.Lock()
	defer in.mu.Unlock()
	if in.exited() {
		return fmt.Errorf("resuming VM %s: %w", in.name(), errdefs.ErrNotRunning)
	}
	if err := in.api.Resume(ctx); err != nil {
		return fmt.Errorf("resuming VM %s: %w", in.name(), err)
	}
	return nil
}

// resumeAlways resumes the vCPUs even when ctx is already cancelled: a
// checkpoint must never leave the VM paused.
func (in *instance) resumeAlways(ctx context.Context) error {
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	var err error
	for attempt := 0; attempt < 3; attempt++ {
		if err = in.api.Resume(rctx); err == nil {
			return nil
		}
		var apiErr *APIError
		if errors.As(err, &apiErr) || in.exited() {
			break // Firecracker answered no, or is gone: retrying will not help
		}
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Errorf("resuming VM %s after the checkpoint: %w", in.name(), err)
}

// Checkpoint pauses the VM, has Firecracker write its state and memory
// (Full, or Diff on top of a copy of the base; see the package
// documentation), copies the disk, always resumes, and completes dir with
// meta.json. dir must exist and be empty; on error the caller removes it.
func (in *instance) Checkpoint(ctx context.Context, dir string, cp vmm.Copier) (t vmm.Timings, err error) {
	start := time.Now()
	defer func() { t.Total = time.Since(start) }()
	in.mu.Lock()
	defer in.mu.Unlock()
	wrap := func(err error) error { return fmt.Errorf("checkpointing VM %s: %w", in.name(), err) }
	if in.exited() {
		return t, wrap(errdefs.ErrNotRunning)
	}

	memDst := filepath.Join(dir, vmm.SnapMemory)
	stateDst := filepath.Join(dir, vmm.SnapState)
	diskDst := filepath.Join(dir, vmm.SnapDisk)
	diffDst := filepath.Join(dir, diffFile)

	diff := in.trackDirty && !in.diffBroken && in.base != "" && fileExists(in.base)
	if diff {
		// The copy of the base happens before the pause: the base is an
		// immutable earlier state, so this costs no pause time.
		c0 := time.Now()
		if err := cp.CopyFile(ctx, in.base, memDst); err != nil {
			return t, wrap(fmt.Errorf("copying the memory base: %w", err))
		}
		t.Copy += time.Since(c0)
	}

	// Where Firecracker writes: straight into dir, or into a staging
	// directory inside the jail.
	memOut := memDst
	if diff {
		memOut = diffDst
	}
	params := SnapshotCreateParams{SnapshotType: SnapshotFull, SnapshotPath: stateDst, MemFilePath: memOut}
	if diff {
		params.SnapshotType = SnapshotDiff
	}
	stage := ""
	if in.lay.Jailed {
		stage = in.lay.host(fcStage)
		os.RemoveAll(stage)
		if err := os.Mkdir(stage, 0o700); err != nil {
			return t, wrap(fmt.Errorf("creating the staging directory in the jail: %w", err))
		}
		defer os.RemoveAll(stage)
		if err := os.Chown(stage, in.lay.UID, in.lay.GID); err != nil {
			return t, wrap(err)
		}
		params.SnapshotPath = fcStage + "/" + vmm.SnapState
		params.MemFilePath = fcStage + "/" + filepath.Base(memOut)
	}

	// The pause: snapshot and disk copy, then resume no matter what.
	p0 := time.Now()
	if err := in.api.Pause(ctx); err != nil {
		rerr := in.resumeAlways(ctx) // Pause has no side effects on failure; be sure anyway
		t.Pause = time.Since(p0)
		return t, wrap(errors.Join(fmt.Errorf("pausing: %w", err), rerr))
	}
	snapErr := in.api.CreateSnapshot(ctx, params)
	var diskErr error
	if snapErr == nil {
		c1 := time.Now()
		diskErr = cp.CopyFile(ctx, in.spec.Disk, diskDst)
		t.Copy += time.Since(c1)
	}
	resumeErr := in.resumeAlways(ctx)
	t.Pause = time.Since(p0)

	// From here on the dirty bitmap has been reset by the snapshot, so
	// unless this checkpoint completes, the next one must be Full.
	in.base = ""
	switch {
	case snapErr != nil:
		return t, wrap(errors.Join(fmt.Errorf("creating the %s snapshot: %w", params.SnapshotType, classifyFault(snapErr)), resumeErr))
	case diskErr != nil:
		return t, wrap(errors.Join(fmt.Errorf("copying the disk: %w", diskErr), resumeErr))
	case resumeErr != nil:
		return t, wrap(resumeErr)
	}

	c2 := time.Now()
	if stage != "" {
		if err := moveFile(ctx, cp, filepath.Join(stage, vmm.SnapState), stateDst); err != nil {
			return t, wrap(err)
		}
		if err := moveFile(ctx, cp, filepath.Join(stage, filepath.Base(memOut)), memOut); err != nil {
			return t, wrap(err)
		}
	}
	if diff {
		if err := storage.OverlayFile(ctx, diffDst, memDst, false); err != nil {
			if errors.Is(err, storage.ErrHolesUnreliable) {
				in.diffBroken = true
				err = fmt.Errorf("%w (diff snapshots are now off for this VM; set disable_diff_snapshots for this store)", err)
			}
			return t, wrap(fmt.Errorf("merging the dirty pages: %w", err))
		}
		if err := os.Remove(diffDst); err != nil {
			return t, wrap(err)
		}
	}
	t.Copy += time.Since(c2)

	for _, f := range []string{memDst, stateDst, diskDst} {
		if err := storage.SyncFile(f); err != nil {
			return t, wrap(err)
		}
	}
	meta, err := in.meta(ctx)
	if err != nil {
		return t, wrap(err)
	}
	if err := writeMeta(dir, meta); err != nil {
		return t, wrap(err)
	}
	if err := storage.FsyncDir(dir); err != nil {
		return t, wrap(err)
	}

	// The new memory file is the next checkpoint's base.
	if in.trackDirty {
		if err := linkOrCopy(ctx, cp, memDst, in.lay.Base); err != nil {
			in.b.cfg.Logger.Warn("firecracker: cannot keep the checkpoint's memory as the next diff base; the next checkpoint will be Full",
				"vm", in.name(), "err", err)
		} else {
			in.base = in.lay.Base
		}
	}
	return t, nil
}

// meta builds the snapshot metadata of this VM.
func (in *instance) meta(ctx context.Context) (vmm.SnapshotMeta, error) {
	ver := in.version
	if ver == "" {
		v, err := in.api.Version(ctx)
		if err != nil {
			return vmm.SnapshotMeta{}, fmt.Errorf("asking firecracker its version: %w", err)
		}
		ver, in.version = v, v
	}
	kh, err := in.b.fileHash(in.spec.Kernel)
	if err != nil {
		return vmm.SnapshotMeta{}, fmt.Errorf("hashing the kernel: %w", err)
	}
	ih, err := in.b.fileHash(in.spec.Initrd)
	if err != nil {
		return vmm.SnapshotMeta{}, fmt.Errorf("hashing the initramfs: %w", err)
	}
	return vmm.SnapshotMeta{
		Backend:      BackendName,
		VMMVersion:   ver,
		VCPUs:        in.spec.VCPUs,
		MemoryMiB:    in.spec.MemoryMiB,
		Accel:        vmm.AccelKVM,
		HasNet:       in.spec.Net != nil,
		KernelSHA256: kh,
		InitrdSHA256: ih,
		CreatedAt:    time.Now().UTC(),
	}, nil
}

// Kill stops the Firecracker process with SIGKILL, waits until it is gone,
// and removes its sockets (and its jail and cgroup).
func (in *instance) Kill(ctx context.Context) error {
	if !in.exited() {
		if in.closed.Load() {
			return fmt.Errorf("killing VM %s: the handle is closed; adopt the process again: %w", in.name(), errdefs.ErrConflict)
		}
		var err error
		if in.pidfd >= 0 {
			err = unix.PidfdSendSignal(in.pidfd, unix.SIGKILL, nil, 0)
		} else {
			err = unix.Kill(in.pid, unix.SIGKILL)
		}
		if err != nil && !errors.Is(err, unix.ESRCH) {
			return fmt.Errorf("killing VM %s (pid %d): %w", in.name(), in.pid, err)
		}
		select {
		case <-in.done:
		case <-ctx.Done():
			return fmt.Errorf("killing VM %s (pid %d): waiting for the process to exit: %w", in.name(), in.pid, ctx.Err())
		}
	}
	in.cleanup()
	in.Close()
	return nil
}

// cleanup removes what the process left behind.
func (in *instance) cleanup() {
	in.api.CloseIdleConnections()
	os.Remove(in.lay.host(fcAPISock))
	os.Remove(in.lay.host(fcVsock))
	if in.lay.Jailed && in.lay.JailDir != "" {
		os.RemoveAll(in.lay.JailDir)
		for _, c := range in.lay.Cgroups {
			os.Remove(c) // rmdir; fails harmlessly if not empty or absent
		}
	}
}

// Close releases the client, the process watcher and the pidfd without
// touching the process. The handle must not be used afterwards (Kill
// refuses), and Done is no longer signalled for an adopted process.
func (in *instance) Close() error {
	in.closeOnce.Do(func() {
		in.closed.Store(true)
		in.api.CloseIdleConnections()
		if in.wake >= 0 {
			unix.Write(in.wake, []byte{1, 0, 0, 0, 0, 0, 0, 0})
			<-in.watcherDone
			unix.Close(in.wake)
		}
		if in.pidfd >= 0 {
			unix.Close(in.pidfd)
		}
	})
	return nil
}

// logTail formats the end of Firecracker's logs for an error message.
func (in *instance) logTail() string {
	var s string
	if t := tail(in.lay.host(fcLog), 600); t != "" {
		s += "\nfirecracker log: " + t
	}
	if t := tail(in.lay.host(fcStderr), 600); t != "" {
		s += "\nfirecracker stderr: " + t
	}
	return s
}

// moveFile renames src to dst, copying across filesystems.
func moveFile(ctx context.Context, cp vmm.Copier, src, dst string) error {
	err := os.Rename(src, dst)
	if err == nil {
		return nil
	}
	if !errors.Is(err, unix.EXDEV) {
		return fmt.Errorf("moving %s: %w", src, err)
	}
	if err := cp.CopyFile(ctx, src, dst); err != nil {
		return fmt.Errorf("moving %s: %w", src, err)
	}
	return os.Remove(src)
}

// linkOrCopy makes dst (replacing it atomically) a hard link of src, or a
// copy where a link is impossible.
func linkOrCopy(ctx context.Context, cp vmm.Copier, src, dst string) error {
	err := replaceHardlink(src, dst)
	if err == nil {
		return nil
	}
	tmp := dst + ".tmp-" + randHex()
	if cerr := cp.CopyFile(ctx, src, tmp); cerr != nil {
		return errors.Join(err, cerr)
	}
	if rerr := os.Rename(tmp, dst); rerr != nil {
		os.Remove(tmp)
		return rerr
	}
	return nil
}

func fileExists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

// classifyFault makes a Firecracker "no space" fault recognisable as
// errdefs.ErrResourceExhausted.
func classifyFault(err error) error {
	var apiErr *APIError
	if errors.As(err, &apiErr) {
		m := strings.ToLower(apiErr.FaultMessage)
		if strings.Contains(m, "no space left") || strings.Contains(m, "os error 28") ||
			strings.Contains(m, "quota exceeded") || strings.Contains(m, "os error 122") {
			return fmt.Errorf("the filesystem is full: %w: %w", errdefs.ErrResourceExhausted, err)
		}
	}
	return err
}
