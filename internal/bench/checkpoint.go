package bench

import (
	"context"
	"fmt"
	"path/filepath"
	"time"

	"github.com/noid-vm/noid/client"
)

const (
	anchorPause    = "forkd diff-snapshot pause ~200 ms at 4 GiB; a 4 GiB XFS reflink takes ~15 ms (public measurement)"
	anchorLoad     = "Firecracker snapshot load 2.4 ms p50 (128 MiB, CI); original noid 5–10 s per clone"
	anchorClones   = "forkd: 100 clones of a warm VM in 101 ms, 0.12 MiB each; zeroboot raw KVM fork 0.79 ms p50"
	anchorCloneMem = "forkd 0.12 MiB per clone"
)

// runCheckpoint measures issue 3 on each storage kind.
func (b *Bench) runCheckpoint(ctx context.Context) error {
	for _, st := range b.opts.Storages {
		if err := b.runCheckpointOn(ctx, st); err != nil {
			return fmt.Errorf("%s storage: %w", st, err)
		}
		b.runCleanups()
	}
	return nil
}

type ckptVM struct {
	label    string
	name     string
	mem      int
	touchMiB int
	pause    Sample
	total    Sample
	ps       parts
	memAlloc int64 // bytes allocated in the checkpoint's memory file
	first    float64
}

