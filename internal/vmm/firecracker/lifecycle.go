package firecracker

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"

	"github.com/noid-vm/noid/internal/vmm"
)

// ifaceID is the guest network interface's id in Firecracker.
const ifaceID = "eth0"

// driveID is the root disk's id in Firecracker.
const driveID = "rootfs"

// Boot cold-boots the VM described by spec: it starts Firecracker (under the
// jailer when configured), configures the machine, boot source, root disk,
// NIC, vsock and entropy device through the API, and starts the instance.
// spec.Kernel must be an ELF vmlinux. spec.MemFile is not used (a fresh
// Firecracker VM runs on anonymous memory).
func (b *Backend) Boot(ctx context.Context, spec vmm.Spec) (vmm.Instance, error) {
	wrap := func(err error) error { return fmt.Errorf("booting firecracker VM %s: %w", specName(spec), err) }
	if err := validateSpec(spec); err != nil {
		return nil, wrap(err)
	}
	if spec.Kernel == "" {
		return nil, wrap(errors.New("no kernel"))
	}
	l := b.layoutFor(spec)
	if err := b.prepareRoot(spec, l, true); err != nil {
		return nil, wrap(err)
	}
	in, err := b.start(ctx, spec, l)
	if err != nil {
		return nil, wrap(err)
	}
	if err := b.configure(ctx, in); err != nil {
		in.Kill(context.WithoutCancel(ctx))
		return nil, wrap(fmt.Errorf("%w%s", err, in.logTail()))
	}
	return in, nil
}

// configure sends the boot-time configuration and InstanceStart.
func (b *Backend) configure(ctx context.Context, in *instance) error {
	spec, l, api := in.spec, in.lay, in.api
	if err := api.PutLogger(ctx, b.logger()); err != nil {
		return fmt.Errorf("configuring the logger: %w", err)
	}
	mc := MachineConfig{VCPUCount: spec.VCPUs, MemSizeMiB: spec.MemoryMiB, TrackDirtyPages: in.trackDirty}
	if err := api.PutMachineConfig(ctx, mc); err != nil {
		return fmt.Errorf("configuring the machine: %w", err)
	}
	bs := BootSource{
		KernelImagePath: l.fcPath(spec.Kernel, fcKernel),
		BootArgs:        b.bootArgs(spec),
	}
	if spec.Initrd != "" {
		bs.InitrdPath = l.fcPath(spec.Initrd, fcInitrd)
	}
	if err := api.PutBootSource(ctx, bs); err != nil {
		return fmt.Errorf("configuring the boot source: %w", err)
	}
	if err := api.PutDrive(ctx, Drive{DriveID: driveID, PathOnHost: fcDisk}); err != nil {
		return fmt.Errorf("adding the root disk: %w", err)
	}
	if spec.Net != nil {
		ni := NetworkInterface{IfaceID: ifaceID, HostDevName: spec.Net.Tap, GuestMAC: spec.Net.MAC}
		if err := api.PutNetworkInterface(ctx, ni); err != nil {
			return fmt.Errorf("adding the network interface on %s: %w", spec.Net.Tap, err)
		}
	}
	if err := api.PutVsock(ctx, Vsock{GuestCID: b.cfg.GuestCID, UDSPath: fcVsock}); err != nil {
		return fmt.Errorf("adding the vsock device: %w", err)
	}
	if err := api.PutEntropy(ctx, EntropyDevice{}); err != nil {
		return fmt.Errorf("adding the entropy device: %w", err)
	}
	if err := api.InstanceStart(ctx); err != nil {
		return fmt.Errorf("starting the instance: %w", err)
	}
	return nil
}

func (b *Backend) logger() Logger {
	return Logger{LogPath: fcLog, Level: b.cfg.LogLevel, ShowLevel: true}
}

