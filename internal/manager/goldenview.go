package manager

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/noid-vm/noid/internal/storage"
	"github.com/noid-vm/noid/internal/vmm"
)

// The golden view shows the system golden of the default spec (config
// default_vcpus x default_memory_mib) the way the original noid laid its
// one golden out, at the top of <storage root>/golden/, next to the
// per-spec folders:
//
//	golden/memory.snap  -> 1x2048/memory.snap   (relative symlinks, so
//	golden/vmstate.snap -> 1x2048/vmstate.snap   they survive a move of
//	golden/rootfs.ext4  -> 1x2048/rootfs.ext4    the storage root)
//	golden/config.json     {"cpus":1,"mem_mib":2048,…} (the seed's keys)
//
// A golden whose disk is a chain of layers has no one file to link:
// rootfs.ext4 is then a flattened copy of the chain (sparse, made with
// qemu-img), remade when the golden changes. The view is refreshed at
// start-up (after a storage-root move), after each promotion, removal or
// import, and disappears when the default spec has no golden. Nothing of
// noid reads it; files of the same names that are not the view's (the
// original noid's own golden, say) are left alone.

// goldenViewFiles are the names of the view at the top of golden/.
var goldenViewFiles = []string{vmm.SnapMemory, vmm.SnapState, vmm.SnapDisk, vmm.GoldenConfig}

// goldenViewConfig is the view's config.json: the seed's keys, then what
// the view shows.
type goldenViewConfig struct {
	LegacyGoldenConfig
	// View marks the file as the view's and names the folder it shows.
	View string `json:"view"`
	// Backend is the VMM that took the snapshot.
	Backend string `json:"backend"`
	// PromotedAt identifies the golden shown (a new one is remade).
	PromotedAt time.Time `json:"promoted_at"`
	// Rootfs says what rootfs.ext4 is: "link" or "flattened".
	Rootfs string `json:"rootfs"`
}

// readGoldenView reads the view's config.json in root; nil when there is
// none or the file is not the view's.
func readGoldenView(root string) *goldenViewConfig {
	b, err := os.ReadFile(filepath.Join(root, vmm.GoldenConfig))
	if err != nil {
		return nil
	}
	var v goldenViewConfig
	if json.Unmarshal(b, &v) != nil || v.View == "" {
		return nil
	}
	return &v
}

// removeGoldenView removes the view from root: its symlinks, and its
// regular files when config.json says they are the view's.
func removeGoldenView(root string) {
	ours := readGoldenView(root) != nil
	for _, name := range goldenViewFiles {
		p := filepath.Join(root, name)
		if fi, err := os.Lstat(p); err == nil && (fi.Mode()&fs.ModeSymlink != 0 || ours) {
			os.Remove(p)
		}
	}
	os.Remove(filepath.Join(root, ".view-"+vmm.SnapDisk))
	os.Remove(filepath.Join(root, ".view-"+vmm.GoldenConfig))
}

// kickGoldenView refreshes the view in the background (a flattened disk
// can take a while); refreshes run one at a time.
func (m *Manager) kickGoldenView() {
	select {
	case <-m.closed:
		return
	default:
	}
	m.bg.Add(1)
	go func() {
		defer m.bg.Done()
		if err := m.refreshGoldenView(context.Background()); err != nil {
			m.log.Warn("golden view: not refreshed", "user", "system", "err", err)
		}
	}()
}

