package manager

import (
	"bytes"
	"encoding/json"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/noid-vm/noid/internal/config"
	"github.com/noid-vm/noid/internal/storage"
	"github.com/noid-vm/noid/internal/vmm"
)

// writeGolden writes a golden directory for spec with the given disk
// files (name -> content; a nil content makes an empty qcow2 overlay of
// the raw size).
func writeGolden(t *testing.T, dir string, vcpus, mem int, promoted time.Time, disks map[string][]byte, raw int64) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	for name, b := range disks {
		p := filepath.Join(dir, name)
		if b == nil {
			if err := storage.CreateQcow2(p, raw); err != nil {
				t.Fatal(err)
			}
			continue
		}
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	for _, name := range []string{vmm.SnapMemory, vmm.SnapState} {
		os.WriteFile(filepath.Join(dir, name), []byte(name+promoted.String()), 0o600)
	}
	gc := goldenConfig{SnapshotMeta: vmm.SnapshotMeta{Backend: "qemu", VCPUs: vcpus, MemoryMiB: mem}, PromotedAt: promoted}
	b, _ := json.Marshal(gc)
	if err := os.WriteFile(filepath.Join(dir, vmm.GoldenConfig), b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// viewState describes the view in root: each of its names with its link
// target ("=file" for a regular file, "-" when missing), and config.json.
func viewState(t *testing.T, root string) (map[string]string, *goldenViewConfig) {
	t.Helper()
	out := map[string]string{}
	for _, name := range goldenViewFiles {
		p := filepath.Join(root, name)
		fi, err := os.Lstat(p)
		switch {
		case err != nil:
			out[name] = "-"
		case fi.Mode()&os.ModeSymlink != 0:
			target, _ := os.Readlink(p)
			if _, err := os.Stat(p); err != nil {
				target += " (dangling)"
			}
			out[name] = target
		default:
			out[name] = "=file"
		}
	}
	return out, readGoldenView(root)
}

// TestGoldenView checks the seed's layout at the top of golden/ without
// VMs: links to a one-file golden, a flattened disk for a layered one,
// remade when the golden is replaced, still right after the storage root
// moves, gone when the default spec has no golden, and foreign files of
// those names left alone.
func TestGoldenView(t *testing.T) {
	if _, err := os.Stat("/usr/bin/qemu-img"); err != nil {
		t.Skip("needs qemu-img")
	}
	top := t.TempDir()
	cfg := &config.Config{DataDir: filepath.Join(top, "a"), DefaultVCPUs: 1, DefaultMemoryMiB: 256}
	m := &Manager{cfg: cfg, log: slog.New(slog.DiscardHandler)}
	ctx := tctx(t)
	root := func() string { return filepath.Join(cfg.DataDir, "golden") }
	t1 := time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)
	base := bytes.Repeat([]byte("ext4"), 1<<18) // 1 MiB
	writeGolden(t, filepath.Join(root(), "1x256"), 1, 256, t1, map[string][]byte{vmm.SnapDisk: base}, 0)
	writeGolden(t, filepath.Join(root(), "2x512"), 2, 512, t1, map[string][]byte{vmm.SnapDisk: base}, 0)

	// A one-file golden: three relative links and the seed's config.json.
	if err := m.refreshGoldenView(ctx); err != nil {
		t.Fatal(err)
	}
	links, vc := viewState(t, root())
	want := map[string]string{"memory.snap": "1x256/memory.snap", "vmstate.snap": "1x256/vmstate.snap", "rootfs.ext4": "1x256/rootfs.ext4", "config.json": "=file"}
	for k, v := range want {
		if links[k] != v {
			t.Errorf("view %s: %q, want %q", k, links[k], v)
		}
	}
	if vc == nil || vc.CPUs != 1 || vc.MemMiB != 256 || vc.Rootfs != "link" {
		t.Errorf("view config.json: %+v", vc)
	}
	b, _ := os.ReadFile(filepath.Join(root(), vmm.GoldenConfig))
	var seed map[string]any
	if json.Unmarshal(b, &seed) != nil || seed["cpus"] != 1.0 || seed["mem_mib"] != 256.0 {
		t.Errorf("config.json has not the seed's keys: %s", b)
	}
	// Replaced by a layered golden: rootfs.ext4 is the chain, flattened.
	t2 := t1.Add(time.Hour)
	os.Rename(filepath.Join(root(), "1x256"), filepath.Join(root(), ".backup-1x256"))
	writeGolden(t, filepath.Join(root(), "1x256"), 1, 256, t2, map[string][]byte{"disk-0000.raw": base, "disk-0001.qcow2": nil}, int64(len(base)))
	if err := m.refreshGoldenView(ctx); err != nil {
		t.Fatal(err)
	}
	links, vc = viewState(t, root())
	if links["rootfs.ext4"] != "=file" || links["memory.snap"] != "1x256/memory.snap" || vc == nil || vc.Rootfs != "flattened" || !vc.PromotedAt.Equal(t2) {
		t.Errorf("view of the layered golden: %v %+v", links, vc)
	}
	if got, _ := os.ReadFile(filepath.Join(root(), vmm.SnapDisk)); !bytes.Equal(got, base) {
		t.Errorf("the flattened rootfs.ext4 (%d bytes) is not the chain's disk (%d bytes)", len(got), len(base))
	}
	if m, _ := os.ReadFile(filepath.Join(root(), vmm.SnapMemory)); string(m) != vmm.SnapMemory+t2.String() {
		t.Errorf("view memory.snap shows %q, not the new golden's", m)
	}

	// The storage root moves: the links are relative and still resolve.
	os.RemoveAll(filepath.Join(root(), ".backup-1x256"))
	cfg.DataDir = filepath.Join(top, "b")
	if err := os.Rename(filepath.Join(top, "a"), cfg.DataDir); err != nil {
		t.Fatal(err)
	}
	links, _ = viewState(t, root())
	for k, v := range links {
		if v == "-" || strings.Contains(v, "dangling") {
			t.Errorf("after the move, view %s: %s", k, v)
		}
	}

	// The default spec changes to one with no golden: the view goes, the
	// goldens stay.
	cfg.DefaultMemoryMiB = 1024
	if err := m.refreshGoldenView(ctx); err != nil {
		t.Fatal(err)
	}
	links, _ = viewState(t, root())
	for k, v := range links {
		if v != "-" {
			t.Errorf("with no golden for the default spec, view %s is still there: %s", k, v)
		}
	}
	for _, spec := range []string{"1x256", "2x512"} {
		if _, err := readGoldenConfig(filepath.Join(root(), spec)); err != nil {
			t.Errorf("golden %s after the view went: %v", spec, err)
		}
	}

	// A file of a view name that is not the view's (the original noid's
	// own golden, say) is left alone and the view not made.
	cfg.DefaultVCPUs, cfg.DefaultMemoryMiB = 2, 512
	os.WriteFile(filepath.Join(root(), vmm.SnapMemory), []byte("theirs"), 0o600)
	if err := m.refreshGoldenView(ctx); err == nil || !strings.Contains(err.Error(), "not noid's view") {
		t.Errorf("refresh over a foreign memory.snap: %v", err)
	}
	if b, _ := os.ReadFile(filepath.Join(root(), vmm.SnapMemory)); string(b) != "theirs" {
		t.Errorf("the foreign memory.snap was changed: %q", b)
	}
}

// TestImportLegacyGoldenRefusesFirecracker imports the original noid's
// flat golden whose vmstate.snap is a Firecracker snapshot: nothing is
// imported, the report says why, and the old files are left as they were.
func TestImportLegacyGoldenRefusesFirecracker(t *testing.T) {
	src := filepath.Join(t.TempDir(), "golden")
	os.MkdirAll(src, 0o755)
	files := map[string]string{
		vmm.SnapDisk: "ext4", vmm.SnapMemory: "ram", vmm.SnapState: "\x01\x00firecracker vmstate",
		vmm.GoldenConfig: `{"cpus": 1, "mem_mib": 2048, "snapshot_rootfs_path": "/home/firecracker/.noid/storage/users/u/vms/_golden/rootfs.ext4"}`,
	}
	for name, body := range files {
		os.WriteFile(filepath.Join(src, name), []byte(body), 0o644)
	}
	cfg := &config.Config{DataDir: t.TempDir(), DefaultVCPUs: 1, DefaultMemoryMiB: 2048}
	res, err := ImportLegacyGolden(tctx(t), cfg, slog.New(slog.DiscardHandler), src)
	if err != nil {
		t.Fatal(err)
	}
	if res.Imported || res.Spec != "1x2048" || !strings.Contains(res.Skipped, "Firecracker snapshot") {
		t.Errorf("import of a Firecracker golden: %+v", res)
	}
	if _, err := os.Stat(filepath.Join(cfg.DataDir, "golden", "1x2048")); err == nil {
		t.Errorf("a golden dir was made for a snapshot that cannot run")
	}
	for name, body := range files {
		if b, _ := os.ReadFile(filepath.Join(src, name)); string(b) != body {
			t.Errorf("the old golden's %s changed", name)
		}
	}
}
