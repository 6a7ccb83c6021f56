package sandbox

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/noid-vm/noid/internal/testutil"
)

// realManager returns a manager on this host's real cgroup file system
// under a parent private to the test, removed at the end.
func realManager(t *testing.T, opts DetectOptions) *Manager {
	t.Helper()
	testutil.RequireRoot(t)
	l, err := Detect(opts)
	if err != nil {
		t.Skipf("no usable cgroups here: %v", err)
	}
	parent := fmt.Sprintf("noid-test-%d-%d", os.Getpid(), time.Now().UnixNano()%1e6)
	m, err := NewManager(l, parent)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		m.Prune(t.Context(), 0)
		for _, h := range l.Hierarchies {
			if err := syscall.Rmdir(filepath.Join(h.Mount, parent)); err != nil && !os.IsNotExist(err) {
				t.Errorf("removing test parent cgroup: %v", err)
			}
		}
	})
	return m
}

// startSleep starts a long sleep in c and returns it; the cleanup kills it.
func startSleep(t *testing.T, c *Cgroup) *exec.Cmd {
	t.Helper()
	cmd := exec.Command("sleep", "600")
	if err := c.Start(cmd); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	return cmd
}

// cgroupLines returns /proc/<pid>/cgroup.
func cgroupLines(t *testing.T, pid int) []ProcCgroup {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cgroup")
	if err != nil {
		t.Fatal(err)
	}
	return ParseProcCgroup(b)
}

// TestRealPlacementAndLimits runs against the host's real cgroups with the
// default detection (here: v1 memory and pids, plus the name=systemd and
// unified hierarchies for tracking): the child is in the VM cgroup in every
// hierarchy, the limits read back from the cgroup fs, the spawning thread
// went back to the server's own cgroups, and Remove leaves nothing.
func TestRealPlacementAndLimits(t *testing.T) {
	m := realManager(t, DetectOptions{})
	t.Logf("layout: %s", m.Layout())
	lim := Limits{MemoryBytes: 200 << 20, Pids: 50}
	c, err := m.Create("vm-place", lim)
	if err != nil {
		t.Fatal(err)
	}
	cmd := startSleep(t, c)
	pid := cmd.Process.Pid
	pcs := cgroupLines(t, pid)
	for _, h := range m.Layout().Hierarchies {
		p, ok := pathIn(h, pcs)
		want := "/" + c.Path()
		if h.Root != "/" {
			want = filepath.Join(h.Root, c.Path())
		}
		if !ok || p != want {
			t.Errorf("child in %s is in %q, want %q", h.Mount, p, want)
		}
	}
	if ok, err := c.Has(pid); !ok || err != nil {
		t.Errorf("Has(child) = %v, %v", ok, err)
	}
	got, err := c.Limits()
	if err != nil || got != lim {
		t.Errorf("limits read back %+v (%v), want %+v", got, err, lim)
	}
	// Only the child is in the cgroup: no thread of the test process was
	// left behind (the spawning thread moved back).
	for _, d := range c.Dirs() {
		if b, err := os.ReadFile(filepath.Join(d, "cgroup.procs")); err != nil || strings.TrimSpace(string(b)) != strconv.Itoa(pid) {
			t.Errorf("%s/cgroup.procs = %q, %v; want only %d", d, b, err, pid)
		}
	}
	tasks, _ := os.ReadDir("/proc/self/task")
	for _, task := range tasks {
		b, _ := os.ReadFile("/proc/self/task/" + task.Name() + "/cgroup")
		if bytes.Contains(b, []byte(c.Path())) {
			t.Errorf("thread %s of the test is in the VM cgroup: %s", task.Name(), b)
		}
	}
	cmd.Process.Kill()
	cmd.Wait()
	if err := c.Remove(t.Context()); err != nil {
		t.Fatal(err)
	}
	for _, d := range c.Dirs() {
		if _, err := os.Stat(d); !os.IsNotExist(err) {
			t.Errorf("%s still exists", d)
		}
	}
}

// TestRealInCgroupFromFirstInstruction starts, many times, a program
// whose first action is to print its own cgroups. Placement happens before
// the child runs, so it must always see itself in the VM cgroup; adding the
// pid after start would race with it.
func TestRealInCgroupFromFirstInstruction(t *testing.T) {
	m := realManager(t, DetectOptions{})
	c, err := m.Create("vm-race", Limits{Pids: 10})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Remove(t.Context())
	for i := range 30 {
		cmd := exec.Command("cat", "/proc/self/cgroup")
		out, err := startOutput(c, cmd)
		if err != nil {
			t.Fatal(err)
		}
		pcs := ParseProcCgroup(out)
		for _, h := range m.Layout().Hierarchies {
			if p, _ := pathIn(h, pcs); p != "/"+c.Path() {
				t.Fatalf("run %d: the child saw itself in %q in %s, want /%s", i, p, h.Mount, c.Path())
			}
		}
	}
}

// startOutput starts cmd in c and returns its stdout.
func startOutput(c *Cgroup, cmd *exec.Cmd) ([]byte, error) {
	var out bytes.Buffer
	cmd.Stdout = &out
	if err := c.Start(cmd); err != nil {
		return nil, err
	}
	err := cmd.Wait()
	return out.Bytes(), err
}

