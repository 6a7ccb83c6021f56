package bench

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/noid-vm/noid/client"
)

// The default section measures what a newcomer gets (issue 12): the
// default Debian image as `noid-server image build` makes it, VMs of the
// server's default shape (1 vCPU, 2048 MiB), a server with its default
// configuration, on each storage kind. Then QEMU's own ways to do the same
// on the same guest (peers.go), and noid against them.

const (
	defaultVCPUs  = 1
	defaultMemMiB = 2048
	// maxTouchMiB is how much of its 2048 MiB a guest is asked to touch at
	// most for the "2 GiB touched" figures (the kernel and the agent need
	// the rest).
	maxTouchMiB = 1843
)

// defaultStorages are the storage kinds of the default section:
// default is the server's default config on the ext4 temp dir, copy the
// same with plain copies asked for explicitly ([storage]
// reflink_image_size = "", which is the default today, so it is not run
// unless asked for), reflink a loop-mounted XFS.
var defaultStorageKinds = []string{"default", "copy", "reflink"}

// noidFigures are the p50s of one storage kind that the comparison with
// QEMU's own ways uses.
type noidFigures struct {
	pause     map[string]float64 // by touch level label
	rewindVMM float64
	rewindAll float64
	cloneVMM  float64
	cloneAll  float64
}

// runDefault runs the default section on each storage kind, then the
// peers, then the comparison.
func (b *Bench) runDefault(ctx context.Context) error {
	if b.art.Debian == nil {
		return fmt.Errorf("the default (Debian) image was not built")
	}
	results := map[string]*noidFigures{}
	var order []string
	for _, st := range b.opts.DefaultStorages {
		r, err := b.runDefaultOn(ctx, st)
		b.runCleanups()
		if err != nil {
			if ctx.Err() != nil {
				return err
			}
			b.failf("default section on %s storage: %v", st, err)
			continue
		}
		results[st] = r
		order = append(order, st)
	}
	if b.opts.NoPeers {
		return nil
	}
	p, err := b.runPeers(ctx)
	b.runCleanups()
	if err != nil {
		return fmt.Errorf("peers: %w", err)
	}
	b.comparePeers(order, results, p)
	return nil
}

// defVM is one VM of the checkpoint series.
type defVM struct {
	label    string
	name     string
	touchMiB int // -1: as much as the guest allows, up to maxTouchMiB
	touched  int
	pause    Sample
	total    Sample
	size     Sample // size_bytes of the checkpoint, MiB
	written  Sample // memory.snap + vmstate.snap allocated, MiB
	srvWrite Sample // noid-server's write_bytes during the checkpoint, MiB
	first    float64
}

