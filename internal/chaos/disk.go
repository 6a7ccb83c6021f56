package chaos

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/noid-vm/noid/client"
)

// disk is the run's own small filesystem, loop-mounted, that holds the
// server's data dir, so that the full-disk phase can run it out of space
// without touching the host's.
type disk struct {
	image, mnt string
}

// setupDisk makes an image of size bytes in dir (sparse), formats it with
// fstype (ext4 or xfs) and loop-mounts it on dir/disk.
func setupDisk(ctx context.Context, dir, fstype string, size int64) (*disk, error) {
	d := &disk{image: filepath.Join(dir, "disk.img"), mnt: filepath.Join(dir, "disk")}
	f, err := os.Create(d.image)
	if err == nil {
		err = f.Truncate(size)
		f.Close()
	}
	if err != nil {
		return nil, fmt.Errorf("making the data disk image %s: %w", d.image, err)
	}
	var mkfs []string
	switch fstype {
	case "ext4":
		mkfs = []string{"mkfs.ext4", "-q", "-F", "-m", "0", d.image}
	case "xfs":
		mkfs = []string{"mkfs.xfs", "-q", "-f", "-m", "reflink=1", d.image}
	default:
		return nil, fmt.Errorf("data disk: unknown filesystem %q (ext4 or xfs)", fstype)
	}
	if out, err := exec.CommandContext(ctx, mkfs[0], mkfs[1:]...).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("formatting the data disk: %s: %w: %s", strings.Join(mkfs, " "), err, out)
	}
	if err := os.Mkdir(d.mnt, 0o755); err != nil {
		return nil, fmt.Errorf("making the data disk's mount point: %w", err)
	}
	// -o loop attaches with autoclear: unmounting detaches the device.
	if out, err := exec.CommandContext(ctx, "mount", "-o", "loop,discard", "-t", fstype, d.image, d.mnt).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("mounting the data disk %s on %s: %w: %s", d.image, d.mnt, err, out)
	}
	return d, nil
}

// mounted reports whether the data disk is still mounted.
func (d *disk) mounted() bool {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) > 4 && f[4] == d.mnt {
			return true
		}
	}
	return false
}

