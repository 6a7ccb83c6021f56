package firecracker

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/noid-vm/noid/internal/errdefs"
	"github.com/noid-vm/noid/internal/vmm"
)

// FuzzReadMeta feeds arbitrary bytes to the Firecracker backend's meta.json
// reader and then to CheckMeta against a fixed spec. Neither panics; every
// error is an invalid-argument error; and CheckMeta accepts only metadata
// of this backend with exactly the spec's vCPUs, memory and NIC presence.
func FuzzReadMeta(f *testing.F) {
	good, _ := json.Marshal(vmm.SnapshotMeta{Backend: BackendName, VMMVersion: "1.16.1", VCPUs: 2, MemoryMiB: 512, Accel: vmm.AccelKVM, HasNet: true})
	for _, s := range []string{string(good), `{"backend":"qemu","vcpus":2,"memory_mib":512,"has_net":true}`, `{}`, `{"backend":"firecracker"}`,
		`{"backend":"firecracker","vcpus":2,"memory_mib":512}`, `{"vcpus":"2"}`, `]`} {
		f.Add([]byte(s))
	}
	dir := f.TempDir()
	spec := vmm.Spec{VCPUs: 2, MemoryMiB: 512, Net: &vmm.NetSpec{Tap: "t", MAC: "02:00:00:00:00:01"}}
	f.Fuzz(func(t *testing.T, data []byte) {
		if err := os.WriteFile(filepath.Join(dir, vmm.SnapMeta), data, 0o600); err != nil {
			t.Fatal(err)
		}
		m, err := ReadMeta(dir)
		if err != nil {
			if !errors.Is(err, errdefs.ErrInvalidArgument) {
				t.Fatalf("ReadMeta error %v is not invalid-argument", err)
			}
			return
		}
		err = CheckMeta(m, spec)
		if err != nil {
			if !errors.Is(err, errdefs.ErrInvalidArgument) {
				t.Fatalf("CheckMeta error %v is not invalid-argument", err)
			}
			return
		}
		if m.Backend != BackendName || m.VCPUs != spec.VCPUs || m.MemoryMiB != spec.MemoryMiB || !m.HasNet {
			t.Fatalf("CheckMeta accepted %+v for %+v", m, spec)
		}
	})
}
