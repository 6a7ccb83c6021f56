package qemu

import (
	"context"
	"encoding/json"
	"time"

	"golang.org/x/sys/unix"
)

// A guest write that meets a full host filesystem (the VM's writable disk
// layer is a file in its directory) makes QEMU stop the guest: the
// virtio-blk device's default error policy for ENOSPC is "stop", which
// keeps the write and retries it on the next "cont", so the guest sees no
// error. Nothing would ever send that cont: the VM would stay paused, its
// agent silent, after the space came back. watchSpace resumes it.
const (
	// spaceResumeFree is the free space (for unprivileged writers) the
	// VM's filesystem must have again before the guest is resumed; a
	// resume into a disk still full only stops it again.
	spaceResumeFree = 32 << 20
	// spacePoll is how often a guest stopped for space looks for it.
	spacePoll = time.Second
)

// noteEvent is the QMP event hook: it wakes watchSpace when QEMU stopped
// the guest on a disk write error.
func (i *Instance) noteEvent(ev Event) {
	if ev.Name != "BLOCK_IO_ERROR" {
		return
	}
	var d struct {
		Action  string `json:"action"`
		NoSpace bool   `json:"nospace"`
	}
	if json.Unmarshal(ev.Data, &d) != nil || d.Action != "stop" {
		return
	}
	if d.NoSpace && !i.nospace.Swap(true) && i.b != nil && i.b.opts.Logger != nil {
		i.b.opts.Logger.Warn("vm paused: a write of its disk found the host filesystem full; it resumes once there is space again", "vm", i.spec.Name, "dir", i.spec.Dir)
	}
	select {
	case i.ioStopped <- struct{}{}:
	default:
	}
}

// WaitingForSpace reports whether the guest is paused because a write of
// its disk found the host filesystem full; it resumes by itself once there
// is space again (vmm.SpaceWaiter).
func (i *Instance) WaitingForSpace() bool { return i.nospace.Load() }

// watchSpace runs for the life of the instance: after QEMU stopped the
// guest on a write error it polls, and resumes the guest once its
// directory's filesystem has spaceResumeFree bytes free again. A guest
// that another party resumed, or that is no longer stopped on an I/O
// error, is left alone.
func (i *Instance) watchSpace() {
	for {
		select {
		case <-i.done:
			return
		case <-i.qmp.Done():
			return
		case <-i.ioStopped:
		}
		i.waitSpaceAndResume()
	}
}

func (i *Instance) waitSpaceAndResume() {
	t := time.NewTicker(spacePoll)
	defer t.Stop()
	defer i.nospace.Store(false)
	for {
		select {
		case <-i.done:
			return
		case <-i.qmp.Done():
			return
		case <-t.C:
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		var st struct {
			Status string `json:"status"`
		}
		err := i.qmp.Execute(ctx, "query-status", nil, &st)
		if err != nil || st.Status != "io-error" {
			cancel()
			return
		}
		i.nospace.Store(true)
		var fs unix.Statfs_t
		if unix.Statfs(i.spec.Dir, &fs) != nil || int64(fs.Bavail)*fs.Bsize < spaceResumeFree {
			cancel()
			continue
		}
		i.mu.Lock()
		err = i.qmp.Execute(ctx, "cont", nil, nil)
		i.mu.Unlock()
		cancel()
		if err != nil {
			continue
		}
		if i.b != nil && i.b.opts.Logger != nil {
			i.b.opts.Logger.Info("vm resumed: its disk had been stopped by a full filesystem, which has space again", "vm", i.spec.Name)
		}
		// Resumed: no longer waiting (the deferred store says so at once,
		// not a poll later). Should the retried write fail again, QEMU
		// stops the guest with another BLOCK_IO_ERROR, which wakes
		// watchSpace anew.
		return
	}
}
