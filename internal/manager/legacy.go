package manager

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/noid-vm/noid/internal/config"
	"github.com/noid-vm/noid/internal/storage"
	"github.com/noid-vm/noid/internal/vmm"
	"github.com/noid-vm/noid/internal/vmm/qemu"
)

// The original Rust noid (noid-cli 0.2) kept one golden snapshot, flat, in
// ~/.noid/golden/: rootfs.ext4, memory.snap, vmstate.snap and a
// config.json that holds only {"cpus", "mem_mib"} (and, from some
// versions on, "snapshot_rootfs_path"). It recorded nothing about the VMM,
// kernel or initramfs it was made with.

// LegacyGoldenConfig is the original noid's golden config.json, and the
// seed-format config.json of this noid's golden view (see goldenview.go).
type LegacyGoldenConfig struct {
	// CPUs and MemMiB are the spec the snapshot was taken with.
	CPUs   int `json:"cpus"`
	MemMiB int `json:"mem_mib"`
}

// qemuStreamMagic starts every QEMU migration stream ("QEVM").
var qemuStreamMagic = []byte("QEVM")

// SnapshotKind tells what VMM wrote a vmstate.snap: "qemu" for a QEMU
// migration stream, "firecracker" otherwise (the original noid ran only
// Firecracker, whose state files have no magic of their own).
func SnapshotKind(vmstate string) (string, error) {
	f, err := os.Open(vmstate)
	if err != nil {
		return "", err
	}
	defer f.Close()
	head := make([]byte, len(qemuStreamMagic))
	if _, err := io.ReadFull(f, head); err != nil {
		return "", fmt.Errorf("reading %s: %w", vmstate, err)
	}
	if bytes.Equal(head, qemuStreamMagic) {
		return qemu.Name, nil
	}
	return "firecracker", nil
}

// LegacyGoldenResult is what ImportLegacyGolden did with a flat golden.
type LegacyGoldenResult struct {
	// Spec is the golden's <vcpus>x<memory_mib>.
	Spec string
	// Dir is where the golden is (or would have been) put.
	Dir string
	// Imported is true when the golden was added now.
	Imported bool
	// Already is true when an earlier import put it there.
	Already bool
	// Skipped, when not empty, says why it was not imported.
	Skipped string
	// Stale, when not empty, says why creates will not use it.
	Stale string
	// Assumed lists what the import had to assume.
	Assumed string
}

// legacySource names the imported golden's origin in its config.json;
// a second import recognises its own work by it.
func legacySource(src string) string { return "import of the original noid's golden " + src }

