package procfs

import (
	"os"
	"os/exec"
	"testing"
)

// TestExited: this process runs; a child that exited is a zombie until
// reaped, and gone after; a pid nobody has is gone.
func TestExited(t *testing.T) {
	if Exited(os.Getpid()) {
		t.Fatal("this process reads as exited")
	}
	cmd := exec.Command("true")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pid := cmd.Process.Pid
	// Wait for the exit without reaping: waitid with WNOWAIT.
	if err := waitNoReap(pid); err != nil {
		t.Fatal(err)
	}
	if !Exited(pid) {
		t.Fatalf("child %d exited but reads as running", pid)
	}
	cmd.Wait()
	if !Exited(pid) {
		t.Fatalf("reaped child %d reads as running", pid)
	}
	if !Exited(1 << 30) {
		t.Fatal("a pid beyond pid_max reads as running")
	}
}

// TestMeminfoMiB reads fields the kernel always has, and refuses others.
func TestMeminfoMiB(t *testing.T) {
	total, avail := MeminfoMiB("MemTotal"), MeminfoMiB("MemAvailable")
	if total <= 0 || avail <= 0 || avail > total {
		t.Fatalf("MemTotal %d MiB, MemAvailable %d MiB", total, avail)
	}
	if n := MeminfoMiB("NoSuchField"); n != -1 {
		t.Fatalf("a missing field read as %d", n)
	}
}
