package manager

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/noid-vm/noid/internal/api"
	"github.com/noid-vm/noid/internal/storage"
	"github.com/noid-vm/noid/internal/vmm"
)

// TestGoldenStaleWhy checks each staleness trigger on real files: a golden
// recorded from the current kernel, initramfs, rootfs and VMM is fresh; a
// changed kernel, initramfs, VMM version or one byte in the middle of the
// rootfs (size and mtime put back) makes it stale, each with its own
// reason; putting the byte back makes it fresh again; goldens of older
// noids' fingerprints are stale with a reason that says to promote again;
// an unreadable file is a reason, not a crash.
func TestGoldenStaleWhy(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	rng := rand.New(rand.NewPCG(1, 2))
	random := func(n int) []byte {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(rng.Uint32()) | 1
		}
		return b
	}
	bf := bootFiles{Kernel: filepath.Join(dir, "vmlinuz"), Initrd: filepath.Join(dir, "initrd.img"), Rootfs: filepath.Join(dir, "rootfs.ext4")}
	os.WriteFile(bf.Kernel, random(1<<20), 0o644)
	os.WriteFile(bf.Initrd, random(512<<10), 0o644)
	// A sparse 96 MiB rootfs with data in its first, middle and last MiB.
	f, err := os.Create(bf.Rootfs)
	if err != nil {
		t.Fatal(err)
	}
	f.Truncate(96 << 20)
	for _, off := range []int64{0, 48 << 20, 95 << 20} {
		f.WriteAt(random(1<<20), off)
	}
	f.Close()

	ids := &storage.ContentIDs{Dir: filepath.Join(dir, "ids")}
	inputs := func() goldenInputs {
		in := goldenInputs{Backend: "qemu", Accel: vmm.AccelTCG, VMMVersion: "10.0.2"}
		in.Kernel, in.Initrd, in.Rootfs = bootFileIDs(ctx, ids, bf)
		return in
	}
	now := inputs()
	if now.Kernel.Err != nil || now.Initrd.Err != nil || now.Rootfs.Err != nil {
		t.Fatalf("ids: %+v", now)
	}
	kb, _ := os.ReadFile(bf.Kernel)
	if sum := sha256.Sum256(kb); now.Kernel.ID != hex.EncodeToString(sum[:]) {
		t.Errorf("the kernel id %s is not its SHA-256 (the form snapshot metadata records)", now.Kernel.ID)
	}
	golden := &goldenConfig{SnapshotMeta: vmm.SnapshotMeta{Backend: "qemu", Accel: vmm.AccelTCG, VMMVersion: "10.0.2",
		KernelSHA256: now.Kernel.ID, InitrdSHA256: now.Initrd.ID}, RootfsFingerprint: now.Rootfs.ID}
	if why := staleWhy(golden, inputs()); why != "" {
		t.Fatalf("a golden of the current files is stale: %s", why)
	}
	hashed := ids.Hashed()

	for _, c := range []struct {
		name, want string
		mutate     func() (undo func())
	}{
		{"kernel", "the kernel changed", func() func() { return flipByte(t, bf.Kernel, 4096) }},
		{"initrd", "the initramfs (agent) changed", func() func() { return flipByte(t, bf.Initrd, 100) }},
		{"rootfs middle byte", "the base rootfs changed", func() func() { return flipByte(t, bf.Rootfs, 48<<20+12345) }},
		{"rootfs middle hole", "the base rootfs changed", func() func() { return flipByte(t, bf.Rootfs, 30<<20) }},
	} {
		undo := c.mutate()
		if why := staleWhy(golden, inputs()); why != c.want {
			t.Errorf("%s changed: stale reason %q, want %q", c.name, why, c.want)
		}
		undo()
		if why := staleWhy(golden, inputs()); why != "" {
			t.Errorf("%s put back: still stale (%s)", c.name, why)
		}
	}
	// Each change and each undo was hashed once; unchanged files never.
	if n := ids.Hashed() - hashed; n != 8 {
		t.Errorf("%d hashes for 4 changes and 4 undos, want 8", n)
	}

	upgraded := inputs()
	upgraded.VMMVersion = "99.0.0"
	if why := staleWhy(golden, upgraded); why != "the VMM changed (10.0.2 → 99.0.0)" {
		t.Errorf("VMM upgraded: %q", why)
	}
	upgraded.VMMVersion = "" // unknown: no reason to refuse the golden
	if why := staleWhy(golden, upgraded); why != "" {
		t.Errorf("VMM version unknown: %q", why)
	}

	// Goldens of older noids.
	for _, old := range []string{"meta:" + strings.Repeat("ab", 32), strings.Repeat("cd", 32), ""} {
		g := *golden
		g.RootfsFingerprint = old
		if why := staleWhy(&g, inputs()); !strings.Contains(why, "promoted by an older noid whose base rootfs fingerprint") ||
			!strings.Contains(why, "promote it again") {
			t.Errorf("rootfs fingerprint %q: %q", old, why)
		}
	}
	g := *golden
	g.KernelSHA256 = "meta:" + strings.Repeat("ef", 32)
	if why := staleWhy(&g, inputs()); !strings.Contains(why, "older noid whose kernel fingerprint") {
		t.Errorf("legacy kernel fingerprint: %q", why)
	}

	os.Rename(bf.Rootfs, bf.Rootfs+".gone")
	if why := staleWhy(golden, inputs()); !strings.HasPrefix(why, "the base rootfs cannot be read (") {
		t.Errorf("rootfs missing: %q", why)
	}
}