// ImportLegacyGolden imports the original noid's flat golden snapshot in
// src (read, never changed) as the system golden of its spec in cfg's
// storage root, when its files can run here: a QEMU migration stream with
// a flat memory file. A Firecracker snapshot of the original's guest (no
// noid-agent) is refused with the reason. The imported golden is then
// stale-checked like any other. The caller holds the data dir's lock.
func ImportLegacyGolden(ctx context.Context, cfg *config.Config, log *slog.Logger, src string) (*LegacyGoldenResult, error) {
	b, err := os.ReadFile(filepath.Join(src, vmm.GoldenConfig))
	if err != nil {
		return nil, fmt.Errorf("reading the golden's config: %w", err)
	}
	var lc LegacyGoldenConfig
	if err := json.Unmarshal(b, &lc); err != nil || lc.CPUs <= 0 || lc.MemMiB <= 0 {
		return nil, fmt.Errorf("golden %s: config.json has no usable cpus and mem_mib (%s)", src, strings.TrimSpace(string(b)))
	}
	m := &Manager{cfg: cfg, log: log, copier: &storage.Copier{}}
	res := &LegacyGoldenResult{Spec: specDirName(lc.CPUs, lc.MemMiB)}
	res.Dir = filepath.Join(m.systemGoldenRoot(), res.Spec)
	for _, name := range vmm.SnapshotFiles {
		if _, err := os.Stat(filepath.Join(src, name)); err != nil {
			res.Skipped = fmt.Sprintf("%s is missing", name)
			return res, nil
		}
	}
	kind, err := SnapshotKind(filepath.Join(src, vmm.SnapState))
	if err != nil {
		return nil, err
	}
	if kind != qemu.Name {
		res.Skipped = "its vmstate.snap is a Firecracker snapshot of the original noid's guest, which has no noid-agent: " +
			"it cannot run under this noid (not under QEMU, and not under its Firecracker backend either); " +
			"make a new golden here: create a VM, set it up, `noid checkpoint` it and `noid golden promote` the checkpoint"
		return res, nil
	}
	if fi, err := os.Stat(filepath.Join(src, vmm.SnapMemory)); err != nil || fi.Size() != int64(lc.MemMiB)<<20 {
		res.Skipped = fmt.Sprintf("its memory.snap is not a flat image of %d MiB of RAM", lc.MemMiB)
		return res, nil
	}
	if err := mountStorage(ctx, cfg, log); err != nil {
		return nil, err
	}
	if err := m.selectBackend(ctx, nil); err != nil {
		return nil, err
	}
	if m.backend.Name() != qemu.Name {
		res.Skipped = "it is a QEMU snapshot and this server runs the " + m.backend.Name() + " backend"
		return res, nil
	}
	bf, err := m.resolveBootFiles()
	if err != nil {
		return nil, err
	}
	if c, err := readGoldenConfig(res.Dir); err == nil {
		if c.Source == legacySource(src) {
			res.Already = true
			res.Stale = m.staleReason(ctx, c, bf)
		} else {
			res.Skipped = "this server has a golden for " + res.Spec + " already (" + c.Source + "); it was left as it is"
		}
		return res, nil
	} else if !errors.Is(err, fs.ErrNotExist) {
		return nil, err
	}
	state, err := os.ReadFile(filepath.Join(src, vmm.SnapState))
	if err != nil {
		return nil, err
	}
	meta := vmm.SnapshotMeta{
		Backend: qemu.Name, VCPUs: lc.CPUs, MemoryMiB: lc.MemMiB, Accel: m.accel,
		// The stream names the devices it holds state for.
		HasNet:    bytes.Contains(state, []byte("virtio-net")),
		CreatedAt: time.Now().UTC(),
		// RAM in its own file and none in the stream: this noid's format;
		// a stream saved with x-ignore-shared is the first format.
		Format: 2,
	}
	if bytes.Contains(state, []byte("x-ignore-shared")) {
		meta.Format = 0
	}
	meta.VMMVersion, _ = m.backend.Version(ctx)
	kernel, initrd, rootfs := bootFileIDs(ctx, &m.ids, bf)
	for _, f := range []bootFileID{kernel, initrd, rootfs} {
		if f.Err != nil {
			return nil, fmt.Errorf("hashing this server's boot files: %w", f.Err)
		}
	}
	meta.KernelSHA256, meta.InitrdSHA256 = kernel.ID, initrd.ID
	if fi, err := os.Stat(filepath.Join(src, vmm.SnapState)); err == nil {
		meta.CreatedAt = fi.ModTime().UTC()
	}
	res.Assumed = "the original's config.json does not record the VMM, kernel, initramfs or base image a golden was made with: " +
		"they were taken to be this server's (" + qemu.Name + " " + meta.VMMVersion + ", " + bf.Kernel + ", " + bf.Initrd + "); " +
		"if creates from it fail, remove it with `noid golden rm " + res.Spec + "`"
	root := m.systemGoldenRoot()
	if err := os.MkdirAll(root, 0o700); err != nil {
		return nil, err
	}
	tmp := filepath.Join(root, ".tmp-"+newID(4))
	if err := os.Mkdir(tmp, 0o700); err != nil {
		return nil, fmt.Errorf("creating golden dir: %w", err)
	}
	ok := false
	defer func() {
		if !ok {
			os.RemoveAll(tmp)
		}
	}()
	for _, name := range vmm.SnapshotFiles {
		if err := m.copier.CopyFile(ctx, filepath.Join(src, name), filepath.Join(tmp, name)); err != nil {
			return nil, fmt.Errorf("copying %s of the golden %s: %w", name, src, err)
		}
	}
	if err := m.sealSnapshot(ctx, tmp, &meta); err != nil {
		return nil, fmt.Errorf("checksumming the imported golden: %w", err)
	}
	gc := goldenConfig{SnapshotMeta: meta, RootfsFingerprint: rootfs.ID, Source: legacySource(src), PromotedAt: time.Now().UTC()}
	out, _ := json.MarshalIndent(gc, "", "  ")
	if err := os.WriteFile(filepath.Join(tmp, vmm.GoldenConfig), out, 0o600); err != nil {
		return nil, fmt.Errorf("writing golden config: %w", err)
	}
	if err := syncTree(tmp); err != nil {
		return nil, fmt.Errorf("syncing the imported golden: %w", err)
	}
	if err := os.Rename(tmp, res.Dir); err != nil {
		return nil, fmt.Errorf("publishing the imported golden: %w", err)
	}
	ok = true
	storage.FsyncDir(root)
	res.Imported = true
	res.Stale = m.staleReason(ctx, &gc, bf)
	log.Info("golden snapshot imported from the original noid", "user", "root", "spec", res.Spec, "from", src)
	if err := m.refreshGoldenView(ctx); err != nil {
		log.Warn("golden view not refreshed", "err", err)
	}
	return res, nil
}
