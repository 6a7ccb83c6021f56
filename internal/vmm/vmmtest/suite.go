// Package vmmtest is the conformance suite every VMM backend runs: the same
// behavioural checks (boot, agent exec, checkpoint, restore into a clone,
// adopt, kill, and refusal of foreign or mismatched snapshots) against a real
// VMM with a real guest.
package vmmtest

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/noid-vm/noid/internal/agent/client"
	"github.com/noid-vm/noid/internal/agent/proto"
	"github.com/noid-vm/noid/internal/errdefs"
	"github.com/noid-vm/noid/internal/storage"
	"github.com/noid-vm/noid/internal/vmm"
)

// Setup is what the suite needs from a backend's test.
type Setup struct {
	// Backend is the backend under test.
	Backend vmm.Backend
	// Kernel, Initrd and Rootfs are the guest boot files.
	Kernel, Initrd, Rootfs string
	// Accel is the acceleration the backend runs with.
	Accel vmm.Accel
}

type vm struct {
	spec vmm.Spec
	inst vmm.Instance
}

func newSpec(t *testing.T, s Setup, id string) vmm.Spec {
	dir, err := os.MkdirTemp("", "vmmtest-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return vmm.Spec{
		ID: id, Name: id, Dir: dir, RunDir: dir, VCPUs: 1, MemoryMiB: 256,
		Kernel: s.Kernel, Initrd: s.Initrd, Disk: filepath.Join(dir, "disk.ext4"), MemFile: filepath.Join(dir, "mem.raw"),
		Accel: s.Accel, SerialLog: filepath.Join(dir, "serial.log"), Sandbox: &vmm.Sandbox{Seccomp: true},
	}
}

// newDisk gives spec the disk of a VM that boots from s.Rootfs: a chain
// over it for layered backends, a copy of it otherwise.
func newDisk(t *testing.T, s Setup, cp *storage.Copier, spec vmm.Spec) {
	t.Helper()
	if l, ok := s.Backend.(vmm.Layered); ok {
		if err := l.NewDisk(ctx(t), spec.Dir, s.Rootfs, 0, cp); err != nil {
			t.Fatal(err)
		}
		return
	}
	if err := cp.CopyFile(ctx(t), s.Rootfs, spec.Disk); err != nil {
		t.Fatal(err)
	}
}

// copySnapshot copies every file of the snapshot in src into dst, then
// lets edit change its metadata.
func copySnapshot(t *testing.T, cp *storage.Copier, src, dst string, edit func(m *vmm.SnapshotMeta)) {
	t.Helper()
	ents, err := os.ReadDir(src)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if e.Name() != vmm.SnapMeta {
			if err := cp.CopyFile(ctx(t), filepath.Join(src, e.Name()), filepath.Join(dst, e.Name())); err != nil {
				t.Fatal(err)
			}
		}
	}
	meta, err := vmm.ReadMeta(src)
	if err != nil {
		t.Fatal(err)
	}
	edit(meta)
	b, _ := json.Marshal(meta)
	if err := os.WriteFile(filepath.Join(dst, vmm.SnapMeta), b, 0o600); err != nil {
		t.Fatal(err)
	}
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return c
}

