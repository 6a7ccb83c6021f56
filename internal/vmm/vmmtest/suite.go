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
	if err := cp.CopyFile(ctx(t), s.Rootfs, spec.Disk); err != nil {
		t.Fatal(err)
	}
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
		meta, err := vmm.ReadMeta(snap)
		if err != nil {
			t.Skip("no snapshot")
		}
		for _, mut := range []func(m *vmm.SnapshotMeta){
			func(m *vmm.SnapshotMeta) { m.Backend = "other-vmm" },
			func(m *vmm.SnapshotMeta) { m.MemoryMiB *= 2 },
		} {
			bad, _ := os.MkdirTemp("", "vmmtest-bad-")
			defer os.RemoveAll(bad)
			for _, f := range []string{vmm.SnapMemory, vmm.SnapState, vmm.SnapDisk} {
				if _, err := os.Stat(filepath.Join(snap, f)); err == nil {
					cp.CopyFile(ctx(t), filepath.Join(snap, f), filepath.Join(bad, f))
				}
			}
			m := *meta
			mut(&m)
			b, _ := json.Marshal(m)
			os.WriteFile(filepath.Join(bad, vmm.SnapMeta), b, 0o600)
			spec3 := newSpec(t, s, "conf-bad")
			inst3, _, err := s.Backend.Restore(ctx(t), spec3, bad, cp)
			if err == nil {
				inst3.Kill(context.Background())
				t.Fatalf("restore of a mismatched snapshot (%+v) succeeded", m)
			}
			if !errors.Is(err, errdefs.ErrInvalidArgument) {
				t.Errorf("mismatched snapshot: %v, want an invalid-argument error", err)
			}
		}
	})

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
