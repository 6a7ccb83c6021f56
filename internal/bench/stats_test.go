package bench

import (
	"testing"
	"time"
)

func TestStats(t *testing.T) {
	var s Sample
	for _, v := range []float64{5, 1, 4, 2, 3} {
		s.Add(v)
	}
	st := s.Stats()
	if st.N != 5 || st.Min != 1 || st.Max != 5 || st.P50 != 3 || st.P90 != 5 || st.Mean != 3 {
		t.Fatalf("stats of 1..5: %+v", st)
	}
	s.Add(6)
	if p := s.Stats().P50; p != 3.5 {
		t.Fatalf("p50 of 1..6 = %v, want 3.5", p)
	}
	var d Sample
	d.AddDur(1500 * time.Microsecond)
	if d[0] != 1.5 {
		t.Fatalf("AddDur: %v ms, want 1.5", d[0])
	}
	if (Sample{}).Stats().N != 0 {
		t.Fatal("empty sample")
	}
}

func TestTargets(t *testing.T) {
	f := (&Figure{Unit: "ms", Stats: &Stats{P50: 20}}).below(20, true)
	if f.Status != "missed" || f.Target != "< 20.0 ms" {
		t.Fatalf("strict: %+v", f)
	}
	if f := (&Figure{Unit: "ms", Stats: &Stats{P50: 20}}).below(20, false); f.Status != "met" {
		t.Fatalf("≤: %+v", f)
	}
	if f := (&Figure{Unit: "x", Value: val(9.9)}).atLeast(10); f.Status != "missed" {
		t.Fatalf("≥: %+v", f)
	}
}

// TestLoadMemoryBudget: without --max-vms the load keeps an even number of
// VMs alive, at most two per client and within half the available memory.
func TestLoadMemoryBudget(t *testing.T) {
	avail := hostMemAvailableMiB()
	if avail <= 0 {
		t.Fatal("no MemAvailable in /proc/meminfo")
	}
	for _, c := range []struct{ clients, mem int }{{50, 128}, {3, 128}, {50, avail / 5}} {
		n, why := loadMemoryBudget(c.clients, c.mem)
		if n%2 != 0 || n > 2*c.clients || n*c.mem > avail/2 || why == "" {
			t.Errorf("%d clients of %d MiB on %d MiB available: %d VMs (%s)", c.clients, c.mem, avail, n, why)
		}
	}
}

// TestGoldenSparesIn reads the running spares of one golden shape from a
// /metrics exposition, ignoring blank spares and other shapes.
func TestGoldenSparesIn(t *testing.T) {
	text := `# HELP noid_warm_spares VMMs prepared ahead of time
noid_warm_spares{disk_bytes="2147483648",kind="clone",memory_mib="2048",network="default",vcpus="1"} 3
noid_warm_spares{disk_bytes="2147483648",kind="golden",memory_mib="256",network="default",vcpus="1"} 5
noid_warm_spares{disk_bytes="2147483648",kind="golden",memory_mib="2048",network="default",vcpus="1"} 1
`
	if n := goldenSparesIn(text, "1x2048"); n != 1 {
		t.Errorf("1x2048: %d, want 1", n)
	}
	if n := goldenSparesIn(text, "2x2048"); n != 0 {
		t.Errorf("2x2048: %d, want 0", n)
	}
}
