package firecracker

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/noid-vm/noid/internal/errdefs"
	"github.com/noid-vm/noid/internal/storage"
	"github.com/noid-vm/noid/internal/vmm"
)

// ErrWrongBackend is wrapped by Restore's error when a snapshot was written
// by another VMM backend. It also wraps errdefs.ErrInvalidArgument.
var ErrWrongBackend = fmt.Errorf("snapshot belongs to another VMM backend: %w", errdefs.ErrInvalidArgument)

// writeMeta writes meta.json into dir and fsyncs it.
func writeMeta(dir string, m vmm.SnapshotMeta) error {
	data, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return fmt.Errorf("encoding %s: %w", vmm.SnapMeta, err)
	}
	if err := storage.WriteFileAtomic(filepath.Join(dir, vmm.SnapMeta), append(data, '\n'), 0o644); err != nil {
		return fmt.Errorf("writing %s: %w", vmm.SnapMeta, err)
	}
	return nil
}

// ReadMeta reads the meta.json of a snapshot directory.
func ReadMeta(dir string) (vmm.SnapshotMeta, error) {
	var m vmm.SnapshotMeta
	data, err := os.ReadFile(filepath.Join(dir, vmm.SnapMeta))
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return m, fmt.Errorf("%s has no %s; it is not a complete snapshot: %w", dir, vmm.SnapMeta, errdefs.ErrInvalidArgument)
		}
		return m, fmt.Errorf("reading %s: %w", vmm.SnapMeta, err)
	}
	if err := json.Unmarshal(data, &m); err != nil {
		return m, fmt.Errorf("parsing %s in %s: %v: %w", vmm.SnapMeta, dir, err, errdefs.ErrInvalidArgument)
	}
	return m, nil
}

// CheckMeta tells whether a snapshot can be restored into spec by this
// backend: it must have been written by Firecracker, for the same vCPU
// count, memory size and NIC presence.
func CheckMeta(m vmm.SnapshotMeta, spec vmm.Spec) error {
	if m.Backend != BackendName {
		b := m.Backend
		if b == "" {
			b = "an unknown backend"
		} else {
			b = fmt.Sprintf("the %q backend", b)
		}
		return fmt.Errorf("the snapshot was written by %s and cannot be restored by Firecracker "+
			"(restore it with the backend that wrote it): %w", b, ErrWrongBackend)
	}
	var diffs []string
	if m.VCPUs != spec.VCPUs {
		diffs = append(diffs, fmt.Sprintf("%d vCPUs, not %d", m.VCPUs, spec.VCPUs))
	}
	if m.MemoryMiB != spec.MemoryMiB {
		diffs = append(diffs, fmt.Sprintf("%d MiB of memory, not %d", m.MemoryMiB, spec.MemoryMiB))
	}
	if m.HasNet != (spec.Net != nil) {
		if m.HasNet {
			diffs = append(diffs, "a network interface, but the VM has none")
		} else {
			diffs = append(diffs, "no network interface, but the VM has one")
		}
	}
	if len(diffs) > 0 {
		return fmt.Errorf("the snapshot does not fit this VM: it has %s: %w", strings.Join(diffs, "; "), errdefs.ErrInvalidArgument)
	}
	return nil
}