func (b *Bench) runDefaultOn(ctx context.Context, st string) (*noidFigures, error) {
	title := map[string]string{
		"default": "the server's default config on the ext4 temp dir (plain copies)",
		"copy":    "plain copies asked for explicitly on the ext4 temp dir",
		"reflink": "reflink storage (loop-mounted XFS)",
	}[st]
	end := b.section("default-"+st, "default image (issue 12): Debian, 1 vCPU, 2048 MiB, networking on; "+title)
	defer end()
	so := ServerOpts{Name: "def-" + st, Image: b.art.Debian, Defaults: true, Reflink: st == "reflink", PlainCopy: st == "copy", LogLevel: "debug"}
	s, err := b.startServer(ctx, so)
	if err != nil {
		return nil, err
	}
	b.logf("config of %s:\n%s", so.Name, s.Config)
	c := s.Client
	octx, cancel := context.WithTimeout(ctx, 60*time.Minute)
	defer cancel()
	res := &noidFigures{pause: map[string]float64{}}

	vms := []*defVM{
		{label: "idle", name: "d-idle"},
		{label: "512 MiB touched", name: "d-512", touchMiB: 512},
		{label: "2 GiB touched", name: "d-2g", touchMiB: -1},
	}
	for _, v := range vms {
		t0 := time.Now()
		vm, err := c.CreateVM(octx, client.CreateVMRequest{Name: v.name, VCPUs: defaultVCPUs, MemoryMiB: defaultMemMiB, ColdBoot: true})
		if err != nil {
			return nil, fmt.Errorf("create %s: %w\n%s", v.name, err, s.LogTail(20))
		}
		if _, err := execOK(octx, c, v.name, "true"); err != nil {
			return nil, err
		}
		b.logf("cold boot of %s (Debian, %d MiB): %.1fs (server agent %.0f ms)", v.name, defaultMemMiB, time.Since(t0).Seconds(), vm.Timings.AgentMs)
		if v.touchMiB != 0 {
			n, err := touchGuestRAM(octx, c, v.name, v.touchMiB)
			if err != nil {
				return nil, err
			}
			v.touched = n
			b.logf("%s: touched %d MiB of guest RAM (tmpfs)", v.name, n)
		}
	}
	time.Sleep(2 * time.Second)

	// Checkpoints, round-robin over the VMs so that host noise hits every
	// touch level alike. After each one the server prepares a warm spare
	// for it (a QEMU and, with QEMU < 8.2, a copy of its memory file): the
	// next checkpoint waits for that, so it does not measure the previous
	// one's background work.
	for r := -b.opts.Warmup; r < b.opts.DefaultRuns; r++ {
		for _, v := range vms {
			pw0 := readProcWrites()[s.Pid].WriteBytes
			cp, err := c.Checkpoint(octx, v.name, client.CheckpointRequest{Name: fmt.Sprintf("r%d", r+b.opts.Warmup)})
			if err != nil {
				return nil, fmt.Errorf("checkpoint %s: %w\n%s", v.name, err, s.LogTail(20))
			}
			pw1 := readProcWrites()[s.Pid].WriteBytes
			var written int64
			if d := s.checkpointDir(cp.ID); d != "" {
				written = allocated(filepath.Join(d, "memory.snap")) + allocated(filepath.Join(d, "vmstate.snap"))
			}
			b.vlogf("checkpoint %s [%s]: pause %.1f ms, %+v, size %d MiB, written %d MiB", v.name, st, cp.PauseMs, cp.Timings, cp.SizeBytes>>20, written>>20)
			wctx, wcancel := context.WithTimeout(octx, 3*time.Minute)
			if !s.WaitSparesPrepared(wctx, cp.ID, 1) {
				b.logf("no warm spare was prepared for checkpoint %s of %s within 3 minutes", cp.Name, v.name)
			}
			wcancel()
			if err := c.DeleteCheckpoint(octx, v.name, cp.Name); err != nil {
				return nil, err
			}
			if b.opts.SyncBetweenCheckpoints {
				// The spare's copy of the memory file (QEMU < 8.2) is
				// still being written back: flush it, so that the next
				// pause does not wait behind it.
				syncHost()
			}
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
			v.size.Add(float64(cp.SizeBytes) / (1 << 20))
			v.written.Add(float64(written) / (1 << 20))
			v.srvWrite.Add(float64(pw1-pw0) / (1 << 20))
		}
	}
	for _, v := range vms {
		label := v.label
		if v.touchMiB < 0 {
			label = fmt.Sprintf("2 GiB (%d MiB) touched", v.touched)
		}
		syncNote := "the host's page cache was not flushed between checkpoints (--sync-between-checkpoints=false)"
		if b.opts.SyncBetweenCheckpoints {
			syncNote = "a host-wide sync ran between checkpoints"
		}
		f := &Figure{Section: "default", Storage: st, Name: "checkpoint pause, " + v.label, Unit: "ms", Stats: v.pause.Stats(), Anchor: anchorPause,
			Note: fmt.Sprintf("%s; checkpoints round-robin over the three VMs, each after the server prepared its spare for the previous one; %s; the VM's first checkpoint (warm-up, not in the sample) paused %.1f ms", label, syncNote, v.first)}
		switch v.touchMiB {
		case 0:
			f.below(30, false)
		case 512:
			f.below(100, false)
		}
		b.add(f)
		res.pause[v.label] = v.pause.Stats().P50
		b.add(&Figure{Section: "default", Storage: st, Name: "checkpoint total, " + v.label, Unit: "ms", Stats: v.total.Stats(),
			Note: "server time from the request to the published checkpoint: live pre-copy of the RAM while the guest runs, the pause, fsync, rename, DB"})
		b.add(&Figure{Section: "default", Storage: st, Name: "checkpoint written (memory.snap + vmstate.snap), " + v.label, Unit: "MiB", Stats: v.written.Stats(),
			Note: fmt.Sprintf("blocks allocated by the checkpoint's own files (its disk layers are hard links); size_bytes in the API p50 %.0f MiB; noid-server's write_bytes during the request p50 %.0f MiB",
				v.size.Stats().P50, v.srvWrite.Stats().P50)})
	}
	idle, big := vms[0], vms[2]
	if p := idle.pause.Stats().P50; p > 0 {
		b.add(&Figure{Section: "default", Storage: st, Name: "pause ratio 2 GiB touched / idle", Unit: "x", Value: val(big.pause.Stats().P50 / p),
			Note: fmt.Sprintf("%d MiB touched; the pause should not grow with touched RAM (pre-copy sends it while the guest runs)", big.touched)})
	}
	// Free the host for the rest.
	b.destroy(ctx, s, vms[1].name)
	b.destroy(ctx, s, vms[2].name)

	// Rewind and clone → first exec, from a checkpoint of the idle VM.
	base, err := c.Checkpoint(octx, idle.name, client.CheckpointRequest{Name: "base"})
	if err != nil {
		return nil, err
	}
	ds := &defSeries{b: b, s: s, st: st, cpID: base.ID, section: "default", target: 30}
	for _, warm := range []bool{true, false} {
		r, err := ds.run(octx, "rewind", warm, b.opts.DefaultRestoreRuns, func(i int) (string, *client.VM, error) {
			vm, err := c.Restore(octx, idle.name, base.Name)
			return idle.name, vm, err
		}, nil)
		if err != nil {
			return nil, err
		}
		if warm {
			res.rewindVMM, res.rewindAll = r.vmm, r.total
		}
		r, err = ds.run(octx, "clone", warm, b.opts.DefaultRestoreRuns, func(i int) (string, *client.VM, error) {
			name := fmt.Sprintf("dcl-%d-%v", i, warm)
			vm, err := c.Clone(octx, idle.name, base.Name, name)
			return name, vm, err
		}, func(name string) { b.destroy(ctx, s, name) })
		if err != nil {
			return nil, err
		}
		if warm {
			res.cloneVMM, res.cloneAll = r.vmm, r.total
		}
	}

	// Golden creates → first exec: the checkpoint promoted to the system
	// golden of the default spec, as the quickstart's provisioning does;
	// each create waits (untimed) for the golden's running spare.
	if _, err := c.PromoteGolden(octx, idle.name, base.Name); err != nil {
		return nil, fmt.Errorf("promoting the golden: %w\n%s", err, s.LogTail(20))
	}
	gs := &defSeries{b: b, s: s, st: st, section: "default", target: 30, golden: fmt.Sprintf("%dx%d", defaultVCPUs, defaultMemMiB)}
	if _, err := gs.run(octx, "golden create", true, b.opts.DefaultRestoreRuns, func(i int) (string, *client.VM, error) {
		name := fmt.Sprintf("dg-%d", i)
		vm, err := c.CreateVM(octx, client.CreateVMRequest{Name: name, VCPUs: defaultVCPUs, MemoryMiB: defaultMemMiB})
		if err == nil && vm.BootPath != "golden" {
			err = fmt.Errorf("%s booted %s (%s), not from the golden", name, vm.BootPath, vm.BootReason)
		}
		return name, vm, err
	}, func(name string) { b.destroy(ctx, s, name) }); err != nil {
		return nil, err
	}

	// Host disk writes while a guest rewrites its RAM: in a clone (RAM
	// mapped copy-on-write from its copy of the checkpoint's memory file)
	// and in a cold-booted VM (anonymous RAM). Nothing else the bench does
	// runs meanwhile: no checkpoint, the touched VMs are gone, and the
	// pool has refilled.
	if b.opts.RewriteSeconds > 0 {
		if _, err := c.Clone(octx, idle.name, base.Name, "d-rw-clone"); err != nil {
			return nil, fmt.Errorf("clone for the write test: %w\n%s", err, s.LogTail(20))
		}
		ds.used++
		if _, err := c.CreateVM(octx, client.CreateVMRequest{Name: "d-rw-cold", VCPUs: defaultVCPUs, MemoryMiB: defaultMemMiB, ColdBoot: true}); err != nil {
			return nil, fmt.Errorf("create for the write test: %w\n%s", err, s.LogTail(20))
		}
		wctx, wcancel := context.WithTimeout(octx, 3*time.Minute)
		s.WaitSparesPrepared(wctx, base.ID, ds.used+1)
		wcancel()
		for _, w := range []struct {
			vm, kind string
			rewrite  bool
		}{{"d-rw-clone", "clone", true}, {"d-rw-cold", "cold-booted VM", true}, {"d-rw-clone", "", false}} {
			if err := b.rewriteWindow(octx, s, st, w.vm, w.kind, w.rewrite); err != nil {
				return nil, err
			}
		}
	}
	return res, nil
}

