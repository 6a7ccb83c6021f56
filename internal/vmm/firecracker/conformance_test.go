package firecracker

import (
	"context"
	"os"
	"testing"

	"github.com/noid-vm/noid/internal/testutil"
	"github.com/noid-vm/noid/internal/vmm"
	"github.com/noid-vm/noid/internal/vmm/vmmtest"
)

// TestConformance runs the same backend conformance suite as QEMU against a
// real Firecracker, with the tiny image's vmlinux. It needs the firecracker
// binary (NOID_FIRECRACKER, default /usr/local/bin/firecracker) and usable
// KVM; where either is missing it skips and says which. The contract,
// vmlinux-extraction and vsock handshake tests in this package and in
// internal/image run everywhere.
func TestConformance(t *testing.T) {
	b := New(Config{Binary: os.Getenv("NOID_FIRECRACKER")})
	if err := b.Check(context.Background()); err != nil {
		t.Skipf("SKIP: the Firecracker conformance suite needs the firecracker binary and usable KVM, and this host has not: %v", err)
	}
	testutil.RequireRoot(t)
	img := testutil.TinyImage(t)
	vmmtest.Run(t, vmmtest.Setup{Backend: b, Kernel: img.Vmlinux, Initrd: img.Initrd, Rootfs: img.Rootfs, Accel: vmm.AccelKVM})
}
