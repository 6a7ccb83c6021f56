package qemu

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/noid-vm/noid/internal/errdefs"
	"github.com/noid-vm/noid/internal/sandbox"
	"github.com/noid-vm/noid/internal/vmm"
)

// How a QEMU process is confined (when Spec.Sandbox is set):
//
//   - seccomp: -sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,
//     resourcecontrol=deny (Spec.Sandbox.Seccomp).
//   - an unprivileged uid: Spec.Sandbox.UID if set, else a per-VM uid
//     leased from Options.UIDs. QEMU's own -runas cannot be used: it calls
//     setgid/setuid after the seccomp filter is installed, and
//     elevateprivileges=deny turns those calls into SIGSYS (checked with
//     QEMU 7.2, which accepts both "-runas user" and "-runas uid:gid"). So
//     noid drops to the uid in the forked child before exec, the way
//     libvirt does, and QEMU never runs as root at all.
//   - no path access to anything of noid's: the server opens the VM's
//     files (kernel, initramfs, disk, RAM file, serial log) and its TAP
//     itself and passes them as inherited file descriptors; QEMU is given
//     /proc/self/fd/N paths (reopening through /proc checks only the file's
//     own permissions, not the directories above it) and -netdev tap,fd=N.
//     With the TAP as an fd, QEMU also gets an empty network namespace.
//     The QMP and agent sockets were already passed as fds, and checkpoint
//     and restore streams go over QMP with SCM_RIGHTS. The VM's disk, RAM
//     file and serial log are chowned to its uid with mode 0600; the VM's
//     directory and everything above it stay root's with mode 0700, so
//     the QEMU process can neither list nor open any path under the data
//     dir, its own files included. The kernel and initramfs must be
//     readable by the uid (world-readable, as noid builds them).
//   - a cgroup with memory and pids limits (Options.Cgroups), entered
//     before QEMU runs (see package sandbox).

// MemoryOverhead is the default allowance on top of guest RAM in a QEMU's
// cgroup memory limit: QEMU's own heap, the TCG translation cache (bounded
// to TCGCacheMiB in a cgroup), device buffers, and the page cache of the
// disk image that the VMM's I/O pulls in (reclaimable, so it is squeezed,
// not fatal, at the limit). Guest RAM itself is a shared file mapping:
// page cache that is written back, not killed, under pressure.
const MemoryOverhead = 384 << 20

// TCGCacheMiB is the TCG translation cache of a QEMU with a memory limit.
// QEMU 7.2 reserves 1 GiB by default and fills it as the guest runs new
// code, which a busy guest can do until the cgroup's limit kills QEMU; 256
// MiB is eight times QEMU's default before 5.0.
const TCGCacheMiB = 256

// PidsLimit is the default pids.max of a QEMU's cgroup: the main loop, RCU
// and signal threads, one thread per vCPU, the block layer's thread pool
// (up to 64 workers with aio=threads), a migration thread, and room for
// one more task while the process is being placed (see package sandbox).
const PidsLimit = 128

// limits returns the cgroup limits for spec.
func (b *Backend) limits(spec vmm.Spec) sandbox.Limits {
	over := b.opts.MemoryOverhead
	if over <= 0 {
		over = MemoryOverhead
	}
	pids := b.opts.PidsLimit
	if pids <= 0 {
		pids = PidsLimit + int64(spec.VCPUs)
	}
	return sandbox.Limits{MemoryBytes: int64(spec.MemoryMiB)<<20 + over, Pids: pids}
}

// confinement is what spawn needs to start one confined QEMU.
type confinement struct {
	uid, gid int
	groups   []uint32
	// files are passed to QEMU after the QMP and agent sockets (fd 5 on).
	files []*os.File
	// args and vmFiles are the spec and the VM's files as QEMU sees them:
	// file paths replaced by /proc/self/fd/N, disk images by fd sets.
	args    vmm.Spec
	vmFiles VMFiles
	fdSets  []fdSet
	tapFD   int // -1 without a NIC or without fd passing
	cg      *sandbox.Cgroup
	// leased is true when the uid was leased for this spawn.
	leased bool
}

// firstExtraFD is the fd number of confinement.files[0] in QEMU.
const firstExtraFD = 5

func (c *confinement) close() {
	for _, f := range c.files {
		f.Close()
	}
	c.files = nil
}

// undo releases what confine took, after a failed spawn.
func (b *Backend) undo(c *confinement, spec vmm.Spec) {
	c.close()
	if c.cg != nil {
		c.cg.Remove(context.Background())
	}
	if c.leased && b.opts.UIDs != nil {
		b.opts.UIDs.Release(spec.ID)
	}
}