// Restore starts a VM from the snapshot in dir: it checks meta.json (backend
// and spec), copies the disk into spec.Disk with cp, links the memory file
// to spec.MemFile as the VM's immutable base image, starts a fresh
// Firecracker and loads the snapshot with the File memory backend
// (MAP_PRIVATE, lazily loaded, clean pages shared with every other VM
// restored from the same file), pointing the vsock device at this VM's
// socket and the NIC at spec.Net.Tap, and resumes it.
func (b *Backend) Restore(ctx context.Context, spec vmm.Spec, dir string, cp vmm.Copier) (vmm.Instance, vmm.Timings, error) {
	var t vmm.Timings
	start := time.Now()
	wrap := func(err error) error {
		return fmt.Errorf("restoring firecracker VM %s from %s: %w", specName(spec), dir, err)
	}
	if err := validateSpec(spec); err != nil {
		return nil, t, wrap(err)
	}
	meta, err := ReadMeta(dir)
	if err != nil {
		return nil, t, wrap(err)
	}
	if err := CheckMeta(meta, spec); err != nil {
		return nil, t, wrap(err)
	}
	l := b.layoutFor(spec)

	// Disk and memory base, before the process exists.
	c0 := time.Now()
	if err := copyReplace(ctx, cp, filepath.Join(dir, vmm.SnapDisk), spec.Disk); err != nil {
		return nil, t, wrap(fmt.Errorf("copying the disk: %w", err))
	}
	if err := os.MkdirAll(filepath.Dir(l.Base), 0o700); err != nil {
		return nil, t, wrap(err)
	}
	if err := linkOrCopy(ctx, cp, filepath.Join(dir, vmm.SnapMemory), l.Base); err != nil {
		return nil, t, wrap(fmt.Errorf("linking the memory file: %w", err))
	}
	t.Copy = time.Since(c0)
	if err := b.prepareRoot(spec, l, false); err != nil {
		return nil, t, wrap(err)
	}
	memPath := l.fcPath(l.Base, fcMem)
	statePath := l.fcPath(filepath.Join(dir, vmm.SnapState), fcState)
	if l.Jailed {
		if err := replaceHardlink(l.Base, l.host(fcMem)); err != nil {
			return nil, t, wrap(fmt.Errorf("linking the memory file into the jail: %w", err))
		}
		if l.UID != 0 {
			// Read access through the group: all jails should share one gid.
			os.Chown(l.host(fcMem), -1, l.GID)
			os.Chmod(l.host(fcMem), 0o640)
		}
		if err := linkOrCopy(ctx, cp, filepath.Join(dir, vmm.SnapState), l.host(fcState)); err != nil {
			return nil, t, wrap(fmt.Errorf("placing the state file in the jail: %w", err))
		}
		os.Chown(l.host(fcState), l.UID, l.GID)
		defer os.Remove(l.host(fcState))
	}

	s0 := time.Now()
	in, err := b.start(ctx, spec, l)
	if err != nil {
		return nil, t, wrap(err)
	}
	t.Spawn = time.Since(s0)

	l0 := time.Now()
	if err := in.api.PutLogger(ctx, b.logger()); err != nil {
		in.Kill(context.WithoutCancel(ctx))
		return nil, t, wrap(fmt.Errorf("configuring the logger: %w", err))
	}
	load := SnapshotLoadParams{
		SnapshotPath:    statePath,
		MemBackend:      &MemoryBackend{BackendType: MemBackendFile, BackendPath: memPath},
		TrackDirtyPages: in.trackDirty,
		ResumeVM:        true,
		VsockOverride:   &VsockOverride{UDSPath: fcVsock},
		ClockRealtime:   b.cfg.ClockRealtime,
	}
	if spec.Net != nil {
		load.NetworkOverrides = []NetworkOverride{{IfaceID: ifaceID, HostDevName: spec.Net.Tap}}
	}
	if err := in.api.LoadSnapshot(ctx, load); err != nil {
		hint := ""
		if meta.VMMVersion != "" && meta.VMMVersion != in.version {
			hint = fmt.Sprintf(" (the snapshot was written by firecracker %s, this is %s)", meta.VMMVersion, in.version)
		}
		in.Kill(context.WithoutCancel(ctx))
		return nil, t, wrap(fmt.Errorf("loading the snapshot%s: %w%s", hint, err, in.logTail()))
	}
	t.Load = time.Since(l0)
	in.base = l.Base
	t.Total = time.Since(start)
	return in, t, nil
}

// Adopt reattaches to a Firecracker process started by an earlier server,
// using the layout recorded in spec.Dir. It returns an error wrapping
// vmm.ErrGone when the process no longer exists (or the pid now belongs to
// another program). The first checkpoint after an Adopt is Full.
func (b *Backend) Adopt(ctx context.Context, spec vmm.Spec, pid int) (vmm.Instance, error) {
	wrap := func(err error) error {
		return fmt.Errorf("adopting firecracker VM %s (pid %d): %w", specName(spec), pid, err)
	}
	l, err := readState(spec)
	if err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			return nil, wrap(err)
		}
		l = b.layoutFor(spec)
	}
	if err := adoptable(pid, l.ID); err != nil {
		return nil, wrap(err)
	}
	pidfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		if errors.Is(err, unix.ESRCH) {
			return nil, wrap(vmm.ErrGone)
		}
		return nil, wrap(fmt.Errorf("pidfd_open: %w", err))
	}
	in := newInstance(b, spec, l, pid)
	in.pidfd = pidfd
	wake, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
	if err != nil {
		unix.Close(pidfd)
		return nil, wrap(fmt.Errorf("eventfd: %w", err))
	}
	in.wake = wake
	in.watcherDone = make(chan struct{})
	go watchPidfd(pidfd, wake, in.done, in.watcherDone)

	info, err := in.api.DescribeInstance(ctx)
	if err != nil {
		in.Close()
		select {
		case <-in.done:
			return nil, wrap(vmm.ErrGone)
		default:
		}
		return nil, wrap(fmt.Errorf("the process runs but its API does not answer: %w", err))
	}
	in.version = info.VMMVersion
	return in, nil
}

// copyReplace copies src over dst through a temporary file and a rename,
// so dst is replaced atomically whether it exists or not.
func copyReplace(ctx context.Context, cp vmm.Copier, src, dst string) error {
	if err := os.MkdirAll(filepath.Dir(dst), 0o700); err != nil {
		return err
	}
	tmp := dst + ".tmp-" + randHex()
	if err := cp.CopyFile(ctx, src, tmp); err != nil {
		return err
	}
	if err := os.Rename(tmp, dst); err != nil {
		os.Remove(tmp)
		return err
	}
	return nil
}

func specName(spec vmm.Spec) string {
	if spec.Name != "" {
		return spec.Name
	}
	return spec.ID
}
