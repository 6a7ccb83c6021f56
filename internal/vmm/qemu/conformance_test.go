package qemu

import (
	"testing"

	"github.com/noid-vm/noid/internal/testutil"
	"github.com/noid-vm/noid/internal/vmm"
	"github.com/noid-vm/noid/internal/vmm/vmmtest"
)

// TestConformance runs the backend conformance suite against real QEMU
// with the tiny image (TCG here, KVM where usable).
func TestConformance(t *testing.T) {
	testutil.RequireRoot(t)
	img := testutil.TinyImage(t)
	accel, _, err := vmm.ResolveAccel(vmm.AccelAuto, vmm.ProbeKVM())
	if err != nil {
		t.Fatal(err)
	}
	vmmtest.Run(t, vmmtest.Setup{Backend: New(Options{}), Kernel: img.Kernel, Initrd: img.Initrd, Rootfs: img.Rootfs, Accel: accel})
}
