package vmm

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"

	"github.com/noid-vm/noid/internal/errdefs"
)

// GoldenConfig is the metadata file of a golden snapshot directory; it holds
// a SnapshotMeta plus golden-only fields, so ReadMeta accepts it too.
const GoldenConfig = "config.json"

// ReadMeta reads a snapshot directory's meta.json, or config.json in a golden
// snapshot directory.
func ReadMeta(dir string) (*SnapshotMeta, error) {
	b, err := os.ReadFile(filepath.Join(dir, SnapMeta))
	if os.IsNotExist(err) {
		var gerr error
		if b, gerr = os.ReadFile(filepath.Join(dir, GoldenConfig)); gerr == nil {
			err = nil
		}
	}
	if err != nil {
		return nil, fmt.Errorf("reading snapshot metadata: %w", err)
	}
	var m SnapshotMeta
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("%w: snapshot metadata %s is corrupt: %v", errdefs.ErrInvalidArgument, filepath.Join(dir, SnapMeta), err)
	}
	if m.Backend == "" || m.VCPUs <= 0 || m.MemoryMiB <= 0 {
		return nil, fmt.Errorf("%w: snapshot metadata %s is incomplete", errdefs.ErrInvalidArgument, filepath.Join(dir, SnapMeta))
	}
	return &m, nil
}

// WriteMeta writes meta.json into a snapshot directory and syncs it.
func WriteMeta(dir string, m *SnapshotMeta) error {
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return err
	}
	f, err := os.OpenFile(filepath.Join(dir, SnapMeta), os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return fmt.Errorf("writing snapshot metadata: %w", err)
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return fmt.Errorf("writing snapshot metadata: %w", err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("syncing snapshot metadata: %w", err)
	}
	return f.Close()
}
