package manager

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestVMMDeadWhileDownReleasesSandbox kills a VM's VMM while no manager
// runs: the next one marks the VM dead and must remove the VMM's cgroup
// and release its uid lease, which no instance is left to do. Before, both
// stayed until the VM was destroyed and a later server started (found by
// the chaos soak, issue 16).
func TestVMMDeadWhileDownReleasesSandbox(t *testing.T) {
	e := newEnv(t, "")
	if e.mgr.sandbox.cgroups == nil || e.mgr.uids == nil {
		t.Skip("needs per-VM uids and cgroups (root with cgroups mounted)")
	}
	// The VM is created by another process (a server that then exits), so
	// no instance of this one watches its VMM.
	e.close()
	cmd, out := e.child(childOp{Op: "create", Name: "gone"}, e.cfgPath)
	if err := cmd.Wait(); err != nil {
		t.Fatalf("creating in a child: %v\n%s", err, lastLines(out.String(), 30))
	}
	pidFiles, _ := filepath.Glob(filepath.Join(e.cfg.StorageDir(), "users", "*", "vms", "*", "qemu.pid"))
	if len(pidFiles) != 1 {
		t.Fatalf("pid files %v, want one", pidFiles)
	}
	id := filepath.Base(filepath.Dir(pidFiles[0]))
	b, _ := os.ReadFile(pidFiles[0])
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if st, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat"); err != nil || strings.Contains(string(st), ") Z ") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("vmm %d still runs 30s after SIGKILL", pid)
		}
	}
	e.open()
	got, err := e.mgr.GetVM(tctx(t), e.user, "gone")
	if err != nil || got.State != "dead" {
		t.Fatalf("after the restart: %+v, %v; want the vm dead", got, err)
	}
	cg, err := e.mgr.sandbox.cgroups.Open(id)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range cg.Dirs() {
		if _, err := os.Stat(d); !os.IsNotExist(err) {
			t.Errorf("cgroup %s of the dead vmm is still there", d)
		}
	}
	if _, ok := e.mgr.uids.Lookup(id); ok {
		t.Errorf("the dead vmm %s still holds its uid lease", id)
	}
}