// rewriteWindow measures what the host writes to its disks while the
// guest of vm rewrites 200 MiB of its RAM (a tmpfs file) in a loop for
// --rewrite-seconds. Without rewrite the guest sleeps instead: a control
// that shows what the host writes anyway.
func (b *Bench) rewriteWindow(ctx context.Context, s *Server, st, vm, kind string, rewrite bool) error {
	c := s.Client
	const fileMiB = 200
	if rewrite {
		if _, err := execOK(ctx, c, vm, "sh", "-c", fmt.Sprintf("mkdir -p /mnt/rw && mount -t tmpfs -o size=%dm none /mnt/rw && dd if=/dev/zero of=/mnt/rw/f bs=1M count=%d 2>/dev/null", fileMiB+16, fileMiB)); err != nil {
			return err
		}
	}
	// Start from clean page cache, so that the window does not count
	// write-back of what was dirtied before it.
	syncHost()
	time.Sleep(2 * time.Second)
	me := os.Getpid()
	ours := func(pid int, p procIO) bool {
		return pid == s.Pid || pid == me || strings.Contains(p.Cmdline, s.Dir+"/")
	}
	secs := b.opts.RewriteSeconds
	b0, p0 := readBlockWrites(), readProcWrites()
	t0 := time.Now()
	script := fmt.Sprintf(`n=0; end=$(( $(date +%%s) + %d )); while [ $(date +%%s) -lt $end ]; do dd if=/dev/zero of=/mnt/rw/f bs=1M count=%d conv=notrunc 2>/dev/null || exit 1; n=$((n+1)); done; echo $n`, secs, fileMiB)
	if !rewrite {
		script = fmt.Sprintf("sleep %d; echo 0", secs)
	}
	out, err := execOK(ctx, c, vm, "sh", "-c", script)
	el := time.Since(t0)
	b1, p1 := readBlockWrites(), readProcWrites()
	if err != nil {
		return fmt.Errorf("rewriting guest RAM in %s: %w", vm, err)
	}
	syncHost()
	b2 := readBlockWrites()
	loops, _ := strconv.Atoi(strings.TrimSpace(out))
	disks := diffBlockWrites(b0, b1)
	flushed := diffBlockWrites(b0, b2)
	procs := diffProcWrites(p0, p1, ours)
	what := fmt.Sprintf("the guest rewrote a %d MiB tmpfs file %d times in %.0f s (%d MiB of guest RAM writes)", fileMiB, loops, el.Seconds(), loops*fileMiB)
	name := fmt.Sprintf("host disk writes while a %s rewrites 200 MiB of RAM for %d s", kind, secs)
	if !rewrite {
		what = fmt.Sprintf("control: the guests idle for %.0f s, nothing else of noid's running", el.Seconds())
		name = fmt.Sprintf("host disk writes in %d s with the guests idle (control)", secs)
	}
	fd := b.add(&Figure{Section: "default", Storage: st, Name: name + ": all disks", Unit: "MiB", Value: val(float64(disks.Disks) / (1 << 20)),
		Note: what + "; /sys/block/*/stat sectors written over the window, every process on the host included (loop devices listed, not summed): " + disks.String()})
	fn := b.add(&Figure{Section: "default", Storage: st, Name: name + ": noid's processes", Unit: "MiB", Value: val(float64(procs.Ours) / (1 << 20)),
		Note: "write_bytes of noid-server, its VMMs and noid-bench (/proc/PID/io, counted when page cache is dirtied; a guest's own disk writes land in its qcow2 top, 64 KiB per newly touched cluster); the processes that wrote most: " + strings.Join(procs.Top, ", ")})
	if rewrite {
		fd.below(5, true)
		fn.below(5, true)
	}
	b.add(&Figure{Section: "default", Storage: st, Name: name + ": other processes", Unit: "MiB", Value: val(float64(procs.Others) / (1 << 20)),
		Note: "write_bytes of every other process on the host (other engineers' tests): what the all-disks figure may include besides noid"})
	b.add(&Figure{Section: "default", Storage: st, Name: name + ": all disks, with a sync at the end", Unit: "MiB", Value: val(float64(flushed.Disks) / (1 << 20)),
		Note: "the same window plus a host-wide sync right after it, so that dirty pages not yet written back count too: " + flushed.String()})
	return nil
}

