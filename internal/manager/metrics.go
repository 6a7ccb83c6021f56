package manager

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"

	"github.com/noid-vm/noid/internal/storage"
	"github.com/noid-vm/noid/internal/vmm"
)

// metrics holds the counters and latency histograms of the manager's
// operations; Collector exposes them with the state Metrics reports.
type metrics struct {
	ops       *prometheus.HistogramVec
	agentRTT  *prometheus.HistogramVec
	cpWritten prometheus.Counter
	vmDeaths  prometheus.Counter
	startTime time.Time
}

// latencyBuckets are the upper bounds, in seconds, of the operation
// latency histograms.
var latencyBuckets = []float64{0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60}

// agentBuckets are the upper bounds, in seconds, of the agent round-trip
// histogram: 0.5 ms to about 4 s.
var agentBuckets = prometheus.ExponentialBuckets(0.0005, 2, 14)

func newMetrics() *metrics {
	return &metrics{
		ops: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "noid_operation_seconds", Help: "Latency of VM operations (create, checkpoint, rewind, clone, destroy), by result.", Buckets: latencyBuckets,
		}, []string{"op", "result"}),
		agentRTT: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "noid_agent_roundtrip_seconds", Help: "Round trips to the guest agents: hello (connect), sync (clock, entropy, identity) and exec (until the process runs).",
			Buckets: agentBuckets,
		}, []string{"call"}),
		cpWritten: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "noid_checkpoint_written_bytes_total", Help: "Bytes of checkpoints written since the server started.",
		}),
		vmDeaths: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "noid_vm_unexpected_exits_total", Help: "VMM processes of running VMs that exited unexpectedly (the VM is then dead).",
		}),
		startTime: time.Now(),
	}
}

// op records one operation's outcome and latency.
func (m *metrics) op(name string, start time.Time, err error) {
	res := "ok"
	if err != nil {
		res = "error"
	}
	m.ops.WithLabelValues(name, res).Observe(time.Since(start).Seconds())
}

func (m *metrics) checkpointBytes(n int64) { m.cpWritten.Add(float64(n)) }

func (m *metrics) vmDied() { m.vmDeaths.Inc() }

// agentCall records the round trip of one agent call that started at start.
func (m *metrics) agentCall(call string, start time.Time) {
	m.agentRTT.WithLabelValues(call).Observe(time.Since(start).Seconds())
}

// Metrics is a point-in-time view of the manager's state for monitoring.
type Metrics struct {
	// VMsByState counts VMs per state ("creating", "running",
	// "restoring", "dead", "destroying"); a VM whose VMM is gone counts as
	// dead.
	VMsByState map[string]int
	// Checkpoints and CheckpointBytes are the stored checkpoints and the
	// disk space they use.
	Checkpoints     int
	CheckpointBytes int64
	// GoldenSnapshots and GoldenBytes are the golden snapshots (system and
	// users') and the disk space they use with their backups.
	GoldenSnapshots int
	GoldenBytes     int64
	// Disks are the filesystems of the data dir and, when it is elsewhere
	// (the reflink image), of the storage root.
	Disks []DiskUsage
	// GoldenSpares and CloneSpares count the warm spares waiting for golden
	// creates and (blank) for clones and rewinds, per shape, sorted.
	GoldenSpares []SpareCount
	CloneSpares  []SpareCount
	// Uptime is the time since the manager started.
	Uptime time.Duration
}

// DiskUsage is the space of one filesystem noid writes to.
type DiskUsage struct {
	// Dir is "data" (the data dir) or "storage" (the storage root, when it
	// is not the data dir); Path is where it is.
	Dir, Path string
	// FreeBytes is what an unprivileged writer could still use; SizeBytes
	// is the filesystem's size.
	FreeBytes, SizeBytes int64
}

// SpareCount is the number of warm spares of one VM shape.
type SpareCount struct {
	VCPUs, MemoryMiB int
	DiskBytes        int64
	// Network is "default" for a shape with a NIC, "none" without.
	Network string
	Count   int
}

// Metrics reports the manager's state.
func (m *Manager) Metrics(ctx context.Context) (*Metrics, error) {
	vms, err := m.store.ListVMs(ctx, -1)
	if err != nil {
		return nil, err
	}
	out := &Metrics{VMsByState: map[string]int{"creating": 0, "running": 0, "restoring": 0, "dead": 0, "destroying": 0}}
	for _, v := range vms {
		out.VMsByState[m.apiVMState(v).State]++
	}
	cps, err := m.store.ListCheckpoints(ctx, -1, "")
	if err != nil {
		return nil, err
	}
	out.Checkpoints = len(cps)
	for _, c := range cps {
		out.CheckpointBytes += c.SizeBytes
	}
	userGolden, _ := filepath.Glob(filepath.Join(m.cfg.StorageDir(), "users", "*", "golden"))
	for _, root := range append([]string{m.systemGoldenRoot()}, userGolden...) {
		n, _ := storage.DirSize(root)
		out.GoldenBytes += n
		ents, _ := os.ReadDir(root)
		for _, e := range ents {
			if _, err := os.Stat(filepath.Join(root, e.Name(), vmm.GoldenConfig)); err == nil {
				out.GoldenSnapshots++
			}
		}
	}
	dirs := [][2]string{{"data", m.cfg.DataDir}}
	if m.cfg.StorageDir() != m.cfg.DataDir {
		dirs = append(dirs, [2]string{"storage", m.cfg.StorageDir()})
	}
	for _, d := range dirs {
		var st unix.Statfs_t
		if err := unix.Statfs(d[1], &st); err != nil {
			return nil, fmt.Errorf("statfs %s: %w", d[1], err)
		}
		out.Disks = append(out.Disks, DiskUsage{Dir: d[0], Path: d[1], FreeBytes: int64(st.Bavail) * st.Bsize, SizeBytes: int64(st.Blocks) * st.Bsize})
	}
	golden, blank := m.pool.counts()
	out.GoldenSpares, out.CloneSpares = spareCounts(golden), spareCounts(blank)
	out.Uptime = time.Since(m.metrics.startTime)
	return out, nil
}