// teardown unmounts the data disk (which detaches its loop device),
// retrying while the last VMMs exit, and lazily as a last resort.
func (d *disk) teardown() error {
	deadline := time.Now().Add(30 * time.Second)
	for d.mounted() {
		err := unix.Unmount(d.mnt, 0)
		if err == nil {
			continue
		}
		if time.Now().After(deadline) {
			unix.Unmount(d.mnt, unix.MNT_DETACH)
			return fmt.Errorf("unmounting the data disk %s: %w (detached lazily)", d.mnt, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	return nil
}

// avail is the space left on the data disk (what the filesystem does
// not keep for itself).
func (d *disk) avail() int64 {
	var st unix.Statfs_t
	if unix.Statfs(d.mnt, &st) != nil {
		return -1
	}
	return int64(st.Bavail) * st.Bsize
}

// filler is a file that takes up the data disk's free space.
type filler struct {
	f    *os.File
	size int64
}

// fill allocates every free block of the data disk to a file outside the
// data dir, until the filesystem answers ENOSPC even for one block.
func (d *disk) fill() (*filler, error) {
	f, err := os.OpenFile(filepath.Join(d.mnt, "chaos-filler"), os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("creating the filler: %w", err)
	}
	fl := &filler{f: f}
	if err := fl.top(); err != nil {
		fl.remove()
		return nil, err
	}
	return fl, nil
}

// top grows the filler until the filesystem is full again.
func (fl *filler) top() error {
	for _, chunk := range []int64{256 << 20, 16 << 20, 1 << 20, 64 << 10, 4 << 10} {
		for {
			err := unix.Fallocate(int(fl.f.Fd()), 0, fl.size, chunk)
			if errors.Is(err, unix.ENOSPC) {
				break
			}
			if err != nil {
				return fmt.Errorf("filling the data disk: %w", err)
			}
			fl.size += chunk
		}
	}
	// What fallocate leaves (it needs room for its own metadata), writes
	// take, a block at a time.
	block := make([]byte, 4<<10)
	for {
		n, err := fl.f.WriteAt(block, fl.size)
		fl.size += int64(n)
		if errors.Is(err, unix.ENOSPC) {
			break
		}
		if err != nil {
			return fmt.Errorf("filling the data disk: %w", err)
		}
	}
	return fl.f.Sync()
}

// release frees n bytes of the filler.
func (fl *filler) release(n int64) error {
	fl.size = max(0, fl.size-n)
	return fl.f.Truncate(fl.size)
}

// remove deletes the filler, giving all its space back.
func (fl *filler) remove() error {
	fl.f.Close()
	return os.Remove(fl.f.Name())
}

// clearNoSpace reports whether an error says the disk is full.
func clearNoSpace(err error) bool {
	s := strings.ToLower(err.Error())
	return strings.Contains(s, "no space") || strings.Contains(s, " full")
}

// diskPhase runs the data disk full (the workers are held and no
// operation is in flight): checkpoints and clones must fail with an error
// that says the disk is full, leave no partial checkpoint or clone, and
// leave the VM running (not paused); once the space is freed they must
// work again. The check after the phase looks for leftovers.
func (r *runner) diskPhase(ctx context.Context, n int) bool {
	r.gate.Lock()
	defer r.gate.Unlock()
	c := r.srv.client
	vm, acks := r.pickAcked(ctx, n, "full disk")
	if vm == "" {
		return false
	}
	fl, err := r.disk.fill()
	if err != nil {
		r.violate("fault %d: %v", n, err)
		return true
	}
	defer func() {
		if fl != nil {
			fl.remove()
		}
	}()
	r.record(fmt.Sprintf("fault %d at %.1fs: data disk full (%d MiB filler, %d KiB left); VM %s", n, r.since(), fl.size>>20, r.disk.avail()>>10, vm))
	for _, left := range []int64{0, 24 << 20} {
		if left > 0 {
			fl.release(left)
		}
		what := fmt.Sprintf("fault %d, disk full with %d KiB free", n, r.disk.avail()>>10)
		cctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
		cp, err := c.Checkpoint(cctx, vm, client.CheckpointRequest{})
		cancel()
		switch {
		case err == nil:
			r.logf("%s: checkpoint %s of %s succeeded (it fit)", what, cp.ID, vm)
		case ctx.Err() == nil && errors.Is(cctx.Err(), context.DeadlineExceeded):
			r.violate("%s: checkpoint of %s did not return within 3 minutes", what, vm)
		case !clearNoSpace(err):
			r.violate("%s: checkpoint of %s failed without saying the disk is full: %v", what, vm, err)
		default:
			r.logf("%s: checkpoint of %s failed cleanly: %v", what, vm, err)
		}
		a := acks[r.rng.Intn(len(acks))]
		name := r.checkName()
		cctx, cancel = context.WithTimeout(ctx, 3*time.Minute)
		_, err = c.Clone(cctx, a.vm, a.checkpoint, name)
		cancel()
		switch {
		case err == nil:
			r.logf("%s: clone %s of %s succeeded (it fit)", what, name, a.checkpoint)
			r.checkNew(ctx, what+", in a clone made on the nearly full disk", name, a)
		case ctx.Err() == nil && errors.Is(cctx.Err(), context.DeadlineExceeded):
			r.violate("%s: clone of %s/%s did not return within 3 minutes", what, a.vm, a.checkpoint)
		case !clearNoSpace(err):
			r.violate("%s: clone of %s/%s failed without saying the disk is full: %v", what, a.vm, a.checkpoint, err)
		default:
			r.logf("%s: clone of %s/%s failed cleanly: %v", what, a.vm, a.checkpoint, err)
			if v, gerr := c.GetVM(ctx, name); gerr == nil {
				r.violate("%s: the failed clone %s is listed (%s)", what, name, v.State)
			}
		}
		if _, err := execOut(ctx, c, vm, "echo", "ok"); err != nil {
			r.violate("%s: VM %s does not answer exec after the failed checkpoint (left paused?): %v", what, vm, err)
		}
	}
	// The guest itself writes to its disk, whose top layer is a file on
	// the full filesystem: QEMU pauses it until there is space. Meanwhile
	// an exec must fail at once saying so, and once the space is back the
	// VM must run again (below, and in the check after the phase).
	if err := fl.top(); err != nil {
		r.violate("fault %d: %v", n, err)
		return true
	}
	if _, err := execOut(ctx, c, vm, "sh", "-c", "dd if=/dev/urandom of=/chaos-fill bs=64k count=512 conv=fsync </dev/null >/dev/null 2>&1 &"); err != nil {
		r.logf("fault %d: starting a guest write of 32 MiB into the full disk: %v", n, err)
	}
	t0 := time.Now()
	for {
		pctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
		_, err := execOut(pctx, c, vm, "true")
		cancel()
		if err == nil && time.Since(t0) < time.Minute {
			time.Sleep(200 * time.Millisecond)
			continue
		}
		switch {
		case err == nil:
			r.logf("fault %d: the guest's write into the full disk did not pause %s within a minute", n, vm)
		case errors.Is(pctx.Err(), context.DeadlineExceeded) && ctx.Err() == nil:
			r.violate("fault %d: an exec in %s, paused by its write into the full disk, did not return within 3 minutes", n, vm)
		case !clearNoSpace(err):
			r.violate("fault %d: an exec in %s, paused by its write into the full disk, failed without saying the disk is full: %v", n, vm, err)
		default:
			r.logf("fault %d: the guest's write paused %s; an exec fails cleanly: %s", n, vm, shortErr(err))
		}
		break
	}
	fl.remove()
	fl = nil
	// The VM must answer again soon after the space is back.
	t0 = time.Now()
	var lastErr error
	for time.Since(t0) < time.Minute && ctx.Err() == nil {
		if _, lastErr = execOut(ctx, c, vm, "echo", "ok"); lastErr == nil {
			break
		}
		time.Sleep(time.Second)
	}
	if lastErr != nil {
		r.violate("fault %d: VM %s does not answer exec a minute after the space was freed (left paused?): %v", n, vm, lastErr)
	}
	execOut(ctx, c, vm, "sh", "-c", "while pidof dd >/dev/null; do sleep 0.2; done; rm -f /chaos-fill")
	// With the space back, an acknowledged write (file, checkpoint) and a
	// clone of it must work again.
	if err := r.pw.ackWrite(ctx, vm); err != nil {
		r.violate("fault %d: after the space was freed, an acknowledged write on %s failed: %v", n, vm, err)
		return true
	}
	a := r.led.acksOf(vm)
	r.sampleClone(ctx, fmt.Sprintf("fault %d, after the space was freed", n), a[len(a)-1])
	r.logf("fault %d: after the space was freed (%d MiB), checkpoint and clone work again", n, r.disk.avail()>>20)
	return true
}

// pickAcked picks a running VM with acknowledged checkpoints for fault n's
// phase and returns it with its acknowledged writes; when there is none it
// records that the phase was skipped and returns "".
func (r *runner) pickAcked(ctx context.Context, n int, phase string) (string, []ack) {
	vms, err := r.srv.client.ListVMs(ctx)
	if err != nil {
		vms = nil
	}
	var names []string
	for _, v := range vms {
		if v.State == "running" && len(r.led.acksOf(v.Name)) > 0 {
			names = append(names, v.Name)
		}
	}
	if len(names) == 0 {
		r.record(fmt.Sprintf("fault %d at %.1fs: %s skipped: no running VM with an acknowledged checkpoint", n, r.since(), phase))
		return "", nil
	}
	sort.Strings(names)
	vm := names[r.rng.Intn(len(names))]
	return vm, r.led.acksOf(vm)
}