// touchGuestRAM fills a tmpfs in the guest, so that miB of guest RAM are
// in use and written; miB < 0 touches as much as the guest has available,
// less a margin, up to maxTouchMiB. It returns the MiB touched.
func touchGuestRAM(ctx context.Context, c *client.Client, vm string, miB int) (int, error) {
	return touchRAM(func(argv ...string) (string, error) { return execOK(ctx, c, vm, argv...) }, vm, miB)
}

// touchRAM is touchGuestRAM through run, which runs a command in the
// guest and returns its output.
func touchRAM(run func(argv ...string) (string, error), vm string, miB int) (int, error) {
	if miB < 0 {
		out, err := run("sh", "-c", "grep MemAvailable /proc/meminfo")
		if err != nil {
			return 0, err
		}
		f := strings.Fields(out)
		if len(f) < 2 {
			return 0, fmt.Errorf("MemAvailable of %s: %q", vm, out)
		}
		kib, err := strconv.Atoi(f[1])
		if err != nil {
			return 0, fmt.Errorf("MemAvailable of %s: %q", vm, out)
		}
		miB = min(maxTouchMiB, kib/1024-192)
	}
	if _, err := run("sh", "-c", touchCmd(miB)); err != nil {
		return 0, fmt.Errorf("touching %d MiB in %s: %w", miB, vm, err)
	}
	return miB, nil
}

