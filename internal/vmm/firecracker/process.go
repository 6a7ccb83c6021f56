package firecracker

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/noid-vm/noid/internal/vmm"
)

// command builds the process that runs the VM: Firecracker itself, or the
// jailer that execs it (in the same pid) inside the chroot.
func (b *Backend) command(spec vmm.Spec, l layout) *exec.Cmd {
	if !l.Jailed {
		cmd := exec.Command(b.cfg.Binary, "--api-sock", fcAPISock, "--id", l.ID)
		cmd.Dir = l.Root
		return cmd
	}
	args := []string{
		"--id", l.ID,
		"--exec-file", b.cfg.Binary,
		"--uid", strconv.Itoa(l.UID),
		"--gid", strconv.Itoa(l.GID),
		"--chroot-base-dir", filepath.Dir(filepath.Dir(l.JailDir)),
		"--cgroup-version", strconv.Itoa(b.cgroupVersion()),
	}
	if spec.Sandbox != nil && spec.Sandbox.CgroupPath != "" {
		if p := b.parentCgroup(spec, l.ID); p != "" {
			args = append(args, "--parent-cgroup", p)
		}
		for _, c := range b.cfg.JailerCgroups {
			args = append(args, "--cgroup", c)
		}
	}
	args = append(args, "--", "--api-sock", fcAPISock)
	cmd := exec.Command(b.cfg.Jailer, args...)
	cmd.Dir = "/"
	return cmd
}

// start launches the VMM process for spec, detached from the server (own
// session, stdio on files) so that it outlives it, and waits for its API.
func (b *Backend) start(ctx context.Context, spec vmm.Spec, l layout) (*instance, error) {
	if err := b.unjailedRoot(!l.Jailed); err != nil {
		return nil, err
	}
	serial := spec.SerialLog
	if serial == "" {
		serial = os.DevNull
	}
	stdout, err := os.OpenFile(serial, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("opening the serial log: %w", err)
	}
	defer stdout.Close()
	stderr, err := os.OpenFile(l.host(fcStderr), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("opening firecracker's stderr log: %w", err)
	}
	defer stderr.Close()

	cmd := b.command(spec, l)
	cmd.Stdin = nil // /dev/null
	cmd.Stdout = stdout
	cmd.Stderr = stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := writeState(spec, l); err != nil {
		return nil, fmt.Errorf("recording the VM layout: %w", err)
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting %s: %w", cmd.Path, err)
	}
	inst := newInstance(b, spec, l, cmd.Process.Pid)
	if fd, err := unix.PidfdOpen(cmd.Process.Pid, 0); err == nil {
		inst.pidfd = fd
	}
	go func() {
		cmd.Wait()
		close(inst.done)
	}()

	wctx, cancel := context.WithTimeout(ctx, b.cfg.StartTimeout)
	defer cancel()
	info, err := inst.api.WaitReady(wctx, inst.done)
	if err != nil {
		inst.Kill(context.WithoutCancel(ctx))
		return nil, fmt.Errorf("%w%s", err, inst.logTail())
	}
	// The running process's own version goes into snapshot metadata (the
	// binary on disk may be upgraded while VMs run).
	inst.version = info.VMMVersion
	return inst, nil
}

// adoptable checks that pid is alive and is this VM's Firecracker: its
// command line carries the VM's id (Firecracker gets --id from noid or from
// the jailer). Anything else means the VMM is gone and the pid was reused.
func adoptable(pid int, id string) error {
	if pid <= 0 {
		return fmt.Errorf("pid %d: %w", pid, vmm.ErrGone)
	}
	if err := unix.Kill(pid, 0); errors.Is(err, unix.ESRCH) {
		return fmt.Errorf("pid %d does not exist: %w", pid, vmm.ErrGone)
	}
	if st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); err == nil {
		if i := strings.LastIndex(string(st), ") "); i >= 0 && strings.HasPrefix(string(st[i+2:]), "Z") {
			return fmt.Errorf("pid %d has exited (zombie): %w", pid, vmm.ErrGone)
		}
	}
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("pid %d does not exist: %w", pid, vmm.ErrGone)
		}
		return fmt.Errorf("reading pid %d's command line: %w", pid, err)
	}
	args := strings.Split(strings.TrimRight(string(raw), "\x00"), "\x00")
	for i, a := range args {
		if a == "--id="+id || (a == "--id" && i+1 < len(args) && args[i+1] == id) {
			return nil
		}
	}
	return fmt.Errorf("pid %d is not firecracker --id %s (%q): %w", pid, id, args, vmm.ErrGone)
}

// watchPidfd closes done when the process behind pidfd exits, or returns
// when wake becomes readable (Close).
func watchPidfd(pidfd, wake int, done, watcherDone chan struct{}) {
	defer close(watcherDone)
	fds := []unix.PollFd{{Fd: int32(pidfd), Events: unix.POLLIN}, {Fd: int32(wake), Events: unix.POLLIN}}
	for {
		_, err := unix.Poll(fds, -1)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil || fds[0].Revents != 0 {
			close(done)
			return
		}
		if fds[1].Revents != 0 {
			return
		}
	}
}
