package manager

import (
	"strings"
	"testing"
)

// TestCPUWhy: under KVM a snapshot needs the CPU model it was taken on;
// under TCG any host will do.
func TestCPUWhy(t *testing.T) {
	for _, c := range []struct {
		accel, taken, here string
		refused            bool
	}{
		{"kvm", "AMD EPYC 7B13", "AMD EPYC 7B13", false},
		{"kvm", "AMD EPYC 7B13", "Intel(R) Xeon(R) Platinum 8375C", true},
		{"kvm", "", "Intel(R) Xeon(R) Platinum 8375C", false},
		{"tcg", "AMD EPYC 7B13", "Intel(R) Xeon(R) Platinum 8375C", false},
	} {
		why := cpuWhy(c.accel, c.taken, c.here)
		if (why != "") != c.refused || (c.refused && !strings.Contains(why, c.here)) {
			t.Errorf("cpuWhy(%q, %q, %q) = %q", c.accel, c.taken, c.here, why)
		}
	}
}
