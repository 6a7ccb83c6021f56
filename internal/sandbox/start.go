package sandbox

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"syscall"

	"golang.org/x/sys/unix"
)

// Start starts cmd inside the cgroup, in every hierarchy, so that the new
// process never runs outside it (see the package documentation for how on
// v1 and v2). cmd.SysProcAttr is kept (Setsid, Credential, …); Start only
// adds the cgroup fd on v2.
func (c *Cgroup) Start(cmd *exec.Cmd) error {
	if _, ok := c.m.fs.(osFS); !ok {
		return fmt.Errorf("sandbox: Start needs the real cgroup file system")
	}
	var v1 []int // indexes into the layout's hierarchies
	v2 := -1
	for i, h := range c.m.layout.Hierarchies {
		if h.Version == V2 {
			v2 = i
		} else {
			v1 = append(v1, i)
		}
	}
	if v2 >= 0 {
		f, err := os.OpenFile(c.dirs[v2], os.O_RDONLY|syscall.O_DIRECTORY|syscall.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("opening cgroup %s: %w", c.dirs[v2], err)
		}
		defer f.Close()
		if cmd.SysProcAttr == nil {
			cmd.SysProcAttr = &syscall.SysProcAttr{}
		}
		cmd.SysProcAttr.UseCgroupFD = true
		cmd.SysProcAttr.CgroupFD = int(f.Fd())
	}
	if len(v1) == 0 {
		if err := cmd.Start(); err != nil {
			return fmt.Errorf("%w (starting into cgroup v2 %s needs clone3 with CLONE_INTO_CGROUP, Linux 5.7 or later)", err, c.dirs[v2])
		}
		return nil
	}
	errc := make(chan error, 1)
	go func() {
		// The goroutine owns its thread from here on. It unlocks only once
		// the thread is back in its own cgroups; otherwise it returns still
		// locked and the runtime destroys the thread.
		runtime.LockOSThread()
		errc <- c.startFromThread(cmd, v1)
	}()
	return <-errc
}

// startFromThread runs on a locked OS thread: it moves the thread into the
// v1 cgroups, starts cmd (which inherits them), and moves the thread back.
func (c *Cgroup) startFromThread(cmd *exec.Cmd, v1 []int) error {
	tid := unix.Gettid()
	tidb := []byte(strconv.Itoa(tid))
	own, err := os.ReadFile("/proc/thread-self/cgroup")
	if err != nil {
		return fmt.Errorf("reading the thread's cgroups: %w", err)
	}
	pcs := ParseProcCgroup(own)
	back := make([]string, len(v1))
	for j, i := range v1 {
		h := c.m.layout.Hierarchies[i]
		p, ok := pathIn(h, pcs)
		if !ok {
			return fmt.Errorf("the server's own cgroup in %s is unknown", h.Mount)
		}
		if back[j], ok = dirOf(h, p); !ok {
			return fmt.Errorf("the server's own cgroup %s is outside the mount %s", p, h.Mount)
		}
	}
	moveBack := func(n int) bool {
		ok := true
		for j := 0; j < n; j++ {
			if err := c.m.fs.WriteFile(filepath.Join(back[j], "tasks"), tidb); err != nil {
				ok = false
			}
		}
		return ok
	}
	for j, i := range v1 {
		if err := c.m.fs.WriteFile(filepath.Join(c.dirs[i], "tasks"), tidb); err != nil {
			if moveBack(j) {
				runtime.UnlockOSThread()
			}
			return fmt.Errorf("moving the spawning thread into cgroup %s: %w", c.dirs[i], err)
		}
	}
	err = cmd.Start()
	if moveBack(len(v1)) {
		runtime.UnlockOSThread()
	}
	return err
}
