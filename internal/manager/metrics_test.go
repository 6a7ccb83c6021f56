package manager

import (
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/noid-vm/noid/internal/api"
	"github.com/noid-vm/noid/internal/promtext"
)

// scrape gathers the manager's collector as the server's registry would,
// formats it as Prometheus text and parses that back.
func (e *env) scrape() promtext.Families {
	e.t.Helper()
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(e.mgr.Collector())
	b, err := promtext.Gather(reg)
	if err != nil {
		e.t.Fatal(err)
	}
	fams, err := promtext.Parse(b)
	if err != nil {
		e.t.Fatalf("%v\n%s", err, b)
	}
	return fams
}

// waitMetric scrapes until cond holds, or fails the test after within.
func (e *env) waitMetric(what string, within time.Duration, cond func(promtext.Families) bool) promtext.Families {
	e.t.Helper()
	deadline := time.Now().Add(within)
	for {
		f := e.scrape()
		if cond(f) {
			return f
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("metrics: %s did not happen within %s", what, within)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

type labels = map[string]string

// TestMetricsFollowState: the manager's collector, scraped and parsed as
// Prometheus text, has its documented names and types, and its values move
// with the state: a create, an exec, a checkpoint, the warm spares, a
// golden promotion, a VMM that dies and a destroy.
func TestMetricsFollowState(t *testing.T) {
	e := newEnv(t, "")
	ctx := tctx(t)
	f := e.scrape()
	for name, typ := range map[string]string{
		"noid_vms": "gauge", "noid_checkpoints": "gauge", "noid_checkpoint_bytes": "gauge", "noid_golden_snapshots": "gauge",
		"noid_golden_bytes": "gauge", "noid_disk_free_bytes": "gauge", "noid_disk_size_bytes": "gauge", "noid_uptime_seconds": "gauge",
		"noid_checkpoint_written_bytes_total": "counter", "noid_vm_unexpected_exits_total": "counter",
	} {
		if got := f.Type(name); got != typ {
			t.Errorf("%s is a %q, want %s", name, got, typ)
		}
	}
	if f.Sum("noid_vms", nil) != 0 || len(f.Values("noid_vms", labels{"state": "running"})) != 1 || f.Sum("noid_checkpoints", nil) != 0 {
		t.Errorf("a fresh manager: vms %v, checkpoints %v", f.Values("noid_vms", nil), f.Values("noid_checkpoints", nil))
	}
	free, size := f.Sum("noid_disk_free_bytes", labels{"dir": "data"}), f.Sum("noid_disk_size_bytes", labels{"dir": "data"})
	if free <= 0 || size < free {
		t.Errorf("data dir: %v bytes free of %v", free, size)
	}

	e.create("m1")
	f = e.scrape()
	if f.Sum("noid_vms", labels{"state": "running"}) != 1 || f.Sum("noid_operation_seconds", labels{"op": "create", "result": "ok"}) != 1 {
		t.Errorf("after a create: vms %v, creates %v", f.Values("noid_vms", labels{"state": "running"}), f.Values("noid_operation_seconds", labels{"op": "create"}))
	}
	if f.Type("noid_operation_seconds") != "histogram" || f.Type("noid_agent_roundtrip_seconds") != "histogram" {
		t.Errorf("types: %s, %s", f.Type("noid_operation_seconds"), f.Type("noid_agent_roundtrip_seconds"))
	}
	if f.Sum("noid_agent_roundtrip_seconds", labels{"call": "hello"}) < 1 || f.Sum("noid_agent_roundtrip_seconds", labels{"call": "sync"}) < 1 {
		t.Errorf("agent round trips after a create: %v", f.Values("noid_agent_roundtrip_seconds", nil))
	}
	e.mustExec("m1", "true")
	if n := e.scrape().Sum("noid_agent_roundtrip_seconds", labels{"call": "exec"}); n != 1 {
		t.Errorf("exec round trips after one exec: %v", n)
	}

	if _, err := e.mgr.Checkpoint(ctx, e.user, "m1", api.CheckpointRequest{Name: "c1"}); err != nil {
		t.Fatal(err)
	}
	f = e.scrape()
	cpBytes := f.Sum("noid_checkpoint_bytes", nil)
	if f.Sum("noid_checkpoints", nil) != 1 || cpBytes <= 0 || f.Sum("noid_checkpoint_written_bytes_total", nil) != cpBytes {
		t.Errorf("after a checkpoint: %v checkpoints, %v bytes, %v written", f.Sum("noid_checkpoints", nil), cpBytes, f.Sum("noid_checkpoint_written_bytes_total", nil))
	}
	// The checkpoint's shape gets a blank spare for clones and rewinds.
	e.waitMetric("a blank spare of 1 vCPU and 256 MiB", 2*time.Minute, func(f promtext.Families) bool {
		return f.Sum("noid_warm_spares", labels{"kind": "clone", "vcpus": "1", "memory_mib": "256", "network": "none"}) == 1
	})

	if _, err := e.mgr.PromoteGolden(ctx, e.user, api.GoldenPromoteRequest{VM: "m1", Checkpoint: "c1"}); err != nil {
		t.Fatal(err)
	}
	f = e.scrape()
	if f.Sum("noid_golden_snapshots", nil) != 1 || f.Sum("noid_golden_bytes", nil) <= 0 {
		t.Errorf("after a promotion: %v goldens of %v bytes", f.Sum("noid_golden_snapshots", nil), f.Sum("noid_golden_bytes", nil))
	}
	e.waitMetric("a golden spare", 2*time.Minute, func(f promtext.Families) bool {
		return f.Sum("noid_warm_spares", labels{"kind": "golden", "vcpus": "1", "memory_mib": "256"}) == 1
	})

	// A VMM that dies is counted, and its VM is dead.
	v, err := e.mgr.GetVM(ctx, e.user, "m1")
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(v.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	e.waitMetric("a VMM death", time.Minute, func(f promtext.Families) bool {
		return f.Sum("noid_vm_unexpected_exits_total", nil) == 1 && f.Sum("noid_vms", labels{"state": "dead"}) == 1 &&
			f.Sum("noid_vms", labels{"state": "running"}) == 0
	})

	if _, err := e.mgr.DestroyVM(ctx, e.user, "m1"); err != nil {
		t.Fatal(err)
	}
	f = e.scrape()
	if f.Sum("noid_vms", nil) != 0 || f.Sum("noid_checkpoints", nil) != 0 || f.Sum("noid_checkpoint_bytes", nil) != 0 ||
		f.Sum("noid_operation_seconds", labels{"op": "destroy", "result": "ok"}) != 1 {
		t.Errorf("after the destroy: vms %v, checkpoints %v, destroys %v", f.Sum("noid_vms", nil), f.Sum("noid_checkpoints", nil),
			f.Sum("noid_operation_seconds", labels{"op": "destroy"}))
	}
	// The golden is an independent copy: still counted.
	if f.Sum("noid_golden_snapshots", nil) != 1 {
		t.Errorf("goldens after the destroy: %v", f.Sum("noid_golden_snapshots", nil))
	}
}