func (b *Bench) runCheckpointOn(ctx context.Context, st string) error {
	end := b.section("checkpoint-"+st, fmt.Sprintf("checkpoint, rewind, clone (issue 3) on %s storage", st))
	defer end()
	s, err := b.startServer(ctx, ServerOpts{Name: "ckpt-" + st, Reflink: st == "reflink", LogLevel: "debug"})
	if err != nil {
		return err
	}
	c := s.Client
	vms := []*ckptVM{
		{label: "256 MiB idle", name: "ck-256", mem: seriesMemMiB},
		{label: "2 GiB idle", name: "ck-2g", mem: 2048},
		{label: "2 GiB, 512 MiB touched", name: "ck-2g-touched", mem: 2048, touchMiB: 512},
	}
	octx, cancel := context.WithTimeout(ctx, 30*time.Minute)
	defer cancel()
	for _, v := range vms {
		v.ps = parts{}
		if _, err := c.CreateVM(octx, client.CreateVMRequest{Name: v.name, MemoryMiB: v.mem, ColdBoot: true}); err != nil {
			return fmt.Errorf("create %s: %w\n%s", v.name, err, s.LogTail(20))
		}
		if v.touchMiB > 0 {
			// Fill a tmpfs: the pages stay in use (and written) in the guest,
			// so the host's memory file holds them.
			t0 := time.Now()
			if _, err := execOK(octx, c, v.name, "sh", "-c", touchCmd(v.touchMiB)); err != nil {
				return fmt.Errorf("touching %d MiB in %s: %w", v.touchMiB, v.name, err)
			}
			b.logf("touched %d MiB in %s in %.1fs", v.touchMiB, v.name, time.Since(t0).Seconds())
		}
		if _, err := execOK(octx, c, v.name, "true"); err != nil {
			return err
		}
	}
	// Let the fresh guests settle, then take checkpoints round-robin so
	// that host noise hits every size alike.
	time.Sleep(2 * time.Second)
	for r := -b.opts.Warmup; r < b.opts.CkptRuns; r++ {
		for _, v := range vms {
			cp, err := c.Checkpoint(octx, v.name, client.CheckpointRequest{Name: fmt.Sprintf("r%d", r+b.opts.Warmup)})
			if err != nil {
				return fmt.Errorf("checkpoint %s: %w\n%s", v.name, err, s.LogTail(20))
			}
			if d := s.checkpointDir(cp.ID); d != "" {
				v.memAlloc = allocated(filepath.Join(d, "memory.snap"))
			}
			// Let the server prepare its warm spare for the checkpoint
			// before the next one, as between checkpoints not back to back.
			wctx, wcancel := context.WithTimeout(octx, 2*time.Minute)
			s.WaitSparesPrepared(wctx, cp.ID, 1)
			wcancel()
			if err := c.DeleteCheckpoint(octx, v.name, cp.Name); err != nil {
				return err
			}
			b.vlogf("checkpoint %s [%s]: %+v", v.name, st, cp.Timings)
			if r == -b.opts.Warmup {
				v.first = cp.PauseMs
			}
			if r < 0 {
				continue
			}
			v.pause.Add(cp.PauseMs)
			if cp.Timings != nil {
				v.total.Add(cp.Timings.TotalMs)
			}
			v.ps.addTimings(cp.Timings)
		}
	}
	for _, v := range vms {
		f := &Figure{Section: "checkpoint", Storage: st, Name: "checkpoint pause, " + v.label, Unit: "ms", Stats: v.pause.Stats(), Parts: v.ps.stats(),
			Anchor: anchorPause,
			Note: fmt.Sprintf("the checkpoint's memory file holds %d MiB of guest RAM (non-zero pages) of %d MiB; the pause holds the last pre-copy pass, the device state and the switch to a new disk top; the VM's first checkpoint (warm-up, not in the sample) paused %.0f ms",
				v.memAlloc>>20, v.mem, v.first)}
		if st == "reflink" {
			f.below(30, false)
		}
		b.add(f)
		b.add(&Figure{Section: "checkpoint", Storage: st, Name: "checkpoint total, " + v.label, Unit: "ms", Stats: v.total.Stats(),
			Note: "server time from the request to the published checkpoint: live pre-copy of the RAM while the guest runs, the pause, fsync, rename, DB"})
	}
	small, big, touched := vms[0], vms[1], vms[2]
	ratio := big.pause.Stats().P50 / small.pause.Stats().P50
	rf := &Figure{Section: "checkpoint", Storage: st, Name: "pause ratio 2 GiB idle / 256 MiB idle", Unit: "x", Value: val(ratio)}
	rf.below(1.5, false)
	if st == "copy" {
		rf.Note = "copy storage: the pause should grow with touched pages only, not with RAM size, so an idle 2 GiB VM should pause about as long as an idle 256 MiB one"
	}
	b.add(rf)
	dPause := touched.pause.Stats().P50 - big.pause.Stats().P50
	dMiB := float64(touched.memAlloc-big.memAlloc) / (1 << 20)
	if dMiB > 0 {
		b.add(&Figure{Section: "checkpoint", Storage: st, Name: "pause cost per touched GiB (2 GiB: 512 MiB touched − idle)", Unit: "ms/GiB", Value: val(dPause / dMiB * 1024),
			Note: fmt.Sprintf("%.0f ms more pause for %.0f MiB more touched RAM", dPause, dMiB)})
	}
	// Free the CPU for the restore series.
	b.destroy(ctx, s, big.name)
	b.destroy(ctx, s, touched.name)

	// Rewind → first exec.
	base, err := c.Checkpoint(octx, small.name, client.CheckpointRequest{Name: "base"})
	if err != nil {
		return err
	}
	// Each series runs twice: once waiting before every operation until
	// the server has a warm spare for the checkpoint ready (what an
	// operation finds when they are not back to back), and once back to
	// back (the pool refills in the background, so some operations find
	// none and prepare one on the spot).
	ds := &defSeries{b: b, s: s, st: st, cpID: base.ID, section: "checkpoint", target: 150}
	for _, warm := range []bool{true, false} {
		if _, err := ds.run(octx, "rewind", warm, b.opts.RestoreRuns, func(i int) (string, *client.VM, error) {
			vm, err := c.Restore(octx, small.name, base.Name)
			return small.name, vm, err
		}, nil); err != nil {
			return err
		}
		// Clone → first exec (each clone destroyed before the next).
		if _, err := ds.run(octx, "clone", warm, b.opts.CloneRuns, func(i int) (string, *client.VM, error) {
			name := fmt.Sprintf("cl-%d-%v", i, warm)
			vm, err := c.Clone(octx, small.name, base.Name, name)
			return name, vm, err
		}, func(name string) { b.destroy(ctx, s, name) }); err != nil {
			return err
		}
	}
	return b.manyClones(octx, s, st, small.name, base)
}

// seriesMemMiB is the memory of the VM the rewind and clone series use (1 vCPU).
const seriesMemMiB = 256

