package vmm

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/noid-vm/noid/internal/errdefs"
)

// FuzzReadMeta feeds arbitrary bytes to ReadMeta as a checkpoint's
// meta.json or, when golden is set, as a golden snapshot's config.json.
// It never panics; what it accepts names a backend and has positive vCPUs
// and memory (the restore code relies on that); corrupt or incomplete
// metadata is an invalid-argument error; and accepted metadata written
// back with WriteMeta reads back the same.
func FuzzReadMeta(f *testing.F) {
	good, _ := json.Marshal(SnapshotMeta{Backend: "qemu", VMMVersion: "7.2.22", VCPUs: 2, MemoryMiB: 512, Accel: AccelTCG, HasNet: true,
		KernelSHA256: "ab", CreatedAt: time.Date(2026, 11, 30, 0, 0, 0, 0, time.UTC)})
	for _, s := range []string{string(good), `{}`, `{"backend":"qemu","vcpus":1}`, `{"backend":"qemu","vcpus":1,"memory_mib":1,"rootfs_fingerprint":"x"}`,
		`{"backend":"firecracker","vcpus":-1,"memory_mib":1}`, `{"backend":"qemu","vcpus":1,"memory_mib":1,"created_at":"2026-13-01T00:00:00Z"}`, `null`, `[1]`, "\xff"} {
		f.Add([]byte(s), false)
		f.Add([]byte(s), true)
	}
	dir := f.TempDir()
	out := f.TempDir()
	f.Fuzz(func(t *testing.T, data []byte, golden bool) {
		os.Remove(filepath.Join(dir, SnapMeta))
		os.Remove(filepath.Join(dir, GoldenConfig))
		name := SnapMeta
		if golden {
			name = GoldenConfig
		}
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
			t.Fatal(err)
		}
		m, err := ReadMeta(dir)
		if err != nil {
			if !errors.Is(err, errdefs.ErrInvalidArgument) {
				t.Fatalf("ReadMeta error %v is not invalid-argument", err)
			}
			return
		}
		if m.Backend == "" || m.VCPUs <= 0 || m.MemoryMiB <= 0 {
			t.Fatalf("accepted %+v", m)
		}
		if err := WriteMeta(out, m); err != nil {
			t.Fatal(err)
		}
		m2, err := ReadMeta(out)
		if err != nil {
			t.Fatalf("written metadata does not read back: %v", err)
		}
		if m2.Backend != m.Backend || m2.VCPUs != m.VCPUs || m2.MemoryMiB != m.MemoryMiB || m2.HasNet != m.HasNet || m2.Accel != m.Accel ||
			m2.VMMVersion != m.VMMVersion || !m2.CreatedAt.Equal(m.CreatedAt) {
			t.Fatalf("round trip: %+v vs %+v", m, m2)
		}
	})
}
