package guest

import (
	"errors"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// Reaper starts child processes and delivers their exit statuses.
//
// As init (global mode) it reaps every child with wait4(-1) on SIGCHLD, so
// orphans reparented to PID 1 never stay zombies, and it dispatches each
// status to the process registered for that pid. exec.Cmd.Wait must not be
// used in that mode (it would race with the reaper); Start and the returned
// channel replace it. A child registers while the reaper's lock is held
// across fork, so a child that exits at once is never reaped before it is
// registered.
//
// Outside init (local mode) each child is waited for individually and other
// children of the process are left alone.
type Reaper struct {
	global bool
	log    *slog.Logger

	mu      sync.Mutex
	waiters map[int]chan syscall.WaitStatus
	orphans int
}

// NewReaper returns a Reaper. In global mode it starts reaping at once.
func NewReaper(global bool, log *slog.Logger) *Reaper {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	r := &Reaper{global: global, log: log, waiters: make(map[int]chan syscall.WaitStatus)}
	if global {
		sig := make(chan os.Signal, 1)
		signal.Notify(sig, syscall.SIGCHLD)
		go func() {
			r.reapAll()
			for range sig {
				r.reapAll()
			}
		}()
	}
	return r
}

// Global reports whether the reaper reaps every child of the process.
func (r *Reaper) Global() bool { return r.global }

// Orphans returns how many unregistered children (orphans adopted by init)
// the reaper has reaped.
func (r *Reaper) Orphans() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.orphans
}

func (r *Reaper) reapAll() {
	r.mu.Lock()
	defer r.mu.Unlock()
	for {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil || pid <= 0 {
			return
		}
		if ch, ok := r.waiters[pid]; ok {
			delete(r.waiters, pid)
			ch <- syscall.WaitStatus(ws)
			continue
		}
		r.orphans++
		r.log.Debug("reaped orphan", "pid", pid)
	}
}

// Start starts cmd and returns its pid and a channel that receives its
// wait status once. The caller must not call cmd.Wait nor use cmd.Process
// (it is released, concurrently, when the status is delivered).
func (r *Reaper) Start(cmd *exec.Cmd) (int, <-chan syscall.WaitStatus, error) {
	ch := make(chan syscall.WaitStatus, 1)
	if r.global {
		r.mu.Lock()
		err := cmd.Start()
		pid := 0
		if err == nil {
			pid = cmd.Process.Pid
			r.waiters[pid] = ch
		}
		r.mu.Unlock()
		if err != nil {
			return 0, nil, err
		}
		out := make(chan syscall.WaitStatus, 1)
		proc := cmd.Process
		go func() {
			ws := <-ch
			_ = proc.Release()
			out <- ws
		}()
		return pid, out, nil
	}
	if err := cmd.Start(); err != nil {
		return 0, nil, err
	}
	pid := cmd.Process.Pid
	proc := cmd.Process
	go func() {
		var ws unix.WaitStatus
		for {
			_, err := unix.Wait4(pid, &ws, 0, nil)
			if errors.Is(err, unix.EINTR) {
				continue
			}
			if err != nil {
				r.log.Warn("waiting for child failed", "pid", pid, "err", err)
				ws = unix.WaitStatus(0xff << 8) // report exit 255
			}
			break
		}
		_ = proc.Release()
		ch <- syscall.WaitStatus(ws)
	}()
	return pid, ch, nil
}

// exitFromStatus converts a wait status to the protocol's Exit.
func exitFromStatus(ws syscall.WaitStatus) (code, sig int) {
	switch {
	case ws.Exited():
		return ws.ExitStatus(), 0
	case ws.Signaled():
		s := int(ws.Signal())
		return 128 + s, s
	default:
		return -1, 0
	}
}
