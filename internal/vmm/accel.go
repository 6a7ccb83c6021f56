package vmm

import (
	"bytes"
	"fmt"
	"os"

	"golang.org/x/sys/unix"

	"github.com/noid-vm/noid/internal/errdefs"
)

// KVMStatus describes whether hardware virtualisation is usable here.
type KVMStatus struct {
	// Usable is true when /dev/kvm opens read-write and the CPU has vmx or svm.
	Usable bool
	// Reason explains why KVM is not usable (empty when usable).
	Reason string
}

// ProbeKVM checks /dev/kvm and the CPU flags. A kernel may expose /dev/kvm
// without hardware support (for example PVM under a hypervisor); such hosts
// run guests at a fraction of native speed, so they count as unusable.
func ProbeKVM() KVMStatus {
	fd, err := unix.Open("/dev/kvm", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return KVMStatus{Reason: fmt.Sprintf("/dev/kvm is not usable (%v)", err)}
	}
	unix.Close(fd)
	info, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return KVMStatus{Reason: fmt.Sprintf("cannot read /proc/cpuinfo: %v", err)}
	}
	for _, line := range bytes.Split(info, []byte("\n")) {
		if !bytes.HasPrefix(line, []byte("flags")) {
			continue
		}
		for _, f := range bytes.Fields(line) {
			if string(f) == "vmx" || string(f) == "svm" {
				return KVMStatus{Usable: true}
			}
		}
		break
	}
	return KVMStatus{Reason: "the CPU has no vmx/svm flag (nested or paravirtualised KVM is too slow to use)"}
}

// ResolveAccel turns a configured accel (auto, kvm, tcg) into the mode to use.
// It returns a warning to log when auto falls back to TCG, and an error when
// kvm is forced but unusable.
func ResolveAccel(want Accel, kvm KVMStatus) (Accel, string, error) {
	switch want {
	case AccelKVM:
		if !kvm.Usable {
			return "", "", fmt.Errorf("%w: accel = \"kvm\" but %s; set accel = \"tcg\" or \"auto\" in the config", errdefs.ErrUnavailable, kvm.Reason)
		}
		return AccelKVM, "", nil
	case AccelTCG:
		return AccelTCG, "", nil
	case AccelAuto, "":
		if kvm.Usable {
			return AccelKVM, "", nil
		}
		return AccelTCG, "KVM is not usable: " + kvm.Reason + "; using TCG software emulation (much slower)", nil
	default:
		return "", "", fmt.Errorf("%w: unknown accel %q (use auto, kvm or tcg)", errdefs.ErrInvalidArgument, want)
	}
}
