package manager

import (
	"syscall"
	"testing"
	"time"

	"github.com/noid-vm/noid/internal/procfs"
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
	e.open()
	for _, v := range []struct {
		what string
		pid  int
	}{{"the orphaned VMM", orphan.PID}, {"the VMM of a dead VM", dead.PID}} {
		deadline := time.Now().Add(30 * time.Second)
		for syscall.Kill(v.pid, 0) == nil && !procfs.Exited(v.pid) {
			if time.Now().After(deadline) {
				t.Fatalf("%s (pid %d) still runs after the restart\n%s", v.what, v.pid, lastLines(e.logs.String(), 20))
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	if got := e.mustExec("keep", "echo", "alive"); got != "alive\n" {
		t.Errorf("the VM the store knows: %q", got)
	}
	if v, err := e.mgr.GetVM(ctx, e.user, "keep"); err != nil || v.PID != keep.PID {
		t.Errorf("keep after the restart: %+v %v (pid was %d)", v, err, keep.PID)
	}
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