func connect(t *testing.T, inst vmm.Instance) *client.Client {
	t.Helper()
	conn, err := inst.DialAgent(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	c, err := client.Connect(ctx(t), conn, client.Options{})
	if err != nil {
		t.Fatalf("agent hello: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func run(t *testing.T, c *client.Client, argv ...string) string {
	t.Helper()
	p, err := c.Exec(ctx(t), proto.ExecRequest{Argv: argv})
	if err != nil {
		t.Fatal(err)
	}
	var out, errb bytes.Buffer
	done := make(chan struct{})
	go func() { io.Copy(&errb, p.Stderr()); close(done) }()
	io.Copy(&out, p.Stdout())
	<-done
	ex, err := p.Wait()
	if err != nil || ex.Code != 0 {
		t.Fatalf("%v: exit %d %v: %s", argv, ex.Code, err, errb.String())
	}
	return out.String()
}

// Run runs the conformance suite against s.Backend.
func Run(t *testing.T, s Setup) {
	if err := s.Backend.Check(ctx(t)); err != nil {
		t.Fatalf("backend check: %v", err)
	}
	cp := &storage.Copier{}
	spec := newSpec(t, s, "conf-a")
	newDisk(t, s, cp, spec)
	inst, err := s.Backend.Boot(ctx(t), spec)
	if err != nil {
		t.Fatalf("boot: %v", err)
	}
	t.Cleanup(func() { inst.Kill(context.Background()) })
	c := connect(t, inst)

	t.Run("exec", func(t *testing.T) {
		if out := run(t, c, "uname", "-r"); strings.TrimSpace(out) == "" {
			t.Fatal("empty uname -r")
		}
	})

	snap, err := os.MkdirTemp("", "vmmtest-snap-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(snap) })
	t.Run("checkpoint and clone", func(t *testing.T) {
		run(t, c, "sh", "-c", "echo before > /root/mark; sync")
		tm, err := inst.Checkpoint(ctx(t), snap, cp)
		if err != nil {
			t.Fatalf("checkpoint: %v", err)
		}
		if _, err := vmm.ReadMeta(snap); err != nil {
			// Backends that leave metadata to the caller get it here.
			meta := &vmm.SnapshotMeta{Backend: s.Backend.Name(), VCPUs: spec.VCPUs, MemoryMiB: spec.MemoryMiB, Accel: spec.Accel}
			meta.VMMVersion, _ = s.Backend.Version(ctx(t))
			if err := vmm.WriteMeta(snap, meta); err != nil {
				t.Fatal(err)
			}
		}
		t.Logf("checkpoint: pause %v total %v", tm.Pause, tm.Total)
		// The original keeps running after a checkpoint.
		run(t, c, "sh", "-c", "echo after > /root/mark")

		spec2 := newSpec(t, s, "conf-b")
		inst2, tr, err := s.Backend.Restore(ctx(t), spec2, snap, cp)
		if err != nil {
			t.Fatalf("restore: %v", err)
		}
		t.Cleanup(func() { inst2.Kill(context.Background()) })
		t.Logf("restore: %+v", tr)
		c2 := connect(t, inst2)
		if got := run(t, c2, "cat", "/root/mark"); got != "before\n" {
			t.Fatalf("clone sees %q, want the checkpoint's content", got)
		}
		if got := run(t, c, "cat", "/root/mark"); got != "after\n" {
			t.Fatalf("original sees %q", got)
		}
		run(t, c2, "sh", "-c", "echo clone > /root/mark")
		if got := run(t, c, "cat", "/root/mark"); got != "after\n" {
			t.Fatalf("clone's write reached the original: %q", got)
		}
	})

	t.Run("refuses foreign and mismatched snapshots", func(t *testing.T) {
		if _, err := vmm.ReadMeta(snap); err != nil {
			t.Skip("no snapshot")
		}
		for _, mut := range []func(m *vmm.SnapshotMeta){
			func(m *vmm.SnapshotMeta) { m.Backend = "other-vmm" },
			func(m *vmm.SnapshotMeta) { m.MemoryMiB *= 2 },
		} {
			bad, _ := os.MkdirTemp("", "vmmtest-bad-")
			defer os.RemoveAll(bad)
			copySnapshot(t, cp, snap, bad, mut)
			spec3 := newSpec(t, s, "conf-bad")
			inst3, _, err := s.Backend.Restore(ctx(t), spec3, bad, cp)
			if err == nil {
				inst3.Kill(context.Background())
				t.Fatal("restore of a mismatched snapshot succeeded")
			}
			if !errors.Is(err, errdefs.ErrInvalidArgument) {
				t.Errorf("mismatched snapshot: %v, want an invalid-argument error", err)
			}
		}
	})

	if _, ok := s.Backend.(vmm.Preparer); ok {
		t.Run("prepared load, paused, and a state that does not load", func(t *testing.T) {
			prepared(t, s, cp, snap)
		})
		t.Run("checkpoint of a restored vm, restored again", func(t *testing.T) {
			chained(t, s, cp, snap)
		})
	}

	t.Run("adopt", func(t *testing.T) {
		pid := inst.Pid()
		inst.Close()
		c.Close()
		adopted, err := s.Backend.Adopt(ctx(t), spec, pid)
		if err != nil {
			t.Fatalf("adopt pid %d: %v", pid, err)
		}
		inst = adopted
		c = connect(t, adopted)
		if got := run(t, c, "cat", "/root/mark"); got != "after\n" {
			t.Fatalf("adopted vm sees %q", got)
		}
	})

	t.Run("kill", func(t *testing.T) {
		if err := inst.Kill(ctx(t)); err != nil {
			t.Fatal(err)
		}
		select {
		case <-inst.Done():
		case <-time.After(10 * time.Second):
			t.Fatal("Done not closed after Kill")
		}
		if _, err := s.Backend.Adopt(ctx(t), spec, inst.Pid()); !errors.Is(err, vmm.ErrGone) {
			t.Fatalf("adopt of a killed vm: %v, want ErrGone", err)
		}
	})
}

// prepared checks a Preparer's VMM: LoadPaused leaves the guest stopped
// until Resume, and a device state that does not load fails LoadPaused
// (the VMM is then killed, nothing else is touched).
func prepared(t *testing.T, s Setup, cp *storage.Copier, snap string) {
	prep := s.Backend.(vmm.Preparer)
	spec := newSpec(t, s, "conf-prep")
	p, err := prep.Prepare(ctx(t), spec, snap, cp)
	if err != nil {
		t.Fatalf("prepare: %v", err)
	}
	t.Cleanup(func() { p.Kill(context.Background()) })
	if _, err := p.LoadPaused(ctx(t)); err != nil {
		t.Fatalf("load paused: %v", err)
	}
	// Paused: the agent does not answer until Resume.
	conn, err := p.DialAgent(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	hctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	_, herr := client.Connect(hctx, conn, client.Options{})
	cancel()
	conn.Close()
	if herr == nil {
		t.Fatal("the agent of a vm loaded paused answered")
	}
	if err := p.Resume(ctx(t)); err != nil {
		t.Fatal(err)
	}
	c := connect(t, p)
	if got := run(t, c, "cat", "/root/mark"); got != "before\n" {
		t.Fatalf("prepared clone sees %q", got)
	}

	// A garbled device state: the files are right, the load fails.
	bad, _ := os.MkdirTemp("", "vmmtest-badstate-")
	defer os.RemoveAll(bad)
	copySnapshot(t, cp, snap, bad, func(*vmm.SnapshotMeta) {})
	st, err := os.ReadFile(filepath.Join(bad, vmm.SnapState))
	if err != nil {
		t.Fatal(err)
	}
	for i := 64; i < len(st); i += 97 {
		st[i] ^= 0x5a
	}
	os.WriteFile(filepath.Join(bad, vmm.SnapState), st, 0o600)
	spec2 := newSpec(t, s, "conf-prep-bad")
	p2, err := prep.Prepare(ctx(t), spec2, bad, cp)
	if err != nil {
		t.Fatalf("prepare: %v", err)
	}
	defer p2.Kill(context.Background())
	if _, err := p2.LoadPaused(ctx(t)); err == nil {
		t.Fatal("a garbled device state loaded")
	}
}

// chained checkpoints a VM restored from snap after it wrote to its disk,
// restores that checkpoint, and checks that each restore sees its own
// checkpoint's files, and that the first snapshot is unchanged by it all.
func chained(t *testing.T, s Setup, cp *storage.Copier, snap string) {
	sum := func(dir string) map[string]string {
		out := map[string]string{}
		ents, _ := os.ReadDir(dir)
		for _, e := range ents {
			b, _ := os.ReadFile(filepath.Join(dir, e.Name()))
			out[e.Name()] = string(b)
		}
		return out
	}
	before := sum(snap)
	spec := newSpec(t, s, "conf-c1")
	inst, _, err := s.Backend.Restore(ctx(t), spec, snap, cp)
	if err != nil {
		t.Fatalf("restore: %v", err)
	}
	t.Cleanup(func() { inst.Kill(context.Background()) })
	c := connect(t, inst)
	run(t, c, "sh", "-c", "echo second > /root/mark2; dd if=/dev/urandom of=/root/blob bs=64k count=16 2>/dev/null; md5sum /root/blob > /root/blob.md5; sync")
	want := run(t, c, "cat", "/root/blob.md5")
	snap2, _ := os.MkdirTemp("", "vmmtest-snap2-")
	t.Cleanup(func() { os.RemoveAll(snap2) })
	if _, err := inst.Checkpoint(ctx(t), snap2, cp); err != nil {
		t.Fatalf("checkpoint of a restored vm: %v", err)
	}
	// The VM goes on writing after its checkpoint.
	run(t, c, "sh", "-c", "echo later > /root/mark2; sync")

	spec2 := newSpec(t, s, "conf-c2")
	inst2, _, err := s.Backend.Restore(ctx(t), spec2, snap2, cp)
	if err != nil {
		t.Fatalf("restore of the second checkpoint: %v", err)
	}
	t.Cleanup(func() { inst2.Kill(context.Background()) })
	c2 := connect(t, inst2)
	if got := run(t, c2, "cat", "/root/mark", "/root/mark2"); got != "before\nsecond\n" {
		t.Errorf("second restore sees %q", got)
	}
	if got := run(t, c2, "sh", "-c", "md5sum /root/blob"); got != want {
		t.Errorf("blob: %q, want %q", got, want)
	}
	if got := run(t, c, "cat", "/root/mark2"); got != "later\n" {
		t.Errorf("the checkpointed vm sees %q", got)
	}
	for name, content := range sum(snap) {
		if before[name] != content {
			t.Errorf("snapshot file %s changed after restores and checkpoints of its clones", name)
		}
	}
}