// manyClones keeps n clones of one checkpoint alive and measures the wall
// time to make them and the host memory each costs.
func (b *Bench) manyClones(ctx context.Context, s *Server, st, src string, base *client.Checkpoint) error {
	c := s.Client
	n := b.opts.Clones
	names := make([]string, 0, n)
	defer func() {
		for _, name := range names {
			b.destroy(ctx, s, name)
		}
	}()
	var each Sample
	pids := map[string]int{}
	ids := map[string]string{}
	t0 := time.Now()
	for i := 0; i < n; i++ {
		name := fmt.Sprintf("many-%d", i)
		t1 := time.Now()
		vm, err := c.Clone(ctx, src, base.Name, name)
		if err != nil {
			return fmt.Errorf("clone %d of %d: %w\n%s", i+1, n, err, s.LogTail(20))
		}
		each.AddDur(time.Since(t1))
		names = append(names, name)
		pids[name] = vm.PID
		ids[name] = vm.ID
	}
	wall := time.Since(t0)
	b.add(&Figure{Section: "checkpoint", Storage: st, Name: fmt.Sprintf("%d clones from one checkpoint, sequential: total", n), Unit: "ms", Value: val(ms(wall)),
		Anchor: anchorClones, Note: fmt.Sprintf("each clone returns once its agent answered; per clone p50 %.0f ms", each.Stats().P50)})
	// Let every clone go idle, then check it answers and read its memory.
	time.Sleep(2 * time.Second)
	cpu0 := map[string]float64{}
	for _, name := range names {
		cpu0[name] = cpuSeconds(pids[name])
	}
	idleStart := time.Now()
	time.Sleep(5 * time.Second)
	var idleCPU Sample
	for _, name := range names {
		idleCPU.Add((cpuSeconds(pids[name]) - cpu0[name]) / time.Since(idleStart).Seconds() * 100)
	}
	b.add(&Figure{Section: "checkpoint", Storage: st, Name: "host CPU of one idle clone (QEMU process)", Unit: "% core", Stats: idleCPU.Stats(),
		Note: fmt.Sprintf("over 5 s with %d idle clones alive: what keeping idle clones around costs the host in CPU (the guest tick is emulated under TCG)", n)})
	var pss, priv, privRAM, privVMM, shared, rss, cache Sample
	for _, name := range names {
		if _, err := execOK(ctx, c, name, "true"); err != nil {
			return err
		}
	}
	time.Sleep(time.Second)
	for _, name := range names {
		sm, err := readSmaps(pids[name])
		if err != nil {
			return fmt.Errorf("reading smaps of %s (pid %d): %w", name, pids[name], err)
		}
		pss.Add(mib(sm.Pss))
		priv.Add(mib(sm.Private()))
		if inRAM, rest, err := privateByMapping(pids[name], "/mem.snap"); err == nil {
			privRAM.Add(float64(inRAM) / 1024)
			privVMM.Add(float64(rest) / 1024)
		}
		shared.Add(mib(sm.Shared()))
		rss.Add(mib(sm.Rss))
		if d := s.vmDir(ids[name]); d != "" {
			if r, err := pageCacheResident(filepath.Join(d, "mem.snap")); err == nil {
				cache.Add(float64(r) / (1 << 20))
			}
		}
	}
	touched := float64(0)
	if d := s.checkpointDir(base.ID); d != "" {
		touched = float64(allocated(filepath.Join(d, "memory.snap"))) / (1 << 20)
	}
	pf := b.add(&Figure{Section: "checkpoint", Storage: st, Name: "host memory per idle clone: private (smaps_rollup)", Unit: "MiB", Stats: priv.Stats(),
		Anchor: anchorCloneMem,
		Note: fmt.Sprintf("PSS p50 %.1f MiB, RSS p50 %.1f MiB, shared p50 %.1f MiB; the guest had touched %.0f MiB of its 256 MiB at the checkpoint; target taken as private ≤ 25%% of that",
			pss.Stats().P50, rss.Stats().P50, shared.Stats().P50, touched)})
	if touched > 0 {
		pf.below(touched/4, false)
	}
	b.add(&Figure{Section: "checkpoint", Storage: st, Name: "host memory per idle clone: PSS", Unit: "MiB", Stats: pss.Stats()})
	if len(privRAM) > 0 {
		b.add(&Figure{Section: "checkpoint", Storage: st, Name: "  of the private memory: guest RAM pages (the mem.snap mapping)", Unit: "MiB", Stats: privRAM.Stats(),
			Note: fmt.Sprintf("what the clone's guest has touched since the restore, against %.0f MiB touched at the checkpoint", touched)})
		b.add(&Figure{Section: "checkpoint", Storage: st, Name: "  of the private memory: the VMM's own (heap, TCG translation cache, libraries)", Unit: "MiB", Stats: privVMM.Stats(),
			Note: "the same for any VM, whatever memory sharing is used; the TCG translation cache does not exist on KVM hosts"})
	}
	if len(cache) > 0 {
		b.add(&Figure{Section: "checkpoint", Storage: st, Name: "page cache held by each clone's own memory file", Unit: "MiB", Stats: cache.Stats(),
			Note: "mincore of <vm>/mem.snap (QEMU 7.2 maps its own copy of the checkpoint's memory file): host memory the clone costs beyond its mapped pages (smaps does not show unmapped page cache)"})
	}
	td := time.Now()
	for _, name := range names {
		b.destroy(ctx, s, name)
	}
	names = nil
	b.add(&Figure{Section: "checkpoint", Storage: st, Name: fmt.Sprintf("destroy %d clones, sequential: total", n), Unit: "ms", Value: val(ms(time.Since(td)))})
	return nil
}
