package network

import (
	"context"
	"fmt"
	"sort"
	"testing"
	"time"
)

// BenchmarkAddRemoveVM measures the host-side network set-up of one VM as
// a create or clone does it (AddVM with a real TAP: create, enslave,
// isolate, up, one nftables batch) and its removal, with 20 other VMs
// installed. It reports the p50 of each.
func BenchmarkAddRemoveVM(b *testing.B) {
	requireRoot(b)
	ns := newNS(b)
	m := newTestManager(b, ns, testConfig())
	ctx := context.Background()
	if err := m.Setup(ctx); err != nil {
		b.Fatal(err)
	}
	for i := 0; i < 20; i++ {
		ip, _ := m.Config().NthHost(i)
		if err := m.AddVM(ctx, VMNet{ID: fmt.Sprintf("other%d", i), IP: ip, Owner: "u"}); err != nil {
			b.Fatal(err)
		}
	}
	ip, _ := m.Config().NthHost(100)
	var add, rm []time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		v := VMNet{ID: fmt.Sprintf("bench%d", i), IP: ip, Owner: "u", AllowPeers: i%2 == 0}
		t0 := time.Now()
		if err := m.AddVM(ctx, v); err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		if err := m.RemoveVM(ctx, v.ID); err != nil {
			b.Fatal(err)
		}
		add, rm = append(add, t1.Sub(t0)), append(rm, time.Since(t1))
	}
	b.StopTimer()
	p50 := func(d []time.Duration) float64 {
		sort.Slice(d, func(i, j int) bool { return d[i] < d[j] })
		return float64(d[len(d)/2].Microseconds()) / 1000
	}
	b.ReportMetric(p50(add), "add-p50-ms")
	b.ReportMetric(p50(rm), "remove-p50-ms")
}

// BenchmarkAddVMParallel adds 20 VMs at once, as 20 parallel creates do,
// and reports the p50 and max of the time each AddVM call took.
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
