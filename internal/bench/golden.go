package bench

import (
	"context"
	"fmt"
	"time"

	"github.com/noid-vm/noid/client"
)

// runGolden measures issue 4 on each storage kind: create → first exec from
// a golden snapshot against a cold boot, interleaved in one run.
func (b *Bench) runGolden(ctx context.Context) error {
	for _, st := range b.opts.Storages {
		if err := b.runGoldenOn(ctx, st); err != nil {
			return fmt.Errorf("%s storage: %w", st, err)
		}
		b.runCleanups()
	}
	return nil
}

// provisionGolden boots a VM, checkpoints it, promotes the checkpoint to the
// golden snapshot for (1 vCPU, memMiB) and destroys the source VM.
func provisionGolden(ctx context.Context, s *Server, memMiB int) error {
	c := s.Client
	src := "golden-src"
	if _, err := c.CreateVM(ctx, client.CreateVMRequest{Name: src, MemoryMiB: memMiB, ColdBoot: true}); err != nil {
		return fmt.Errorf("creating the golden source VM: %w\n%s", err, s.LogTail(20))
	}
	if _, err := execOK(ctx, c, src, "true"); err != nil {
		return err
	}
	cp, err := c.Checkpoint(ctx, src, client.CheckpointRequest{Name: "golden"})
	if err != nil {
		return err
	}
	if _, err := c.PromoteGolden(ctx, src, cp.Name); err != nil {
		return fmt.Errorf("promoting the golden snapshot: %w", err)
	}
	// The golden is self-contained: its source can go.
	if _, err := c.DestroyVM(ctx, src); err != nil {
		return err
	}
	return nil
}

func (b *Bench) runGoldenOn(ctx context.Context, st string) error {
	end := b.section("golden-"+st, fmt.Sprintf("golden snapshots (issue 4) on %s storage: create → first exec, golden against cold boot", st))
	defer end()
	s, err := b.startServer(ctx, ServerOpts{Name: "golden-" + st, Reflink: st == "reflink"})
	if err != nil {
		return err
	}
	c := s.Client
	octx, cancel := context.WithTimeout(ctx, 30*time.Minute)
	defer cancel()
	if err := provisionGolden(octx, s, 256); err != nil {
		return err
	}
	var gold, cold, warm, nowarm Sample
	gp, cp := parts{}, parts{}
	for i := -b.opts.Warmup; i < b.opts.GoldenRuns; i++ {
		for _, golden := range []bool{true, false} {
			name := fmt.Sprintf("g-%d", i+b.opts.Warmup)
			if !golden {
				name = fmt.Sprintf("c-%d", i+b.opts.Warmup)
			}
			t0 := time.Now()
			vm, err := c.CreateVM(octx, client.CreateVMRequest{Name: name, MemoryMiB: 256, ColdBoot: !golden})
			if err != nil {
				return fmt.Errorf("create %s: %w\n%s", name, err, s.LogTail(20))
			}
			te, _, err := firstExec(octx, c, name)
			if err != nil {
				return err
			}
			tt := time.Since(t0)
			te2, err := secondExec(octx, c, name)
			if err != nil {
				return err
			}
			want := "cold"
			if golden {
				want = "golden"
			}
			if vm.BootPath != want {
				return fmt.Errorf("%s took the %s path, not %s: %s", name, vm.BootPath, want, vm.BootReason)
			}
			b.vlogf("%s create %s [%s]: %v, server %+v", want, name, st, tt, vm.Timings)
			b.destroy(ctx, s, name)
			if i < 0 {
				continue
			}
			p := cp
			smp := &cold
			if golden {
				p, smp = gp, &gold
				if vm.BootReason == "warm spare" {
					warm.AddDur(tt)
				} else {
					nowarm.AddDur(tt)
				}
			}
			smp.AddDur(tt)
			p.addTimings(vm.Timings)
			p.add("exec", ms(te))
			p.add("exec2", ms(te2))
		}
	}
	note := "copy = golden memory + disk into the VM's dir; agent = guest reconnect (none for a running spare) and sync under TCG; exec2 = a second `true` right after (not in the total). The ≤ 100 ms goal applies on KVM hosts only"
	switch {
	case len(warm) > 0 && len(nowarm) > 0:
		note = fmt.Sprintf("%d of %d took a warm spare (p50 %.0f ms), %d did not (p50 %.0f ms); ",
			len(warm), len(gold), warm.Stats().P50, len(nowarm), nowarm.Stats().P50) + note
	case len(warm) > 0:
		note = fmt.Sprintf("all %d took a warm spare (a VM already running from the golden's state, warmed up by a few execs, so there is no copy, spawn or load; the create gives it its identity; the pool refills during the interleaved cold boot); ", len(warm)) + note
	}
	gf := b.add(&Figure{Section: "golden", Storage: st, Name: "golden create → first exec", Unit: "ms", Stats: gold.Stats(), Parts: gp.stats(),
		Anchor: anchorGolden, Note: note})
	if b.opts.Accel == "kvm" {
		gf.below(100, false)
	}
	b.add(&Figure{Section: "golden", Storage: st, Name: "cold create → first exec (same run, interleaved)", Unit: "ms", Stats: cold.Stats(), Parts: cp.stats(),
		Anchor: "original noid cold boot 30–60 s"})
	b.add(&Figure{Section: "golden", Storage: st, Name: "speed-up: cold p50 / golden p50", Unit: "x", Value: val(cold.Stats().P50 / gold.Stats().P50),
		Anchor: "original noid: 30–60 s cold against 5–10 s golden, about 6×"}).atLeast(10)
	return nil
}
