package server

import (
	"fmt"
	"net/http"
	"os"
	"runtime"
	"sort"
	"strings"
	"sync"
	"time"
)

// metrics holds the counters and latency histograms served at /metrics in
// the Prometheus text format. It is small on purpose: no client library.
type metrics struct {
	mu        sync.Mutex
	ops       map[opKey]*histogram
	cpBytes   int64
	vmDeaths  int64
	startTime time.Time
}

type opKey struct{ op, result string }

// Latency buckets in seconds.
var buckets = []float64{0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60}

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
		h = &histogram{counts: make([]uint64, len(buckets))}
		m.ops[opKey{name, res}] = h
	}
	for i, b := range buckets {
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

func (s *Server) hMetrics(w http.ResponseWriter, r *http.Request) error {
	var b strings.Builder
	vms, err := s.store.ListVMs(r.Context(), -1)
	if err != nil {
		return err
	}
	byState := map[string]int{"creating": 0, "running": 0, "restoring": 0, "dead": 0, "destroying": 0}
	for _, v := range vms {
		st := v.State
		if st == "running" {
			if _, err := s.rt(v.ID).instance(); err != nil {
				st = "dead"
			}
		}
		byState[st]++
	}
	b.WriteString("# HELP noid_vms Number of VMs by state.\n# TYPE noid_vms gauge\n")
	states := make([]string, 0, len(byState))
	for st := range byState {
		states = append(states, st)
	}
	sort.Strings(states)
	for _, st := range states {
		fmt.Fprintf(&b, "noid_vms{state=%q} %d\n", st, byState[st])
	}
	cps, err := s.store.ListCheckpoints(r.Context(), -1, "")
	if err != nil {
		return err
	}
	var total int64
	for _, c := range cps {
		total += c.SizeBytes
	}
	fmt.Fprintf(&b, "# HELP noid_checkpoints Number of stored checkpoints.\n# TYPE noid_checkpoints gauge\nnoid_checkpoints %d\n", len(cps))
	fmt.Fprintf(&b, "# HELP noid_checkpoint_bytes Bytes on disk used by stored checkpoints.\n# TYPE noid_checkpoint_bytes gauge\nnoid_checkpoint_bytes %d\n", total)
	m := s.metrics
	m.mu.Lock()
	fmt.Fprintf(&b, "# HELP noid_checkpoint_written_bytes_total Bytes of checkpoints written since start.\n# TYPE noid_checkpoint_written_bytes_total counter\nnoid_checkpoint_written_bytes_total %d\n", m.cpBytes)
	fmt.Fprintf(&b, "# HELP noid_vm_unexpected_exits_total VMM processes that exited unexpectedly.\n# TYPE noid_vm_unexpected_exits_total counter\nnoid_vm_unexpected_exits_total %d\n", m.vmDeaths)
	b.WriteString("# HELP noid_operation_seconds Latency of VM operations.\n# TYPE noid_operation_seconds histogram\n")
	keys := make([]opKey, 0, len(m.ops))
	for k := range m.ops {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool {
		if keys[i].op != keys[j].op {
			return keys[i].op < keys[j].op
		}
		return keys[i].result < keys[j].result
	})
	for _, k := range keys {
		h := m.ops[k]
		for i, bk := range buckets {
			fmt.Fprintf(&b, "noid_operation_seconds_bucket{op=%q,result=%q,le=\"%g\"} %d\n", k.op, k.result, bk, h.counts[i])
		}
		fmt.Fprintf(&b, "noid_operation_seconds_bucket{op=%q,result=%q,le=\"+Inf\"} %d\n", k.op, k.result, h.count)
		fmt.Fprintf(&b, "noid_operation_seconds_sum{op=%q,result=%q} %g\n", k.op, k.result, h.sum)
		fmt.Fprintf(&b, "noid_operation_seconds_count{op=%q,result=%q} %d\n", k.op, k.result, h.count)
	}
	fds := -1
	if ents, err := os.ReadDir("/proc/self/fd"); err == nil {
		fds = len(ents)
	}
	fmt.Fprintf(&b, "# HELP go_goroutines Number of goroutines in noid-server.\n# TYPE go_goroutines gauge\ngo_goroutines %d\n", runtime.NumGoroutine())
	fmt.Fprintf(&b, "# HELP process_open_fds Open file descriptors of noid-server.\n# TYPE process_open_fds gauge\nprocess_open_fds %d\n", fds)
	golden, shapes := s.pool.counts()
	fmt.Fprintf(&b, "# HELP noid_warm_spares VMMs prepared ahead of time and waiting: for golden creates, or (blank) for clones and rewinds of one shape.\n# TYPE noid_warm_spares gauge\nnoid_warm_spares{kind=\"golden\"} %d\n", golden)
	shapeKeys := make([]shapeKey, 0, len(shapes))
	for k := range shapes {
		shapeKeys = append(shapeKeys, k)
	}
	sort.Slice(shapeKeys, func(i, j int) bool { return shapeKeys[i].String() < shapeKeys[j].String() })
	for _, k := range shapeKeys {
		fmt.Fprintf(&b, "noid_warm_spares{kind=\"clone\",vcpus=\"%d\",memory_mib=\"%d\",disk_bytes=\"%d\",network=\"%s\"} %d\n", k.VCPUs, k.MemoryMiB, k.DiskBytes, netName(k.HasNet), shapes[k])
	}
	fmt.Fprintf(&b, "# HELP noid_uptime_seconds Seconds since the server started.\n# TYPE noid_uptime_seconds gauge\nnoid_uptime_seconds %g\n", time.Since(m.startTime).Seconds())
	m.mu.Unlock()
	w.Header().Set("Content-Type", "text/plain; version=0.0.4")
	_, err = w.Write([]byte(b.String()))
	return err
}
