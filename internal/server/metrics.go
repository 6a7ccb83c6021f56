package server

import (
	"fmt"
	"net/http"
	"os"
	"runtime"
	"sort"
	"strings"

	"github.com/noid-vm/noid/internal/manager"
)

// hMetrics writes the manager's metrics in the Prometheus text format.
func (s *Server) hMetrics(w http.ResponseWriter, r *http.Request) error {
	m, err := s.mgr.Metrics(r.Context())
	if err != nil {
		return err
	}
	var b strings.Builder
	b.WriteString("# HELP noid_vms Number of VMs by state.\n# TYPE noid_vms gauge\n")
	states := make([]string, 0, len(m.VMsByState))
	for st := range m.VMsByState {
		states = append(states, st)
	}
	sort.Strings(states)
	for _, st := range states {
		fmt.Fprintf(&b, "noid_vms{state=%q} %d\n", st, m.VMsByState[st])
	}
	fmt.Fprintf(&b, "# HELP noid_checkpoints Number of stored checkpoints.\n# TYPE noid_checkpoints gauge\nnoid_checkpoints %d\n", m.Checkpoints)
	fmt.Fprintf(&b, "# HELP noid_checkpoint_bytes Bytes on disk used by stored checkpoints.\n# TYPE noid_checkpoint_bytes gauge\nnoid_checkpoint_bytes %d\n", m.CheckpointBytes)
	fmt.Fprintf(&b, "# HELP noid_checkpoint_written_bytes_total Bytes of checkpoints written since start.\n# TYPE noid_checkpoint_written_bytes_total counter\nnoid_checkpoint_written_bytes_total %d\n", m.CheckpointWrittenBytes)
	fmt.Fprintf(&b, "# HELP noid_vm_unexpected_exits_total VMM processes that exited unexpectedly.\n# TYPE noid_vm_unexpected_exits_total counter\nnoid_vm_unexpected_exits_total %d\n", m.VMMDeaths)
	b.WriteString("# HELP noid_operation_seconds Latency of VM operations.\n# TYPE noid_operation_seconds histogram\n")
	for _, op := range m.Ops {
		for i, bk := range manager.LatencyBuckets {
			fmt.Fprintf(&b, "noid_operation_seconds_bucket{op=%q,result=%q,le=\"%g\"} %d\n", op.Op, op.Result, bk, op.Buckets[i])
		}
		fmt.Fprintf(&b, "noid_operation_seconds_bucket{op=%q,result=%q,le=\"+Inf\"} %d\n", op.Op, op.Result, op.Count)
		fmt.Fprintf(&b, "noid_operation_seconds_sum{op=%q,result=%q} %g\n", op.Op, op.Result, op.Sum)
		fmt.Fprintf(&b, "noid_operation_seconds_count{op=%q,result=%q} %d\n", op.Op, op.Result, op.Count)
	}
	fds := -1
	if ents, err := os.ReadDir("/proc/self/fd"); err == nil {
		fds = len(ents)
	}
	fmt.Fprintf(&b, "# HELP go_goroutines Number of goroutines in noid-server.\n# TYPE go_goroutines gauge\ngo_goroutines %d\n", runtime.NumGoroutine())
	fmt.Fprintf(&b, "# HELP process_open_fds Open file descriptors of noid-server.\n# TYPE process_open_fds gauge\nprocess_open_fds %d\n", fds)
	fmt.Fprintf(&b, "# HELP noid_warm_spares VMMs prepared ahead of time and waiting: for golden creates, or (blank) for clones and rewinds of one shape.\n# TYPE noid_warm_spares gauge\nnoid_warm_spares{kind=\"golden\"} %d\n", m.GoldenSpares)
	for _, sc := range m.CloneSpares {
		fmt.Fprintf(&b, "noid_warm_spares{kind=\"clone\",vcpus=\"%d\",memory_mib=\"%d\",disk_bytes=\"%d\",network=\"%s\"} %d\n", sc.VCPUs, sc.MemoryMiB, sc.DiskBytes, sc.Network, sc.Count)
	}
	fmt.Fprintf(&b, "# HELP noid_uptime_seconds Seconds since the server started.\n# TYPE noid_uptime_seconds gauge\nnoid_uptime_seconds %g\n", m.Uptime.Seconds())
	w.Header().Set("Content-Type", "text/plain; version=0.0.4")
	_, err = w.Write([]byte(b.String()))
	return err
}
