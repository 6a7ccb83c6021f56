package network

import (
	"context"
	"fmt"
	"sort"
	"testing"
	"time"
)

// BenchmarkAddVMParallel adds 20 VMs at once, as 20 parallel creates do,
// and reports the p50 and max of the time each AddVM call took. AddVMs are
// serialised (and so are the kernel's link changes, under RTNL), so the
// p50 is about ten times one AddVM.
func BenchmarkAddVMParallel(b *testing.B) {
	requireRoot(b)
	ns := newNS(b)
	m := newTestManager(b, ns, testConfig())
	ctx := context.Background()
	if err := m.Setup(ctx); err != nil {
		b.Fatal(err)
	}
	var all []time.Duration
	for i := 0; i < b.N; i++ {
		ds := make([]time.Duration, 20)
		errs := make(chan error, 20)
		for j := range ds {
			go func() {
				ip, _ := m.Config().NthHost(j)
				t0 := time.Now()
				err := m.AddVM(ctx, VMNet{ID: fmt.Sprintf("par%d-%d", i, j), IP: ip, Owner: "u"})
				ds[j] = time.Since(t0)
				errs <- err
			}()
		}
		for range ds {
			if err := <-errs; err != nil {
				b.Fatal(err)
			}
		}
		all = append(all, ds...)
		b.StopTimer()
		for j := range ds {
			if err := m.RemoveVM(ctx, fmt.Sprintf("par%d-%d", i, j)); err != nil {
				b.Fatal(err)
			}
		}
		b.StartTimer()
	}
	sort.Slice(all, func(i, j int) bool { return all[i] < all[j] })
	b.ReportMetric(float64(all[len(all)/2].Microseconds())/1000, "add-p50-ms")
	b.ReportMetric(float64(all[len(all)-1].Microseconds())/1000, "add-max-ms")
}