// touchCmd is a shell command that fills a new tmpfs with miB MiB of
// non-zero bytes: the pages stay in use and hold data (a migration sends
// zero pages as a flag, so zeros would not count as touched).
func touchCmd(miB int) string {
	return fmt.Sprintf("mkdir -p /mnt/fill && mount -t tmpfs -o size=%dm none /mnt/fill && yes noid | head -c %d > /mnt/fill/f && echo ok", miB+16, int64(miB)<<20)
}

// defSeries runs rewind or clone series on one server, against one
// checkpoint.
type defSeries struct {
	b    *Bench
	s    *Server
	st   string
	cpID string
	// section names the figures' section; target is the VMM side's
	// target with a spare ready, in ms.
	section string
	target  float64
	// golden, when set, is the spec of the system golden the operations
	// create from: they wait for its running spares instead.
	golden string
	// used counts the operations on the checkpoint so far: each takes one
	// spare, from the pool or prepared on the spot.
	used int
}

type seriesResult struct{ vmm, total float64 }

// run times warm-up+n operations, each followed by a first exec. With
// waitSpare, each waits (untimed) until the server has a spare prepared
// for the checkpoint.
func (ds *defSeries) run(ctx context.Context, kind string, waitSpare bool, n int, op func(i int) (string, *client.VM, error), after func(name string)) (seriesResult, error) {
	b, s := ds.b, ds.s
	var total, vmmSide, agent, serverTotal Sample
	ps := parts{}
	warm := 0
	label := kind + ", back to back"
	if waitSpare {
		label = kind + ", spare ready"
	}
	for i := -b.opts.Warmup; i < n; i++ {
		if waitSpare {
			wctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
			ready := func() bool { return s.SparesPrepared(ds.cpID) > ds.used }
			if ds.golden != "" {
				// Running spares waiting now, from the server's own gauge:
				// spares prepared on the spot for a create that found none
				// also log "golden spare running", so counting those runs
				// ahead of the pool.
				ready = func() bool { return goldenSparesWaiting(wctx, s, ds.golden) > 0 }
			}
			for !ready() && wctx.Err() == nil {
				time.Sleep(10 * time.Millisecond)
			}
			if !ready() {
				b.logf("%s: no spare ready after 3 minutes", label)
			}
			cancel()
			// The spare's QEMU has just been started: let it settle as it
			// would between operations that are not back to back.
			time.Sleep(200 * time.Millisecond)
		}
		t0 := time.Now()
		name, vm, err := op(i + b.opts.Warmup)
		if err != nil {
			return seriesResult{}, fmt.Errorf("%s: %w\n%s", kind, err, s.LogTail(20))
		}
		ds.used++
		te, _, err := firstExec(ctx, s.Client, name)
		if err != nil {
			return seriesResult{}, err
		}
		tt := time.Since(t0)
		te2, err := secondExec(ctx, s.Client, name)
		if err != nil {
			return seriesResult{}, err
		}
		b.vlogf("%s %s [%s]: total %v exec %v exec2 %v server %+v", kind, name, ds.st, tt, te, te2, vm.Timings)
		if after != nil {
			after(name)
		}
		if i < 0 || vm.Timings == nil {
			continue
		}
		t := vm.Timings
		total.AddDur(tt)
		ps.addTimings(t)
		ps.add("exec", ms(te))
		ps.add("exec2", ms(te2))
		vmmSide.Add(t.SpawnMs + t.LoadMs)
		agent.Add(t.AgentMs)
		serverTotal.Add(t.TotalMs)
		if t.WarmSpare {
			warm++
		}
	}
	note := fmt.Sprintf("%d of %d took a warm spare (no QEMU start on the path)", warm, n)
	b.add(&Figure{Section: ds.section, Storage: ds.st, Name: label + " → first exec", Unit: "ms", Stats: total.Stats(), Parts: ps.stats(), Anchor: anchorLoad,
		Note: "client wall time from the request to `true` exiting 0; exec2 = a second `true` right after (not in the total); " + note})
	f := b.add(&Figure{Section: ds.section, Storage: ds.st, Name: label + ", VMM side (spawn + load)", Unit: "ms", Stats: vmmSide.Stats(),
		Note: "the server's timings: QEMU start when no spare was ready (spawn: the whole preparation of a spare then) + loading the device state and resuming; " + note})
	if waitSpare {
		f.below(ds.target, false)
	}
	b.add(&Figure{Section: ds.section, Storage: ds.st, Name: label + ", agent part", Unit: "ms", Stats: agent.Stats(),
		Note: "from the VM resuming until its agent answered and applied the sync (clock, entropy, identity and network for a clone): guest code under TCG"})
	return seriesResult{vmm: vmmSide.Stats().P50, total: total.Stats().P50}, nil
}

// goldenSparesWaiting reads noid_warm_spares{kind="golden"} of the shape
// spec ("1x2048") from the server's /metrics (0 when it cannot).
func goldenSparesWaiting(ctx context.Context, s *Server, spec string) int {
	text, err := s.Client.Metrics(ctx)
	if err != nil {
		return 0
	}
	return goldenSparesIn(text, spec)
}

// goldenSparesIn reads the golden spares of shape spec from a /metrics
// exposition.
func goldenSparesIn(text, spec string) int {
	vcpus, mem, _ := strings.Cut(spec, "x")
	for _, line := range strings.Split(text, "\n") {
		if !strings.HasPrefix(line, "noid_warm_spares{") || !strings.Contains(line, `kind="golden"`) ||
			!strings.Contains(line, `vcpus="`+vcpus+`"`) || !strings.Contains(line, `memory_mib="`+mem+`"`) {
			continue
		}
		f := strings.Fields(line)
		n, _ := strconv.ParseFloat(f[len(f)-1], 64)
		return int(n)
	}
	return 0
}

// syncHost flushes every filesystem's dirty pages.
func syncHost() { unix.Sync() }