// refreshGoldenView makes the view at the top of the system golden root
// show the default spec's golden, or removes it when there is none.
func (m *Manager) refreshGoldenView(ctx context.Context) error {
	m.goldenViewMu.Lock()
	defer m.goldenViewMu.Unlock()
	root := m.systemGoldenRoot()
	spec := specDirName(m.cfg.DefaultVCPUs, m.cfg.DefaultMemoryMiB)
	gc, err := readGoldenConfig(filepath.Join(root, spec))
	if err != nil {
		removeGoldenView(root)
		return nil
	}
	for _, name := range goldenViewFiles {
		if fi, err := os.Lstat(filepath.Join(root, name)); err == nil && fi.Mode()&fs.ModeSymlink == 0 && readGoldenView(root) == nil {
			return fmt.Errorf("%s holds a %s that is not noid's view of its golden (the original noid's own golden?): the view is not made; move it away", root, name)
		}
	}
	have := readGoldenView(root)
	if have != nil && have.View == spec && have.PromotedAt.Equal(gc.PromotedAt) && viewLinksResolve(root) {
		return nil
	}
	removeGoldenView(root)
	disks, err := goldenDisks(filepath.Join(root, spec))
	if err != nil {
		return err
	}
	v := goldenViewConfig{LegacyGoldenConfig: LegacyGoldenConfig{CPUs: gc.VCPUs, MemMiB: gc.MemoryMiB}, View: spec, Backend: gc.Backend, PromotedAt: gc.PromotedAt, Rootfs: "link"}
	links := map[string]string{vmm.SnapMemory: vmm.SnapMemory, vmm.SnapState: vmm.SnapState}
	if len(disks) == 1 && !strings.HasSuffix(disks[0], ".qcow2") {
		links[vmm.SnapDisk] = disks[0]
	} else {
		v.Rootfs = "flattened"
		if err := m.flattenDisk(ctx, filepath.Join(root, spec), disks, filepath.Join(root, vmm.SnapDisk)); err != nil {
			return err
		}
	}
	for name, target := range links {
		if err := os.Symlink(filepath.Join(spec, target), filepath.Join(root, name)); err != nil {
			return fmt.Errorf("linking the golden view's %s: %w", name, err)
		}
	}
	b, _ := json.Marshal(v)
	tmp := filepath.Join(root, ".view-"+vmm.GoldenConfig)
	if err := os.WriteFile(tmp, append(b, '\n'), 0o600); err != nil {
		return fmt.Errorf("writing the golden view's config.json: %w", err)
	}
	if err := os.Rename(tmp, filepath.Join(root, vmm.GoldenConfig)); err != nil {
		return fmt.Errorf("writing the golden view's config.json: %w", err)
	}
	storage.FsyncDir(root)
	m.log.Info("golden view refreshed", "user", "system", "spec", spec, "rootfs", v.Rootfs)
	return nil
}

// viewLinksResolve reports whether every symlink of the view in root
// points at an existing file.
func viewLinksResolve(root string) bool {
	for _, name := range goldenViewFiles {
		p := filepath.Join(root, name)
		if _, err := os.Stat(p); err != nil {
			return false
		}
	}
	return true
}

// goldenDisks lists the disk images of the golden in dir, bottom first:
// a rootfs.ext4, or disk-NNNN layers.
func goldenDisks(dir string) ([]string, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range ents {
		if n := e.Name(); n == vmm.SnapDisk || strings.HasPrefix(n, "disk-") {
			out = append(out, n)
		}
	}
	sort.Slice(out, func(a, b int) bool {
		// rootfs.ext4 is always the bottom.
		return out[a] == vmm.SnapDisk || out[b] != vmm.SnapDisk && out[a] < out[b]
	})
	if len(out) == 0 {
		return nil, fmt.Errorf("golden %s holds no disk image", dir)
	}
	return out, nil
}

// flattenDisk writes the disk the chain of images disks (bottom first, in
// dir) presents into dst as one sparse raw file. The layers name no
// backing file, so the chain is given to qemu-img explicitly.
func (m *Manager) flattenDisk(ctx context.Context, dir string, disks []string, dst string) error {
	var node map[string]any
	for _, d := range disks {
		n := map[string]any{"driver": "raw", "file": map[string]any{"driver": "file", "filename": filepath.Join(dir, d)}}
		if strings.HasSuffix(d, ".qcow2") {
			n["driver"] = "qcow2"
			n["backing"] = node
		}
		node = n
	}
	spec, _ := json.Marshal(node)
	tmp := filepath.Join(filepath.Dir(dst), ".view-"+filepath.Base(dst))
	out, err := exec.CommandContext(ctx, m.qemuImg(), "convert", "-U", "-O", "raw", "json:"+string(spec), tmp).CombinedOutput()
	if err != nil {
		os.Remove(tmp)
		if errors.Is(err, exec.ErrNotFound) {
			return fmt.Errorf("flattening the golden's disk for the view needs qemu-img (apt-get install qemu-utils): %w", err)
		}
		return fmt.Errorf("flattening the golden's disk for the view: %w: %s", err, strings.TrimSpace(string(out)))
	}
	if err := os.Rename(tmp, dst); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("placing the golden view's rootfs.ext4: %w", err)
	}
	return nil
}

// qemuImg is the qemu-img next to the configured QEMU, or the one in $PATH.
func (m *Manager) qemuImg() string {
	if m.cfg.QEMUBinary != "" {
		if p := filepath.Join(filepath.Dir(m.cfg.QEMUBinary), "qemu-img"); func() bool { _, err := os.Stat(p); return err == nil }() {
			return p
		}
	}
	return "qemu-img"
}
