//go:build e2e

package e2e

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/noid-vm/noid/client"
)

// TestReflinkStorage: with [storage] reflink_image_size the server creates
// and mounts a loop-backed XFS, says so at start-up, and checkpoints,
// rewinds and clones work on it.
func TestReflinkStorage(t *testing.T) {
	var mnt string
	t.Cleanup(func() {
		if mnt != "" {
			exec.Command("umount", mnt).Run()
			os.RemoveAll(filepath.Dir(mnt))
		}
	})
	e := NewEnv(t, WithConfig("[storage]\nreflink_image_size = \"2G\""))
	mnt = filepath.Join(e.Dir, "data", "reflink")
	log := e.Log()
	if !strings.Contains(log, "reflink storage mounted") || !strings.Contains(log, "storage: copies are reflinks: [storage] reflink_image_size keeps storage on the loop-mounted XFS image") {
		t.Fatalf("the server did not report reflink storage:\n%s", log)
	}
	if out := e.serverCmd(t, "storage"); !strings.Contains(out, "mode:         auto\nresolved:     reflink-image\nwhy:          [storage] reflink_image_size") {
		t.Errorf("noid-server storage: %s", out)
	}
	e.Create("r")
	e.MustExec("r", "sh", "-c", "echo on-xfs > /root/f")
	cp, err := e.Client.Checkpoint(ctx(t), "r", client.CheckpointRequest{Name: "c"})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("checkpoint on reflink storage: pause %.1f ms, %+v", cp.PauseMs, *cp.Timings)
	if m, _ := filepath.Glob(filepath.Join(mnt, "users", "*", "checkpoints", cp.ID, "memory.snap")); len(m) != 1 {
		t.Fatalf("checkpoint is not on the reflink mount: %v", m)
	}
	// The clone takes the blank spare the checkpoint prepared: FICLONE into
	// files a waiting QEMU already has mapped.
	e.WaitCloneSpare(2 * time.Minute)
	r2, err := e.Client.Clone(ctx(t), "r", "c", "r2")
	if err != nil {
		t.Fatal(err)
	}
	if r2.BootReason != "warm spare" {
		t.Errorf("the clone did not use the waiting spare: %q %+v", r2.BootReason, *r2.Timings)
	}
	e.MustExec("r2", "sh", "-c", "echo clone > /root/g")
	e.MustExec("r", "sh", "-c", "echo changed > /root/f")
	if _, err := e.Client.Restore(ctx(t), "r", "c"); err != nil {
		t.Fatal(err)
	}
	for _, vm := range []string{"r", "r2"} {
		if got := e.MustExec(vm, "cat", "/root/f"); got != "on-xfs\n" {
			t.Errorf("%s: %q", vm, got)
		}
	}
}

// TestHostOutOfMemory: a VM the host has no memory for is refused with a
// clear error, nothing is created, and running VMs are unaffected.
func TestHostOutOfMemory(t *testing.T) {
	e := NewEnv(t)
	e.Create("small")
	e.Stop()
	cfg := strings.Replace(readFile(t, e.Config), "[network]", "[quota]\nhost_memory_overcommit = 0.000001\n[network]", 1)
	os.WriteFile(e.Config, []byte(cfg), 0o600)
	e.Start()
	_, err := e.Client.CreateVM(ctx(t), client.CreateVMRequest{Name: "big"})
	if !errors.Is(err, client.ErrResourceExhausted) || !strings.Contains(err.Error(), "the host is out of memory") {
		t.Fatalf("create on a host without memory: %v", err)
	}
	if r := e.CLI("", "create", "big"); r.Code != 1 || !strings.Contains(r.Stderr, "hint:") {
		t.Errorf("cli: %d %q", r.Code, r.Stderr)
	}
	if vms, _ := e.Client.ListVMs(ctx(t)); len(vms) != 1 {
		t.Errorf("VMs after the refused create: %+v", vms)
	}
	if got := strings.TrimSpace(e.MustExec("small", "echo", "fine")); got != "fine" {
		t.Errorf("running VM: %q", got)
	}
}