// spareCounts turns spare counts per shape into rows, one per shape that
// differs in more than its boot files, sorted.
func spareCounts(shapes map[spareShape]int) []SpareCount {
	byShape := map[SpareCount]int{}
	for k, n := range shapes {
		byShape[SpareCount{VCPUs: k.VCPUs, MemoryMiB: k.MemoryMiB, DiskBytes: k.DiskBytes, Network: netName(k.HasNet)}] += n
	}
	out := make([]SpareCount, 0, len(byShape))
	for sc, n := range byShape {
		sc.Count = n
		out = append(out, sc)
	}
	sort.Slice(out, func(i, j int) bool {
		a, b := out[i], out[j]
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
	return out
}

// Collector returns a Prometheus collector of the manager's metrics: the
// operation and agent latencies, checkpoint bytes written and VMM deaths,
// and at every scrape the state of Metrics (VMs by state, checkpoint and
// golden bytes on disk, free space, warm spares by shape). The server
// registers it; the manager itself serves nothing.
func (m *Manager) Collector() prometheus.Collector {
	return &collector{m: m}
}

// The descriptions of the state metrics a collector reports.
var (
	descVMs = prometheus.NewDesc("noid_vms", "Number of VMs by state; a VM whose VMM is gone counts as dead.", []string{"state"}, nil)
	descCPs = prometheus.NewDesc("noid_checkpoints", "Number of stored checkpoints.", nil, nil)
	descCPB = prometheus.NewDesc("noid_checkpoint_bytes", "Bytes on disk used by stored checkpoints.", nil, nil)
	descGS  = prometheus.NewDesc("noid_golden_snapshots", "Number of golden snapshots, system and users'.", nil, nil)
	descGB  = prometheus.NewDesc("noid_golden_bytes", "Bytes on disk used by golden snapshots and their backups.", nil, nil)
	descDF  = prometheus.NewDesc("noid_disk_free_bytes", "Free bytes on the filesystem of the data dir (dir=\"data\") and of the storage root when it is elsewhere (dir=\"storage\").", []string{"dir"}, nil)
	descDS  = prometheus.NewDesc("noid_disk_size_bytes", "Size in bytes of the filesystem of the data dir (dir=\"data\") and of the storage root when it is elsewhere (dir=\"storage\").", []string{"dir"}, nil)
	descWS  = prometheus.NewDesc("noid_warm_spares", "VMMs prepared ahead of time and waiting, by shape: running a golden's state for golden creates (kind=\"golden\"), or blank for clones and rewinds (kind=\"clone\").",
		[]string{"kind", "vcpus", "memory_mib", "disk_bytes", "network"}, nil)
	descUp = prometheus.NewDesc("noid_uptime_seconds", "Seconds since the server started.", nil, nil)
)

// collector is the prometheus.Collector of a Manager.
type collector struct{ m *Manager }

// Describe sends the descriptions of every metric the collector reports.
func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descVMs, descCPs, descCPB, descGS, descGB, descDF, descDS, descWS, descUp} {
		ch <- d
	}
	met := c.m.metrics
	met.ops.Describe(ch)
	met.agentRTT.Describe(ch)
	met.cpWritten.Describe(ch)
	met.vmDeaths.Describe(ch)
}

// Collect reports the counters and histograms, then a fresh Metrics.
func (c *collector) Collect(ch chan<- prometheus.Metric) {
	met := c.m.metrics
	met.ops.Collect(ch)
	met.agentRTT.Collect(ch)
	met.cpWritten.Collect(ch)
	met.vmDeaths.Collect(ch)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := c.m.Metrics(ctx)
	if err != nil {
		ch <- prometheus.NewInvalidMetric(descVMs, err)
		return
	}
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	for st, n := range s.VMsByState {
		gauge(descVMs, float64(n), st)
	}
	gauge(descCPs, float64(s.Checkpoints))
	gauge(descCPB, float64(s.CheckpointBytes))
	gauge(descGS, float64(s.GoldenSnapshots))
	gauge(descGB, float64(s.GoldenBytes))
	for _, d := range s.Disks {
		gauge(descDF, float64(d.FreeBytes), d.Dir)
		gauge(descDS, float64(d.SizeBytes), d.Dir)
	}
	for kind, rows := range map[string][]SpareCount{"golden": s.GoldenSpares, "clone": s.CloneSpares} {
		for _, sc := range rows {
			gauge(descWS, float64(sc.Count), kind, strconv.Itoa(sc.VCPUs), strconv.Itoa(sc.MemoryMiB), strconv.FormatInt(sc.DiskBytes, 10), sc.Network)
		}
	}
	gauge(descUp, s.Uptime.Seconds())
}