// TestRealPidsLimitEnforced: a shell that starts more background jobs than
// pids.max allows fails to fork; with a higher limit it succeeds. (While
// Start runs on v1, the spawning thread counts against pids.max too, so a
// limit must leave room for one more task than the VMM needs.)
func TestRealPidsLimitEnforced(t *testing.T) {
	m := realManager(t, DetectOptions{})
	c, err := m.Create("vm-pids", Limits{Pids: 4})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Remove(t.Context())
	script := "for i in 1 2 3 4 5 6; do sleep 0.2 & done; wait; echo done"
	cmd := exec.Command("/bin/sh", "-c", script)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, _ := startOutput(c, cmd)
	if !strings.Contains(strings.ToLower(stderr.String()), "fork") {
		t.Errorf("6 jobs under pids.max=4: stdout %q stderr %q, want a fork failure", out, stderr.String())
	}
	if err := c.SetLimits(Limits{Pids: 20}); err != nil {
		t.Fatal(err)
	}
	stderr.Reset()
	cmd = exec.Command("/bin/sh", "-c", script)
	cmd.Stderr = &stderr
	out, err = startOutput(c, cmd)
	if err != nil || !strings.Contains(string(out), "done") {
		t.Errorf("6 jobs under pids.max=20: %v, stdout %q stderr %q", err, out, stderr.String())
	}
}

// TestRealMemoryLimitEnforced: a process that touches more memory than the
// limit is killed by the kernel's OOM killer inside the cgroup.
func TestRealMemoryLimitEnforced(t *testing.T) {
	m := realManager(t, DetectOptions{})
	c, err := m.Create("vm-oom", Limits{MemoryBytes: 32 << 20, Pids: 10})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Remove(t.Context())
	// The test binary re-executes itself as a memory hog (see TestMain).
	hog := func() error {
		cmd := exec.Command(os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(), "NOID_SANDBOX_HOG_MIB=128")
		if err := c.Start(cmd); err != nil {
			t.Fatal(err)
		}
		return cmd.Wait()
	}
	err = hog()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
		t.Fatalf("hog exited with %v, want SIGKILL by the OOM killer", err)
	}
	if err := c.SetLimits(Limits{MemoryBytes: 512 << 20, Pids: 10}); err != nil {
		t.Fatal(err)
	}
	if err := hog(); err != nil {
		t.Fatalf("hog under a 512 MiB limit: %v", err)
	}
}

// TestRealV2Placement places a process with CLONE_INTO_CGROUP into the
// host's real cgroup v2 hierarchy (here the controller-less unified
// hierarchy of a hybrid host, so without limits).
func TestRealV2Placement(t *testing.T) {
	m := realManager(t, DetectOptions{Controllers: []string{}, NoTracking: true})
	if m.Layout().Hierarchies[0].Version != V2 {
		t.Skip("no cgroup2 mount here")
	}
	c, err := m.Create("vm-v2", Limits{})
	if err != nil {
		t.Fatal(err)
	}
	cmd := startSleep(t, c)
	pcs := cgroupLines(t, cmd.Process.Pid)
	if p, ok := pathIn(Hierarchy{Version: V2}, pcs); !ok || p != "/"+c.Path() {
		t.Errorf("child's v2 cgroup %q, want /%s", p, c.Path())
	}
	// The test process itself did not move.
	if p, _ := pathIn(Hierarchy{Version: V2}, cgroupLines(t, os.Getpid())); strings.Contains(p, c.Path()) {
		t.Errorf("test process moved to %s", p)
	}
	cmd.Process.Kill()
	cmd.Wait()
	if err := c.Remove(t.Context()); err != nil {
		t.Fatal(err)
	}
}

// TestRealRemoveKillsLeftovers: Remove on a cgroup with a live process
// kills it and removes the directories.
func TestRealRemoveKillsLeftovers(t *testing.T) {
	m := realManager(t, DetectOptions{})
	c, err := m.Create("vm-left", Limits{Pids: 5})
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("sleep", "600")
	if err := c.Start(cmd); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	if err := c.Remove(t.Context()); err != nil {
		t.Fatal(err)
	}
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("the leftover process was not killed")
	}
	if _, err := os.Stat(c.Dirs()[0]); !os.IsNotExist(err) {
		t.Errorf("cgroup still there")
	}
}

// BenchmarkStartPlain is the baseline for BenchmarkStartInCgroup: start
// and reap /bin/true.
func BenchmarkStartPlain(b *testing.B) {
	for b.Loop() {
		cmd := exec.Command("/bin/true")
		if err := cmd.Start(); err != nil {
			b.Fatal(err)
		}
		cmd.Wait()
	}
}

// BenchmarkStartInCgroup measures what confinement adds to a process
// start: create the cgroup with limits, start /bin/true in it, reap it,
// remove the cgroup.
func BenchmarkStartInCgroup(b *testing.B) {
	testutil.RequireRoot(b)
	l, err := Detect(DetectOptions{})
	if err != nil {
		b.Skip(err)
	}
	parent := fmt.Sprintf("noid-bench-%d", os.Getpid())
	m, err := NewManager(l, parent)
	if err != nil {
		b.Fatal(err)
	}
	defer func() {
		for _, h := range l.Hierarchies {
			syscall.Rmdir(filepath.Join(h.Mount, parent))
		}
	}()
	for i := 0; b.Loop(); i++ {
		c, err := m.Create("b"+strconv.Itoa(i), Limits{MemoryBytes: 1 << 30, Pids: 100})
		if err != nil {
			b.Fatal(err)
		}
		cmd := exec.Command("/bin/true")
		if err := c.Start(cmd); err != nil {
			b.Fatal(err)
		}
		cmd.Wait()
		if err := c.Remove(b.Context()); err != nil {
			b.Fatal(err)
		}
	}
}
