package manager

import (
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/noid-vm/noid/internal/api"
	"github.com/noid-vm/noid/internal/errdefs"
)

// TestGoldenQuotas: golden snapshots count against their owner's quota
// (issue 18 finding 2). A user may keep max_goldens of them (a promotion
// over a spec they have replaces it); their bytes count with the user's
// checkpoints; and their running spares start only within [pool]
// memory_budget and, with the user's VMs, within the user's memory quota.
// Each refusal has a control that passes once the reason is gone.
func TestGoldenQuotas(t *testing.T) {
	e := newEnv(t, "[quota]\nmax_goldens = 1\nmax_memory_mib = 600\n")
	ctx := tctx(t)
	alice, _, err := e.mgr.Store().CreateUser(ctx, "alice", false)
	if err != nil {
		t.Fatal(err)
	}
	mk := func(name string, mem int) {
		t.Helper()
		if _, err := e.mgr.CreateVM(ctx, alice, api.CreateVMRequest{Name: name, MemoryMiB: mem}); err != nil {
			t.Fatalf("creating %s: %v", name, err)
		}
		if _, err := e.mgr.Checkpoint(ctx, alice, name, api.CheckpointRequest{Name: "c"}); err != nil {
			t.Fatalf("checkpoint of %s: %v", name, err)
		}
	}
	promote := func(vm string) error {
		_, err := e.mgr.PromoteGolden(ctx, alice, api.GoldenPromoteRequest{VM: vm, Checkpoint: "c"})
		return err
	}
	dir := filepath.Join(e.mgr.goldenRoot(alice), specDirName(1, 256))
	waitFor := func(what string, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(2 * time.Minute)
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("timed out waiting for %s\n%s", what, lastLines(e.logs.String(), 20))
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	// settled waits until no spare of alice's golden is being prepared.
	settled := func() {
		waitFor("the pool to settle", func() bool {
			e.mgr.pool.mu.Lock()
			defer e.mgr.pool.mu.Unlock()
			return e.mgr.pool.filling[dir] == 0
		})
	}

	mk("g1", 256)
	if err := promote("g1"); err != nil {
		t.Fatalf("first golden: %v", err)
	}
	// alice's VMs (256 MiB) and the spare (256) fit her 600 MiB.
	waitFor("a running spare of alice's golden", func() bool { return e.mgr.pool.ready(dir) == 1 })

	mk("g2", 300)
	err = promote("g2")
	if !errors.Is(err, errdefs.ErrQuotaExceeded) || !strings.Contains(err.Error(), "at most 1 golden") {
		t.Fatalf("a second golden spec over max_goldens = 1: %v", err)
	}
	if _, err := e.mgr.PromoteGolden(ctx, alice, api.GoldenPromoteRequest{VM: "g1", Checkpoint: "c"}); err != nil {
		t.Fatalf("a promotion over the spec alice has (a replacement) was refused: %v", err)
	}

	// The replacement's spare: the pool's budget (100 MiB) refuses it
	// first; without that budget, alice's quota does (556 MiB of VMs +
	// 256); with g2 gone (256 + 256 <= 600) it starts.
	settled()
	e.mgr.pool.drain(dir)
	e.cfg.Pool.MemoryBudget = "100M"
	e.mgr.pool.refill(dir)
	settled()
	if n := e.mgr.pool.ready(dir); n != 0 || !strings.Contains(e.logs.String(), "[pool] memory_budget is 100 MiB") {
		t.Fatalf("over the pool's memory budget: %d spares\n%s", n, lastLines(e.logs.String(), 10))
	}
	e.cfg.Pool.MemoryBudget = ""
	e.mgr.pool.refill(dir)
	settled()
	if n := e.mgr.pool.ready(dir); n != 0 || !strings.Contains(e.logs.String(), "would exceed their memory quota of 600 MiB") {
		t.Fatalf("over alice's memory quota: %d spares\n%s", n, lastLines(e.logs.String(), 10))
	}
	if _, err := e.mgr.DestroyVM(ctx, alice, "g2"); err != nil {
		t.Fatal(err)
	}
	e.mgr.pool.refill(dir)
	waitFor("the spare once alice's memory allows it", func() bool { return e.mgr.pool.ready(dir) == 1 })

	// Golden bytes count with checkpoints: at a limit just above what
	// alice stores, a new checkpoint is refused and names the goldens.
	use, err := e.mgr.Store().UserUsage(ctx, alice.ID)
	if err != nil {
		t.Fatal(err)
	}
	_, gbytes := e.mgr.goldenUsage(alice)
	if gbytes <= 0 {
		t.Fatalf("alice's golden holds %d bytes", gbytes)
	}
	g1, err := e.mgr.store.GetVM(ctx, alice.ID, "g1")
	if err != nil {
		t.Fatal(err)
	}
	// Room for the checkpoint's reservation, but not with the golden too.
	lim := use.CheckpointBytes + e.mgr.cpEstimate(g1) + gbytes/2
	if err := e.mgr.Store().SetQuota(ctx, "alice", nil, nil, nil, &lim); err != nil {
		t.Fatal(err)
	}
	alice, _ = e.mgr.Store().UserByName(ctx, "alice")
	_, err = e.mgr.Checkpoint(ctx, alice, "g1", api.CheckpointRequest{Name: "more"})
	if !errors.Is(err, errdefs.ErrQuotaExceeded) || !strings.Contains(err.Error(), "golden snapshots hold") {
		t.Fatalf("a checkpoint over the limit with goldens counted: %v", err)
	}
	// Control: with the golden and its backup removed, the same
	// checkpoint fits.
	if err := e.mgr.RemoveGolden(ctx, alice, 1, 256); err != nil {
		t.Fatal(err)
	}
	if n, b := e.mgr.goldenUsage(alice); n != 0 || b != 0 {
		t.Fatalf("after golden rm alice keeps %d goldens, %d bytes", n, b)
	}
	if _, err := e.mgr.Checkpoint(ctx, alice, "g1", api.CheckpointRequest{Name: "more"}); err != nil {
		t.Fatalf("the checkpoint once the golden is gone: %v", err)
	}
}