// flipByte inverts the byte of path at off, puts its size and mtime back
// (only ctime tells), and returns what puts the byte back the same way.
func flipByte(t *testing.T, path string, off int64) (undo func()) {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 1)
	_, err = f.ReadAt(b, off)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	write := func(v byte) {
		time.Sleep(10 * time.Millisecond) // file timestamps tick coarsely (jiffies): let ctime move
		f, err := os.OpenFile(path, os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if _, err := f.WriteAt([]byte{v}, off); err != nil {
			t.Fatal(err)
		}
		if err := os.Chtimes(path, fi.ModTime(), fi.ModTime()); err != nil {
			t.Fatal(err)
		}
		if now, _ := os.Stat(path); now.Size() != fi.Size() || !now.ModTime().Equal(fi.ModTime()) {
			t.Fatalf("%s: size or mtime not put back", path)
		}
	}
	write(b[0] ^ 0xff)
	return func() { write(b[0]) }
}

// TestGoldenStaleCreates drives creates against one golden while its
// inputs change, with real VMs under QEMU: an unchanged golden serves the
// create (and the create hashes no file), a changed kernel, initramfs, or
// one byte in the middle of the rootfs (size and mtime put back) makes the
// create cold-boot with that reason, putting the byte back makes the
// golden serve again, a golden with an older noid's rootfs fingerprint
// cold-boots with a reason that says to promote it again, and a restart on
// a QEMU that reports another version (a wrapper around the real one, which
// then runs the VM) cold-boots with the VMM change as the reason.
func TestGoldenStaleCreates(t *testing.T) {
	begin := time.Now()
	e := newEnv(t, "")
	bf := e.ownBootFiles()
	ctx := tctx(t)
	e.create("src")
	e.mustExec("src", "sh", "-c", "echo golden > /root/mark")
	if _, err := e.mgr.Checkpoint(ctx, e.user, "src", api.CheckpointRequest{Name: "c"}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.mgr.PromoteGolden(ctx, e.user, api.GoldenPromoteRequest{VM: "src", Checkpoint: "c"}); err != nil {
		t.Fatal(err)
	}
	e.destroy("src")
	t.Logf("source vm, checkpoint and promotion: %v", time.Since(begin).Round(time.Millisecond))
	const stale = "golden snapshot for 1 vCPU/256 MiB is stale: "
	// expect creates a VM and checks how it booted: from the golden (reason
	// "" then; the VM must hold the golden's mark) or cold with reason. A
	// cold VM is destroyed as soon as its VMM runs, unless wait is set.
	expect := func(name, reason string, wait bool) {
		t.Helper()
		start := time.Now()
		v, err := e.mgr.CreateVM(ctx, e.user, api.CreateVMRequest{Name: name, NoWait: reason != "" && !wait})
		if err != nil {
			t.Fatalf("creating %s: %v", name, err)
		}
		t.Logf("%s: %s (%s) in %v", name, v.BootPath, v.BootReason, time.Since(start).Round(time.Millisecond))
		switch {
		case reason == "" && (v.BootPath != "golden" || e.mustExec(name, "cat", "/root/mark") != "golden\n"):
			t.Errorf("%s: boot %s (%s), want the golden", name, v.BootPath, v.BootReason)
		case reason != "" && (v.BootPath != "cold" || v.BootReason != stale+reason):
			t.Errorf("%s: boot %s (%q), want cold: %q", name, v.BootPath, v.BootReason, stale+reason)
		case wait:
			e.mustExec(name, "true")
		}
		e.destroy(name)
	}

	hashed := e.mgr.ids.Hashed()
	expect("fresh", "", false)
	if n := e.mgr.ids.Hashed() - hashed; n != 0 {
		t.Errorf("a create from an unchanged golden hashed %d files", n)
	}

	// grow appends n zero bytes to path (a kernel or initramfs still boots:
	// the loaders ignore trailing zeros) and returns what puts it back.
	grow := func(path string, n int) func() {
		fi, _ := os.Stat(path)
		if err := os.Truncate(path, fi.Size()+int64(n)); err != nil {
			t.Fatal(err)
		}
		return func() {
			os.Truncate(path, fi.Size())
			os.Chtimes(path, fi.ModTime(), fi.ModTime())
		}
	}
	undo := grow(bf.Kernel, 1)
	expect("kernel", "the kernel changed", false)
	undo()
	undo = grow(bf.Initrd, 512)
	expect("initrd", "the initramfs (agent) changed", false)
	undo()

	// One byte in the middle of the rootfs (a free block of the second
	// block group's data), with its size and mtime put back.
	fi, _ := os.Stat(bf.Rootfs)
	undo = flipByte(t, bf.Rootfs, fi.Size()/2+17<<20+123)
	expect("rootfs", "the base rootfs changed", false)
	gs, err := e.mgr.ListGolden(ctx, e.user)
	if err != nil || len(gs) != 1 || !gs[0].Stale || gs[0].StaleWhy != "the base rootfs changed" {
		t.Errorf("golden list after the rootfs changed: %+v %v", gs, err)
	}
	undo()
	expect("rootfs-back", "", false)

	// A golden promoted by an older noid (rootfs fingerprint of size,
	// mtime and the first and last MiB).
	cfgPath := filepath.Join(e.mgr.systemGoldenRoot(), "1x256", vmm.GoldenConfig)
	orig, err := os.ReadFile(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	var gc map[string]any
	json.Unmarshal(orig, &gc)
	gc["rootfs_fingerprint"] = "meta:" + strings.Repeat("0a", 32)
	legacy, _ := json.Marshal(gc)
	os.WriteFile(cfgPath, legacy, 0o600)
	expect("legacy", "it was promoted by an older noid whose base rootfs fingerprint (size, mtime, first and last MiB) cannot show the base rootfs is unchanged; promote it again", false)
	os.WriteFile(cfgPath, orig, 0o600)

	// A VMM upgrade: the server restarts on a QEMU that reports another
	// version.
	was := e.mgr.VMMVersion(ctx)
	if was == "" {
		t.Fatal("no QEMU version")
	}
	e.cfg.QEMUBinary = qemuReporting(t, "99.0.0")
	e.close()
	e.open()
	// The cold VM runs on the real QEMU behind the wrapper.
	expect("vmm", fmt.Sprintf("the VMM changed (%s → 99.0.0)", was), true)
}

// ownBootFiles gives the env copies of the tiny image's kernel, initramfs
// and rootfs (sparse), so a test can change them, and reopens the manager
// on them.
func (e *env) ownBootFiles() bootFiles {
	e.t.Helper()
	bf := bootFiles{Kernel: filepath.Join(e.dir, "vmlinuz"), Initrd: filepath.Join(e.dir, "initrd.img"), Rootfs: filepath.Join(e.dir, "rootfs.ext4")}
	for src, dst := range map[string]string{e.cfg.Kernel: bf.Kernel, e.cfg.Initrd: bf.Initrd, e.cfg.Rootfs: bf.Rootfs} {
		if err := (&storage.Copier{}).CopyFile(tctx(e.t), src, dst); err != nil {
			e.t.Fatal(err)
		}
	}
	e.cfg.Kernel, e.cfg.Initrd, e.cfg.Rootfs = bf.Kernel, bf.Initrd, bf.Rootfs
	e.close()
	e.open()
	return bf
}

// destroy destroys vm and fails the test if it cannot.
func (e *env) destroy(vm string) {
	e.t.Helper()
	if _, err := e.mgr.DestroyVM(tctx(e.t), e.user, vm); err != nil {
		e.t.Fatalf("destroying %s: %v", vm, err)
	}
}

// qemuReporting returns a wrapper around the real qemu-system-x86_64 that
// answers --version with version and runs the real QEMU for everything
// else, in a directory the sandboxed VMM's uid can reach.
func qemuReporting(t *testing.T, version string) string {
	t.Helper()
	real, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		t.Fatal(err)
	}
	dir, err := os.MkdirTemp("", "noid-qemu-wrapper-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.Chmod(dir, 0o755)
	p := filepath.Join(dir, "qemu-system-x86_64")
	script := fmt.Sprintf("#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'QEMU emulator version %s'; exit 0; fi\nexec %s \"$@\"\n", version, real)
	if err := os.WriteFile(p, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}
