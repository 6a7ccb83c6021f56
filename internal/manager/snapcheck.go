package manager

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"

	"github.com/noid-vm/noid/internal/errdefs"
	"github.com/noid-vm/noid/internal/vmm"
)

// sealSnapshot records the size and checksum of every file of the snapshot
// in dir (all but its metadata) into meta.Files. It runs after the VM
// resumed, never in its pause. Files shared with earlier snapshots (disk
// layers) were checksummed then and are not read again.
func (m *Manager) sealSnapshot(ctx context.Context, dir string, meta *vmm.SnapshotMeta) error {
	names, err := snapshotFiles(dir)
	if err != nil {
		return err
	}
	meta.Files = map[string]vmm.FileSum{}
	for _, name := range names {
		size, sum, err := m.verifier.Sum(ctx, filepath.Join(dir, name))
		if err != nil {
			return err
		}
		meta.Files[name] = vmm.FileSum{Size: size, Sum: sum}
	}
	return nil
}

// snapshotFiles lists the files of the snapshot in dir but its metadata.
func snapshotFiles(dir string) ([]string, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range ents {
		if e.Type().IsRegular() && e.Name() != vmm.SnapMeta && e.Name() != vmm.GoldenConfig {
			out = append(out, e.Name())
		}
	}
	return out, nil
}

// linkSnapshot makes dst (an empty directory) hold the files of the
// snapshot in src, whose metadata is meta: hard links, which share the
// immutable files, or copies across filesystems. The metadata itself is
// not linked.
func (m *Manager) linkSnapshot(ctx context.Context, src, dst string, meta *vmm.SnapshotMeta) error {
	names := vmm.SnapshotFiles
	if len(meta.Files) > 0 {
		names = names[:0:0]
		for name := range meta.Files {
			names = append(names, name)
		}
	}
	for _, name := range names {
		from, to := filepath.Join(src, name), filepath.Join(dst, name)
		if err := os.Link(from, to); err != nil {
			if !errors.Is(err, syscall.EXDEV) {
				return fmt.Errorf("linking %s: %w", name, err)
			}
			if err := m.copier.CopyFile(ctx, from, to); err != nil {
				return err
			}
		}
	}
	return nil
}

// verifySnapshot checks that the snapshot in dir is whole before anything
// is done with it (see readSnapshotMeta and verifySnapshotFiles). what
// names the snapshot in errors.
func (m *Manager) verifySnapshot(ctx context.Context, dir, what string) (*vmm.SnapshotMeta, error) {
	meta, err := m.readSnapshotMeta(dir, what)
	if err != nil {
		return nil, err
	}
	return meta, m.verifySnapshotFiles(ctx, dir, what, meta)
}

// damagedSnapshot is the error for a snapshot whose files cannot be used.
func damagedSnapshot(what string, err error) error {
	return errdefs.WithHint(fmt.Errorf("%w: %s cannot be used: %v", errdefs.ErrConflict, what, err),
		"nothing was changed; the snapshot's files were damaged or removed on the host: delete it (`noid checkpoint rm`) and take a new one")
}

// readSnapshotMeta reads the metadata of the snapshot in dir; a missing or
// unreadable one makes the snapshot damaged.
func (m *Manager) readSnapshotMeta(dir, what string) (*vmm.SnapshotMeta, error) {
	meta, err := vmm.ReadMeta(dir)
	if err != nil {
		return nil, damagedSnapshot(what, err)
	}
	return meta, nil
}

// verifySnapshotFiles checks that each file of the snapshot in dir exists
// with the size and checksum meta recorded when it was written. A snapshot
// written before noid recorded checksums is checked for its files and the
// memory size its metadata implies.
func (m *Manager) verifySnapshotFiles(ctx context.Context, dir, what string, meta *vmm.SnapshotMeta) error {
	for name, want := range meta.Files {
		if err := m.verifier.Verify(ctx, filepath.Join(dir, name), want.Size, want.Sum); err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return damagedSnapshot(what, err)
		}
	}
	if len(meta.Files) > 0 {
		return nil
	}
	for _, name := range vmm.SnapshotFiles {
		p := filepath.Join(dir, name)
		fi, err := os.Stat(p)
		switch {
		case err != nil:
			return damagedSnapshot(what, fmt.Errorf("%s is missing: %w", p, err))
		case fi.Size() == 0:
			return damagedSnapshot(what, fmt.Errorf("%s is empty", p))
		case name == vmm.SnapMemory && fi.Size() != int64(meta.MemoryMiB)<<20:
			return damagedSnapshot(what, fmt.Errorf("%s has %d bytes, the VM's %d MiB need %d", p, fi.Size(), meta.MemoryMiB, int64(meta.MemoryMiB)<<20))
		}
	}
	return nil
}