// confine prepares spec's sandbox: the uid, the files passed by fd and the
// cgroup. Without Spec.Sandbox it returns a confinement that changes
// nothing.
func (b *Backend) confine(spec vmm.Spec, files VMFiles) (c *confinement, err error) {
	c = &confinement{args: spec, vmFiles: files, tapFD: -1}
	sb := spec.Sandbox
	if sb == nil {
		return c, nil
	}
	defer func() {
		if err != nil {
			b.undo(c, spec)
		}
	}()
	switch {
	case sb.UID != 0:
		c.uid, c.gid = sb.UID, sb.GID
		if c.gid == 0 {
			c.gid = c.uid
		}
	case b.opts.UIDs != nil:
		_, had := b.opts.UIDs.Lookup(spec.ID)
		u, err := b.opts.UIDs.Acquire(spec.ID, spec.Dir)
		if err != nil {
			return c, fmt.Errorf("%w: no uid for the vmm of %s: %v", errdefs.ErrResourceExhausted, spec.Name, err)
		}
		c.uid, c.gid, c.leased = int(u), int(u), !had
	}
	if c.uid != 0 {
		if err := c.passFiles(spec); err != nil {
			return c, err
		}
		if spec.Accel == vmm.AccelKVM {
			g, err := kvmGroup(c.uid, c.gid)
			if err != nil {
				return c, err
			}
			if g >= 0 {
				c.groups = []uint32{uint32(g)}
			}
		}
	}
	if b.opts.Cgroups != nil {
		cg, err := b.opts.Cgroups.Create(spec.ID, b.limits(spec))
		if err != nil {
			return c, fmt.Errorf("creating the cgroup of vm %s: %w", spec.Name, err)
		}
		c.cg = cg
	}
	return c, nil
}

// passFiles opens the VM's files for QEMU, gives the writable ones to the
// uid, and points the QEMU arguments at /proc/self/fd.
func (c *confinement) passFiles(spec vmm.Spec) error {
	add := func(f *os.File) string {
		c.files = append(c.files, f)
		return "/proc/self/fd/" + strconv.Itoa(firstExtraFD+len(c.files)-1)
	}
	for _, r := range []struct {
		what string
		path *string
	}{{"kernel", &c.args.Kernel}, {"initramfs", &c.args.Initrd}} {
		if *r.path == "" {
			continue
		}
		f, err := os.OpenFile(*r.path, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("%w: %s %s: %v", errdefs.ErrUnavailable, r.what, *r.path, err)
		}
		if err := readableBy(f, c.uid, c.gid); err != nil {
			f.Close()
			return errdefs.WithHint(fmt.Errorf("%w: the %s %s is not readable by the sandbox uid %d: %v", errdefs.ErrUnavailable, r.what, *r.path, c.uid, err),
				"make it world-readable (chmod 644), or turn the per-VM uid off with [sandbox] user = \"root\"")
		}
		*r.path = add(f)
	}
	// own opens a file that is the VM's alone and gives it to the uid.
	own := func(what, path string, flags int) (*os.File, error) {
		f, err := os.OpenFile(path, flags|syscall.O_NOFOLLOW|syscall.O_CLOEXEC, 0o600)
		if err != nil {
			return nil, fmt.Errorf("opening the %s %s: %w", what, path, err)
		}
		if err := f.Chown(c.uid, c.gid); err != nil {
			f.Close()
			return nil, fmt.Errorf("giving the %s to the sandbox uid %d: %w", what, c.uid, err)
		}
		if err := f.Chmod(0o600); err != nil {
			f.Close()
			return nil, fmt.Errorf("setting the mode of the %s: %w", what, err)
		}
		return f, nil
	}
	// The disk chain goes into fd sets: the block layer dups the fd
	// instead of opening a path, so the shared read-only layers need not
	// be readable (or writable) by the uid at all. Only the top is the
	// VM's own.
	disks := append([]DiskFile(nil), c.vmFiles.Disks...)
	for i := range disks {
		set := i + 1
		readOnly := func() error {
			f, err := os.OpenFile(disks[i].Path, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_CLOEXEC, 0)
			if err != nil {
				return fmt.Errorf("opening the disk layer %s: %w", disks[i].Path, err)
			}
			add(f)
			c.fdSets = append(c.fdSets, fdSet{fd: firstExtraFD + len(c.files) - 1, set: set})
			return nil
		}
		if i == len(disks)-1 {
			// The top, also read-only: a checkpoint makes QEMU reopen it
			// so when it freezes it.
			f, err := own("disk", disks[i].Path, os.O_RDWR)
			if err != nil {
				return err
			}
			add(f)
			c.fdSets = append(c.fdSets, fdSet{fd: firstExtraFD + len(c.files) - 1, set: set, writable: true})
		}
		if err := readOnly(); err != nil {
			return err
		}
		disks[i].Path = "/dev/fdset/" + strconv.Itoa(set)
	}
	c.vmFiles.Disks = disks
	if mem := c.vmFiles.Mem; mem != "" {
		var f *os.File
		var err error
		if c.vmFiles.MemReadOnly {
			// A snapshot's memory file, shared with other VMs: QEMU opens
			// it read-only through /proc/self/fd, which checks the file's
			// own mode (the directories above it stay closed).
			if f, err = os.OpenFile(mem, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_CLOEXEC, 0); err == nil {
				err = f.Chmod(0o644)
			}
		} else {
			f, err = own("memory file", mem, os.O_RDWR)
		}
		if err != nil {
			if f != nil {
				f.Close()
			}
			return fmt.Errorf("opening the memory file %s: %w", mem, err)
		}
		c.vmFiles.Mem = add(f)
	}
	if c.args.SerialLog != "" {
		f, err := own("serial log", c.args.SerialLog, os.O_WRONLY|os.O_APPEND|os.O_CREATE)
		if err != nil {
			return err
		}
		c.args.SerialLog = add(f)
	}
	if spec.Net != nil {
		f, err := openTap(spec.Net.Tap)
		if err != nil {
			return err
		}
		add(f)
		c.tapFD = firstExtraFD + len(c.files) - 1
	}
	return nil
}

