package manager

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/noid-vm/noid/internal/procfs"
	"github.com/noid-vm/noid/internal/sandbox"
	"github.com/noid-vm/noid/internal/store"
)

// TestOrphanVMMKilledAtStart: a VMM of this data dir that no VM row owns
// (a server killed between starting it and recording it, as the chaos
// soak found) is killed at the next start and its sandbox freed, while a
// VM the store knows is re-adopted and keeps running.
func TestOrphanVMMKilledAtStart(t *testing.T) {
	e := newEnv(t, "")
	ctx := tctx(t)
	keep := e.create("keep")
	orphan := e.create("orphan")
	dead := e.create("dead")
	// The row goes, the process stays: what a crash before the insert
	// leaves.
	if err := e.mgr.Store().DeleteVM(ctx, orphan.ID); err != nil {
		t.Fatal(err)
	}
	// The row says dead, the process runs: what recovery leaves when it
	// could not adopt a VMM (the long chaos run found one such).
	if err := e.mgr.Store().SetVMState(ctx, dead.ID, store.StateDead, "test: marked dead", dead.PID); err != nil {
		t.Fatal(err)
	}
	e.close()
	// A VMM the server was still starting when it died: in its cgroup and
	// holding its uid lease, but its command line still the server's
	// (between fork and exec). A process that names nothing of the data
	// dir stands in for it.
	starting := startInSandbox(t, e, "starting1")
	e.open()
	for _, v := range []struct {
		what string
		pid  int
	}{{"the orphaned VMM", orphan.PID}, {"the VMM of a dead VM", dead.PID}, {"the VMM being started", starting}} {
		deadline := time.Now().Add(30 * time.Second)
		for syscall.Kill(v.pid, 0) == nil && !procfs.Exited(v.pid) {
			if time.Now().After(deadline) {
				t.Fatalf("%s (pid %d) still runs after the restart\n%s", v.what, v.pid, lastLines(e.logs.String(), 20))
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	if _, ok := e.mgr.uids.Lookup("starting1"); ok {
		t.Errorf("the uid lease of the VMM being started is still held")
	}
	if cg := cgroupDir(t, e, "starting1"); cg != "" {
		t.Errorf("the cgroup of the VMM being started is still there: %s", cg)
	}
	if got := e.mustExec("keep", "echo", "alive"); got != "alive\n" {
		t.Errorf("the VM the store knows: %q", got)
	}
	if v, err := e.mgr.GetVM(ctx, e.user, "keep"); err != nil || v.PID != keep.PID {
		t.Errorf("keep after the restart: %+v %v (pid was %d)", v, err, keep.PID)
	}
}

// startInSandbox starts a sleep in a new cgroup named id, holding a uid
// lease for id in e's data dir, as the server does for a VMM, and returns
// its pid. The process is killed at the end of the test if still there.
func startInSandbox(t *testing.T, e *env, id string) int {
	t.Helper()
	sb := e.cfg.Sandbox
	pool, err := sandbox.OpenUIDPool(filepath.Join(e.cfg.DataDir, "sandbox", "uids"), uint32(sb.UIDBase), uint32(sb.UIDCount))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := pool.Acquire(id, e.dir); err != nil {
		t.Fatal(err)
	}
	cg, err := testCgroups(t, e).Create(id, sandbox.Limits{})
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("sleep", "600")
	if err := cg.Start(cmd); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cg.Remove(context.Background())
	})
	go cmd.Wait() // reaps it once killed, so that it does not stay a zombie in the cgroup
	return cmd.Process.Pid
}

// cgroupDir returns a directory of the cgroup id under e's cgroup parent
// that still exists, or "".
func cgroupDir(t *testing.T, e *env, id string) string {
	cg, err := testCgroups(t, e).Open(id)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range cg.Dirs() {
		if _, err := os.Stat(d); err == nil {
			return d
		}
	}
	return ""
}

// testCgroups returns a cgroup manager for e's cgroup parent, as the
// server makes one.
func testCgroups(t *testing.T, e *env) *sandbox.Manager {
	t.Helper()
	l, err := sandbox.Detect(sandbox.DetectOptions{})
	if err != nil {
		t.Fatal(err)
	}
	cgs, err := sandbox.NewManager(l, e.cfg.Sandbox.CgroupParent)
	if err != nil {
		t.Fatal(err)
	}
	return cgs
}

func TestVMMProcessID(t *testing.T) {
	for in, want := range map[string]string{
		"qemu-system-x86_64\x00-name\x00noid-abc123,debug-threads=off\x00-M\x00microvm\x00": "abc123",
		"qemu-system-x86_64\x00-name\x00noid-abc123\x00":                                    "abc123",
		"qemu-system-x86_64\x00-name\x00other,debug-threads=off\x00":                        "",
		"qemu-system-x86_64\x00-M\x00microvm\x00noid-abc,":                                  "",
		"": "",
	} {
		if got := vmmProcessID([]byte(in)); got != want {
			t.Errorf("vmmProcessID(%q) = %q, want %q", in, got, want)
		}
	}
}
