package manager

import (
	"context"
	"sort"
	"sync"
	"time"
)

// metrics holds the counters and latency histograms of the manager's
// operations, which Metrics reports.
type metrics struct {
	mu        sync.Mutex
	ops       map[opKey]*histogram
	cpBytes   int64
	vmDeaths  int64
	startTime time.Time
}

type opKey struct{ op, result string }

// LatencyBuckets are the upper bounds, in seconds, of the operation
// latency histograms.
var LatencyBuckets = []float64{0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60}

type histogram struct {
	counts []uint64
	sum    float64
	count  uint64
}

func newMetrics() *metrics {
	return &metrics{ops: map[opKey]*histogram{}, startTime: time.Now()}
}

// op records one operation's outcome and latency.
func (m *metrics) op(name string, start time.Time, err error) {
	d := time.Since(start).Seconds()
	res := "ok"
	if err != nil {
		res = "error"
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	h := m.ops[opKey{name, res}]
	if h == nil {
		h = &histogram{counts: make([]uint64, len(LatencyBuckets))}
		m.ops[opKey{name, res}] = h
	}
	for i, b := range LatencyBuckets {
		if d <= b {
			h.counts[i]++
		}
	}
	h.sum += d
	h.count++
}

func (m *metrics) checkpointBytes(n int64) {
	m.mu.Lock()
	m.cpBytes += n
	m.mu.Unlock()
}

func (m *metrics) vmDied() {
	m.mu.Lock()
	m.vmDeaths++
	m.mu.Unlock()
}

// Metrics is a point-in-time view of the manager for monitoring.
type Metrics struct {
	// VMsByState counts VMs per state ("creating", "running",
	// "restoring", "dead", "destroying"); a VM whose VMM is gone counts as
	// dead.
	VMsByState map[string]int
	// Checkpoints and CheckpointBytes are the stored checkpoints and the
	// disk space they use.
	Checkpoints     int
	CheckpointBytes int64
	// CheckpointWrittenBytes is the size of the checkpoints taken since
	// the manager started.
	CheckpointWrittenBytes int64
	// VMMDeaths counts VMM processes that exited unexpectedly.
	VMMDeaths int64
	// Ops are the latency histograms of operations, by operation and
	// result, sorted.
	Ops []OpStats
	// GoldenSpares counts warm spares waiting for golden creates.
	GoldenSpares int
	// CloneSpares counts blank warm spares per shape, sorted.
	CloneSpares []SpareCount
	// Uptime is the time since the manager started.
	Uptime time.Duration
}

// OpStats is the latency histogram of one operation and result.
type OpStats struct {
	Op, Result string
	// Buckets[i] counts operations that took at most LatencyBuckets[i] seconds.
	Buckets []uint64
	// Sum is the total time in seconds, Count the number of operations.
	Sum   float64
	Count uint64
}

// SpareCount is the number of blank warm spares of one VM shape.
type SpareCount struct {
	VCPUs, MemoryMiB int
	DiskBytes        int64
	// Network is "default" for a shape with a NIC, "none" without.
	Network string
	Count   int
}

// Metrics reports the manager's state and operation statistics.
func (m *Manager) Metrics(ctx context.Context) (*Metrics, error) {
	vms, err := m.store.ListVMs(ctx, -1)
	if err != nil {
		return nil, err
	}
	out := &Metrics{VMsByState: map[string]int{"creating": 0, "running": 0, "restoring": 0, "dead": 0, "destroying": 0}}
	for _, v := range vms {
		st := v.State
		if st == "running" {
			if _, err := m.rt(v.ID).instance(); err != nil {
				st = "dead"
			}
		}
		out.VMsByState[st]++
	}
	cps, err := m.store.ListCheckpoints(ctx, -1, "")
	if err != nil {
		return nil, err
	}
	out.Checkpoints = len(cps)
	for _, c := range cps {
		out.CheckpointBytes += c.SizeBytes
	}
	golden, shapes := m.pool.counts()
	out.GoldenSpares = golden
	// Shapes that differ only in their boot files are one row.
	byShape := map[SpareCount]int{}
	for k, n := range shapes {
		byShape[SpareCount{VCPUs: k.VCPUs, MemoryMiB: k.MemoryMiB, DiskBytes: k.DiskBytes, Network: netName(k.HasNet)}] += n
	}
	for sc, n := range byShape {
		sc.Count = n
		out.CloneSpares = append(out.CloneSpares, sc)
	}
	sort.Slice(out.CloneSpares, func(i, j int) bool {
		a, b := out.CloneSpares[i], out.CloneSpares[j]
		if a.VCPUs != b.VCPUs {
			return a.VCPUs < b.VCPUs
		}
		if a.MemoryMiB != b.MemoryMiB {
			return a.MemoryMiB < b.MemoryMiB
		}
		if a.DiskBytes != b.DiskBytes {
			return a.DiskBytes < b.DiskBytes
		}
		return a.Network < b.Network
	})
	met := m.metrics
	met.mu.Lock()
	defer met.mu.Unlock()
	out.CheckpointWrittenBytes, out.VMMDeaths, out.Uptime = met.cpBytes, met.vmDeaths, time.Since(met.startTime)
	for k, h := range met.ops {
		out.Ops = append(out.Ops, OpStats{Op: k.op, Result: k.result, Buckets: append([]uint64(nil), h.counts...), Sum: h.sum, Count: h.count})
	}
	sort.Slice(out.Ops, func(i, j int) bool {
		if out.Ops[i].Op != out.Ops[j].Op {
			return out.Ops[i].Op < out.Ops[j].Op
		}
		return out.Ops[i].Result < out.Ops[j].Result
	})
	return out, nil
}