// readableBy checks that a process with uid and gid (and no supplementary
// groups) may open f for reading.
func readableBy(f *os.File, uid, gid int) error {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return err
	}
	switch {
	case int(st.Uid) == uid:
		if st.Mode&0o400 != 0 {
			return nil
		}
	case int(st.Gid) == gid:
		if st.Mode&0o040 != 0 {
			return nil
		}
	default:
		if st.Mode&0o004 != 0 {
			return nil
		}
	}
	return fmt.Errorf("mode %o, owner %d:%d", st.Mode&0o7777, st.Uid, st.Gid)
}

// kvmGroup returns the group a sandboxed QEMU needs as a supplementary group
// to open /dev/kvm, or -1 when the device is open to everyone.
func kvmGroup(uid, gid int) (int, error) {
	var st unix.Stat_t
	if err := unix.Stat("/dev/kvm", &st); err != nil {
		return -1, fmt.Errorf("%w: /dev/kvm: %v", errdefs.ErrUnavailable, err)
	}
	switch {
	case st.Mode&0o006 == 0o006, int(st.Uid) == uid && st.Mode&0o600 == 0o600:
		return -1, nil
	case st.Mode&0o060 == 0o060:
		return int(st.Gid), nil
	}
	return -1, errdefs.WithHint(fmt.Errorf("%w: /dev/kvm (mode %o) cannot be opened by the sandbox uid %d", errdefs.ErrUnavailable, st.Mode&0o777, uid),
		"give /dev/kvm mode 0660 and a group (as the kvm udev rule does)")
}

// openTap attaches to the VM's persistent TAP the way QEMU's -netdev
// tap,ifname=…,vnet_hdr=on does, so that QEMU gets the device as an fd and
// needs no privilege (nor the TAP's owner set) to use it.
func openTap(name string) (*os.File, error) {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("opening /dev/net/tun: %w", err)
	}
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("tap %q: %w", name, err)
	}
	ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_VNET_HDR)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		unix.Close(fd)
		if errors.Is(err, unix.EBUSY) {
			return nil, fmt.Errorf("%w: tap %s is in use by another process", errdefs.ErrConflict, name)
		}
		return nil, fmt.Errorf("attaching to tap %s: %w", name, err)
	}
	return os.NewFile(uintptr(fd), "tap:"+name), nil
}

// argOpts returns the command-line extras of the confined QEMU of spec.
func (c *confinement) argOpts(spec vmm.Spec) argOpts {
	o := argOpts{tapFD: c.tapFD, fdSets: c.fdSets}
	if c.cg != nil && spec.Accel != vmm.AccelKVM {
		o.tbSizeMiB = TCGCacheMiB
	}
	if len(c.files) > 0 {
		o.filesDir = spec.Dir
	}
	return o
}

// sysProcAttr returns the process attributes of a confined QEMU: its own
// session, and with a sandbox uid also that uid and a network namespace of
// its own with nothing in it but a loopback device that is down. Such a
// QEMU got its TAP as an fd, so it needs no network: a compromised VMM
// cannot reach the host's loopback services (the API's TCP listener), the
// LAN or a cloud metadata service.
func (c *confinement) sysProcAttr() *syscall.SysProcAttr {
	a := &syscall.SysProcAttr{Setsid: true}
	if c.uid != 0 {
		a.Credential = &syscall.Credential{Uid: uint32(c.uid), Gid: uint32(c.gid), Groups: c.groups}
		a.Cloneflags = syscall.CLONE_NEWNET
	}
	return a
}

// cleanupSandbox removes the cgroup of an exited QEMU and releases its uid.
func (i *Instance) cleanupSandbox() {
	i.sbOnce.Do(func() {
		if i.cg != nil {
			if err := i.cg.Remove(context.Background()); err != nil && i.b != nil && i.b.opts.Logger != nil {
				i.b.opts.Logger.Warn("removing vmm cgroup", "vm", i.spec.Name, "err", err)
			}
		}
		if i.b != nil && i.b.opts.UIDs != nil && i.spec.Sandbox != nil && i.spec.Sandbox.UID == 0 {
			i.b.opts.UIDs.Release(i.spec.ID)
		}
	})
}

// sandboxOf returns the cgroup of an adopted QEMU (without checking that
// it exists; removing a missing one is a no-op).
func (b *Backend) sandboxOf(spec vmm.Spec) *sandbox.Cgroup {
	if b.opts.Cgroups == nil || spec.Sandbox == nil {
		return nil
	}
	cg, err := b.opts.Cgroups.Open(spec.ID)
	if err != nil {
		return nil
	}
	return cg
}
