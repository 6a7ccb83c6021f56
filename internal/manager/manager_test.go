package manager

import (
	"archive/tar"
	"bytes"
	"errors"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/noid-vm/noid/internal/api"
	"github.com/noid-vm/noid/internal/errdefs"
)

// TestLifecycle drives one manager through a VM's life from Go, without
// HTTP: create, exec, files in and out, checkpoint, rewind (into a warm
// spare), clone, golden promotion and a create from it, a restart that
// re-adopts the VMs, and destroy.
func TestLifecycle(t *testing.T) {
	e := newEnv(t, "")
	ctx := tctx(t)
	v := e.create("life")
	if v.State != "running" || v.BootPath != "cold" || v.PID == 0 {
		t.Fatalf("created vm: %+v", v)
	}
	if _, err := e.mgr.CreateVM(ctx, e.user, api.CreateVMRequest{Name: "life"}); !errors.Is(err, errdefs.ErrAlreadyExists) {
		t.Errorf("a second vm of the same name: %v", err)
	}
	if out := e.mustExec("life", "sh", "-c", "echo hello from $(hostname)"); out != "hello from life\n" {
		t.Errorf("exec: %q", out)
	}
	if _, _, code, err := e.exec("life", "sh", "-c", "exit 7"); err != nil || code != 7 {
		t.Errorf("exit code: %d %v", code, err)
	}

	// Files in and out through the agent.
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	tw.WriteHeader(&tar.Header{Name: "note.txt", Mode: 0o644, Size: 5, Typeflag: tar.TypeReg})
	tw.Write([]byte("hello"))
	tw.Close()
	if res, err := e.mgr.PutFiles(ctx, e.user, "life", "/root/in", &buf); err != nil || res.Entries != 1 || res.Bytes != 5 {
		t.Fatalf("put: %+v %v", res, err)
	}
	if _, err := e.mgr.PutFiles(ctx, e.user, "life", "root/in", strings.NewReader("")); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("put to a relative path: %v", err)
	}
	fi, err := e.mgr.StatFile(ctx, e.user, "life", "/root/in/note.txt")
	if err != nil || fi.Type != api.FileTypeFile || fi.Size != 5 {
		t.Fatalf("stat: %+v %v", fi, err)
	}
	rc, err := e.mgr.GetFiles(ctx, e.user, "life", "/root/in/note.txt")
	if err != nil {
		t.Fatal(err)
	}
	tr := tar.NewReader(rc)
	if hdr, err := tr.Next(); err != nil || hdr.Name != "note.txt" {
		t.Fatalf("get: %+v %v", hdr, err)
	}
	if b, _ := io.ReadAll(tr); string(b) != "hello" {
		t.Errorf("got %q", b)
	}
	rc.Close()
	if _, err := e.mgr.StatFile(ctx, e.user, "life", "/nope"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("stat of a missing path: %v", err)
	}

	// Checkpoint, change, rewind.
	e.mustExec("life", "sh", "-c", "echo one > /root/mark; sync")
	cp, err := e.mgr.Checkpoint(ctx, e.user, "life", api.CheckpointRequest{Name: "one", Label: "first"})
	if err != nil || cp.Name != "one" || cp.Label != "first" || cp.SizeBytes <= 0 {
		t.Fatalf("checkpoint: %+v %v", cp, err)
	}
	e.mustExec("life", "sh", "-c", "echo two > /root/mark; sync")
	e.waitCloneSpare(2 * time.Minute)
	before, _ := e.mgr.GetVM(ctx, e.user, "life")
	rw, err := e.mgr.Restore(ctx, e.user, "life", api.RestoreRequest{Checkpoint: "one"})
	if err != nil {
		t.Fatalf("rewind: %v", err)
	}
	if !rw.Timings.WarmSpare || rw.ID != before.ID || rw.RuntimeID == before.RuntimeID {
		t.Errorf("the rewind did not move the VM into the waiting spare: before %+v after %+v", before, rw)
	}
	if got := e.mustExec("life", "cat", "/root/mark"); got != "one\n" {
		t.Errorf("after the rewind: %q", got)
	}

	// Clone, which is independent.
	cl, err := e.mgr.Restore(ctx, e.user, "life", api.RestoreRequest{Checkpoint: "one", As: "life-2"})
	if err != nil || cl.Name != "life-2" || cl.Source != "life/one" {
		t.Fatalf("clone: %+v %v", cl, err)
	}
	if got := e.mustExec("life-2", "hostname"); got != "life-2\n" {
		t.Errorf("clone hostname: %q", got)
	}
	e.mustExec("life-2", "sh", "-c", "echo clone > /root/mark")
	if got := e.mustExec("life", "cat", "/root/mark"); got != "one\n" {
		t.Errorf("the clone's write reached the original: %q", got)
	}

	// Deleting a checkpoint stops the spares prepared for it.
	if _, err := e.mgr.Checkpoint(ctx, e.user, "life-2", api.CheckpointRequest{Name: "gone"}); err != nil {
		t.Fatalf("checkpoint of the clone: %v", err)
	}
	sv, err := e.mgr.store.GetVM(ctx, e.user.ID, "life-2")
	if err != nil {
		t.Fatal(err)
	}
	sc, err := e.mgr.store.GetCheckpoint(ctx, e.user.ID, sv.ID, "gone")
	if err != nil {
		t.Fatal(err)
	}
	goneDir := e.mgr.checkpointDir(sc)
	deadline := time.Now().Add(2 * time.Minute)
	for e.mgr.pool.ready(goneDir) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("no spare was prepared for checkpoint gone")
		}
		time.Sleep(50 * time.Millisecond)
	}
	e.mgr.pool.mu.Lock()
	goneSpare := e.mgr.pool.spares[goneDir][0]
	e.mgr.pool.mu.Unlock()
	if err := e.mgr.DeleteCheckpoint(ctx, e.user, "life-2", "gone"); err != nil {
		t.Fatalf("deleting the checkpoint: %v", err)
	}
	if n := e.mgr.pool.ready(goneDir); n != 0 {
		t.Errorf("%d spares still wait for a deleted checkpoint", n)
	}
	select {
	case <-goneSpare.inst.Done():
	case <-time.After(30 * time.Second):
		t.Error("the spare of a deleted checkpoint still runs")
	}

	// A golden snapshot from the checkpoint serves the next create.
	g, err := e.mgr.PromoteGolden(ctx, e.user, api.GoldenPromoteRequest{VM: "life", Checkpoint: "one"})
	if err != nil || g.VCPUs != 1 || g.MemoryMiB != 256 {
		t.Fatalf("promote: %+v %v", g, err)
	}
	gv := e.create("from-golden")
	if gv.BootPath != "golden" {
		t.Errorf("create after promotion booted %s (%s)", gv.BootPath, gv.BootReason)
	}
	if got := e.mustExec("from-golden", "cat", "/root/mark"); got != "one\n" {
		t.Errorf("golden vm: %q", got)
	}

	// A restart re-adopts every VM.
	e.close()
	e.open()
	vms, err := e.mgr.ListVMs(ctx, e.user)
	if err != nil || len(vms) != 3 {
		t.Fatalf("after a restart: %d vms %v", len(vms), err)
	}
	for _, v := range vms {
		if v.State != "running" {
			t.Errorf("%s is %s after a restart", v.Name, v.State)
		}
		e.mustExec(v.Name, "true")
	}

	res, err := e.mgr.DestroyVM(ctx, e.user, "life")
	if err != nil || res.Checkpoints != 1 {
		t.Fatalf("destroy: %+v %v", res, err)
	}
	if _, err := e.mgr.GetVM(ctx, e.user, "life"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("destroyed vm: %v", err)
	}
	// The golden is an independent copy: it still serves creates.
	if gs, err := e.mgr.ListGolden(ctx, e.user); err != nil || len(gs) != 1 || gs[0].Stale {
		t.Errorf("goldens after the source was destroyed: %+v %v", gs, err)
	}
	m, err := e.mgr.Metrics(ctx)
	if err != nil || m.VMsByState["running"] != 2 {
		t.Errorf("metrics: %+v %v", m, err)
	}
}
