package manager

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"github.com/noid-vm/noid/internal/errdefs"
	"github.com/noid-vm/noid/internal/vmm"
)

// sealSnapshot records the size and checksum of every file of the snapshot
// in dir into meta.Files. It runs after the VM resumed, never in its pause.
func (m *Manager) sealSnapshot(ctx context.Context, dir string, meta *vmm.SnapshotMeta) error {
	meta.Files = map[string]vmm.FileSum{}
	for _, name := range vmm.SnapshotFiles {
		size, sum, err := m.verifier.Sum(ctx, filepath.Join(dir, name))
		if err != nil {
			return err
		}
		meta.Files[name] = vmm.FileSum{Size: size, Sum: sum}
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
	for _, name := range vmm.SnapshotFiles {
		p := filepath.Join(dir, name)
		if want, ok := meta.Files[name]; ok {
			if err := m.verifier.Verify(ctx, p, want.Size, want.Sum); err != nil {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				return damagedSnapshot(what, err)
			}
			continue
		}
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
