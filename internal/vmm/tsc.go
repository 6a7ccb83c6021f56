package vmm

import (
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
)

// TCGKernelArgs returns kernel command-line arguments the Debian cloud
// kernel needs to boot reliably under QEMU's TCG: "tsc_early_khz=<host TSC
// rate>". Under TCG the guest's TSC is the host's TSC, but the guest kernel
// calibrates it against the emulated PIT, and on a loaded host that
// calibration fails; the kernel then marks the TSC unstable and the boot hangs
// (measured here with a load average of 3-6 on 2 CPUs: 3 of 5 boots hung
// without it, none of 55 with it). It returns nil when the host TSC rate
// cannot be determined (no constant_tsc, not amd64). Not needed under KVM.
func TCGKernelArgs() []string {
	khz := hostTSCkHz()
	if khz <= 0 {
		return nil
	}
	return []string{fmt.Sprintf("tsc_early_khz=%d", khz)}
}

var (
	tscOnce sync.Once
	tscKHz  int
)

// hostTSCkHz returns the host's TSC frequency in kHz, or 0 if unknown: from
// sysfs where the kernel exports it, otherwise measured against
// CLOCK_MONOTONIC over five 10 ms windows (median). Requires constant_tsc.
func hostTSCkHz() int {
	tscOnce.Do(func() {
		cpuinfo, err := os.ReadFile("/proc/cpuinfo")
		if err != nil || !strings.Contains(string(cpuinfo), " constant_tsc") {
			return
		}
		if b, err := os.ReadFile("/sys/devices/system/cpu/cpu0/tsc_freq_khz"); err == nil {
			if v, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && v > 0 {
				tscKHz = v
				return
			}
		}
		if !haveRDTSC {
			return
		}
		var samples []float64
		for i := 0; i < 5; i++ {
			t0, c0 := time.Now(), rdtsc()
			time.Sleep(10 * time.Millisecond)
			c1, t1 := rdtsc(), time.Now()
			if ns := t1.Sub(t0).Nanoseconds(); ns > 0 && c1 > c0 {
				samples = append(samples, float64(c1-c0)*1e6/float64(ns))
			}
		}
		if len(samples) == 0 {
			return
		}
		sort.Float64s(samples)
		tscKHz = int(samples[len(samples)/2])
	})
	return tscKHz
}
