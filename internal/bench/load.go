package bench

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/noid-vm/noid/client"
	"github.com/noid-vm/noid/internal/network"
	"github.com/noid-vm/noid/internal/procfs"
)

// LoadOptions configure `noid-bench load`.
type LoadOptions struct {
	Clients  int
	Duration time.Duration
	MaxVMs   int
	MemMiB   int
	Cold     bool
	MaxOps   int
	NoNet    bool
	Poll     time.Duration
	// Users is how many users (each with its own token) the clients are
	// spread over.
	Users int
}

func (l *LoadOptions) flags(fs *flag.FlagSet) {
	fs.IntVar(&l.Clients, "clients", 50, "load: concurrent clients")
	fs.DurationVar(&l.Duration, "duration", 2*time.Minute, "load: how long clients start new cycles")
	fs.IntVar(&l.MaxVMs, "max-vms", 0, "load: cap on VMs alive at once (a cycle holds up to 2); 0: as many as half the host's available memory holds")
	fs.IntVar(&l.Users, "users", 5, "load: users the clients are spread over (each client acts with its user's token)")
	fs.IntVar(&l.MemMiB, "memory", 128, "load: guest memory in MiB")
	fs.BoolVar(&l.Cold, "cold", false, "load: cold-boot creates instead of golden ones")
	fs.IntVar(&l.MaxOps, "max-cycles", 2000, "load: bound on the total number of cycles")
	fs.BoolVar(&l.NoNet, "no-network", false, "load: run without VM networking (no network namespace, no TAPs)")
	fs.DurationVar(&l.Poll, "poll", 250*time.Millisecond, "load: a client waiting for a VM slot lists VMs this often (0: waits without polling)")
}

// LoadReport is the load run's outcome (in --json).
type LoadReport struct {
	Clients       int                `json:"clients"`
	Users         int                `json:"users"`
	MaxLiveVMs    int                `json:"max_live_vms"`
	MaxLiveWhy    string             `json:"max_live_vms_from"`
	MemoryMiB     int                `json:"memory_mib"`
	CreatePath    string             `json:"create_path"`
	Network       bool               `json:"network"`
	Seconds       float64            `json:"seconds"`
	CyclesOK      int64              `json:"cycles_ok"`
	CyclesFailed  int64              `json:"cycles_failed"`
	OpsPerSecond  float64            `json:"ops_per_second"`
	CyclesPerMin  float64            `json:"cycles_per_minute"`
	Ops           map[string]*OpStat `json:"ops"`
	Checks        []Check            `json:"checks"`
	SampleErrors  []string           `json:"sample_errors,omitempty"`
	PeakLiveVMs   int64              `json:"peak_live_vms"`
	ServerFDs     [2]int             `json:"server_fds_before_after"`
	ServerThreads [2]int             `json:"server_threads_before_after"`
	ServerRSSMiB  [2]float64         `json:"server_rss_mib_before_after"`
	PollMs        float64            `json:"poll_ms"`
	ServerCPUPct  float64            `json:"server_cpu_percent_of_one_core"`
	LoadAvgStart  [3]float64         `json:"loadavg_start"`
	LoadAvgEnd    [3]float64         `json:"loadavg_end"`
}

// OpStat summarises one operation kind.
type OpStat struct {
	OK     int    `json:"ok"`
	Errors int    `json:"errors"`
	Ms     *Stats `json:"ms"`
}

// Check is one end-of-run consistency check.
type Check struct {
	Name   string `json:"name"`
	OK     bool   `json:"ok"`
	Detail string `json:"detail"`
}

type loadRun struct {
	b    *Bench
	s    *Server
	opts LoadOptions

	mu      sync.Mutex
	lat     map[string]*Sample
	errs    map[string]int
	samples []string
	model   map[string]int // VM name -> how many times we believe it exists (must end 0 or 1)
	anom    []string

	live, peak    atomic.Int64
	cycles        atomic.Int64
	okCyc, badCyc atomic.Int64
}

func (l *loadRun) record(op string, start time.Time, err error) {
	d := time.Since(start)
	l.mu.Lock()
	defer l.mu.Unlock()
	if err != nil {
		l.errs[op]++
		if len(l.samples) < 20 {
			l.samples = append(l.samples, fmt.Sprintf("%s: %v", op, err))
		}
		return
	}
	s := l.lat[op]
	if s == nil {
		s = &Sample{}
		l.lat[op] = s
	}
	s.AddDur(d)
}

func (l *loadRun) anomaly(format string, a ...any) {
	l.mu.Lock()
	l.anom = append(l.anom, fmt.Sprintf(format, a...))
	l.mu.Unlock()
}

func (l *loadRun) exists(name string, delta int) {
	l.mu.Lock()
	l.model[name] += delta
	if l.model[name] == 0 {
		delete(l.model, name)
	}
	l.mu.Unlock()
}

func (l *loadRun) vmUp(n int64) {
	v := l.live.Add(n)
	for {
		p := l.peak.Load()
		if v <= p || l.peak.CompareAndSwap(p, v) {
			return
		}
	}
}

// runLoad is issue 6's load run: Clients concurrent API clients, each with
// its own connection pool, doing create, exec, checkpoint, clone, exec and
// destroy cycles for Duration; clients without a free VM slot keep the
// server busy with list requests meanwhile. At the end it checks that the
// DB, the disk, the processes and the TAPs agree and that nothing leaked.
func (b *Bench) runLoad(ctx context.Context) error {
	lo := b.opts.Load
	if lo.Clients < 1 || lo.MaxVMs < 0 || lo.Duration <= 0 || lo.Users < 1 {
		return fmt.Errorf("load: need --clients ≥ 1, --users ≥ 1, --max-vms ≥ 0 and a positive --duration")
	}
	why := "--max-vms"
	if lo.MaxVMs == 0 {
		lo.MaxVMs, why = loadMemoryBudget(lo.Clients, lo.MemMiB)
	}
	if lo.MaxVMs < 2 {
		return fmt.Errorf("load: room for %d VMs only (%s); need 2", lo.MaxVMs, why)
	}
	path := "golden"
	if lo.Cold {
		path = "cold"
	}
	end := b.section("load", fmt.Sprintf("load (issues 6, 19): %d clients of %d users, %v, create (%s) → exec → checkpoint → write → rewind → exec → clone → exec → destroy ×2; at most %d VMs alive (%s), %d MiB each",
		lo.Clients, lo.Users, lo.Duration, path, lo.MaxVMs, why, lo.MemMiB))
	defer end()
	s, err := b.startServer(ctx, ServerOpts{Name: "load", Network: !lo.NoNet, MemoryMiB: lo.MemMiB})
	if err != nil {
		return err
	}
	pctx, pcancel := context.WithTimeout(ctx, 10*time.Minute)
	defer pcancel()
	if !lo.Cold {
		if err := provisionGolden(pctx, s, lo.MemMiB); err != nil {
			return err
		}
	}
	rep := &LoadReport{Clients: lo.Clients, Users: lo.Users, MaxLiveVMs: lo.MaxVMs, MaxLiveWhy: why, MemoryMiB: lo.MemMiB, CreatePath: path, Network: !lo.NoNet, LoadAvgStart: loadAvg(),
		PollMs: ms(lo.Poll)}
	b.load = rep
	// Baseline of the idle server (after the golden set-up, no VMs), once
	// its warm spare runs: a spare still starting opens its VMM's sockets
	// later, which would count as a leak.
	if err := waitIdleSpare(pctx, s, lo); err != nil {
		return err
	}
	fds0 := fdTable(s.Pid)
	var kinds0 map[string]int
	rep.ServerFDs[0], kinds0 = fdCount(s.Pid)
	rep.ServerThreads[0] = threads(s.Pid)
	rep.ServerRSSMiB[0] = rssMiB(s.Pid)
	tapsBefore, _ := s.taps()

	l := &loadRun{b: b, s: s, opts: lo, lat: map[string]*Sample{}, errs: map[string]int{}, model: map[string]int{}}
	slots := make(chan struct{}, lo.MaxVMs/2)
	start := time.Now()
	cpu0 := cpuSeconds(s.Pid)
	deadline := start.Add(lo.Duration)
	// Clients stop starting cycles at the deadline; a cycle in flight gets
	// up to 5 more minutes, then everything is cancelled.
	hctx, hcancel := context.WithDeadline(ctx, deadline.Add(5*time.Minute))
	defer hcancel()
	var wg sync.WaitGroup
	var clients []*client.Client
	// The users, each with a token; client i acts as user i mod Users.
	var tokens []string
	for u := 0; u < lo.Users; u++ {
		ut, err := s.Client.CreateUser(pctx, fmt.Sprintf("load%d", u), false)
		if err != nil {
			return fmt.Errorf("load: creating user %d: %w", u, err)
		}
		tokens = append(tokens, ut.Token)
	}
	for i := 0; i < lo.Clients; i++ {
		c, err := client.New("unix://"+s.Socket, tokens[i%len(tokens)])
		if err != nil {
			return err
		}
		clients = append(clients, c)
		wg.Add(1)
		go func(id int, c *client.Client) {
			defer wg.Done()
			l.client(hctx, id, c, slots, deadline)
		}(i, c)
	}
	wg.Wait()
	rep.Seconds = time.Since(start).Seconds()
	rep.ServerCPUPct = (cpuSeconds(s.Pid) - cpu0) / rep.Seconds * 100
	rep.LoadAvgEnd = loadAvg()
	b.logf("load: clients done after %.0fs; checking consistency", rep.Seconds)

	// Consistency and leak checks.
	cctx, ccancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Minute)
	defer ccancel()
	rep.Checks = l.checks(cctx, tapsBefore)
	// Leaks: fds and threads of the idle server once the clients' idle
	// connections are gone. The clients close theirs (the server keeps an
	// idle one 2 minutes); a connection a response was still handing back
	// to its pool when a client closed the idle ones is closed on a later
	// round.
	if err := waitIdleSpare(cctx, s, lo); err != nil {
		b.logf("load: %v", err)
	}
	// The server's end of a connection this benchmark's clients still hold
	// (one a client is still closing, say) is the clients' state, not a
	// leak of the server's: counts leave those out, before and after.
	own0 := ownConns(s.Pid, fds0)
	var fdsAfter, own int
	for w := 0; w < 45; w++ {
		for _, c := range append(clients, s.Client) {
			c.CloseIdleConnections()
		}
		fdsAfter, _ = fdCount(s.Pid)
		own = ownConns(s.Pid, fdTable(s.Pid))
		if fdsAfter-own <= rep.ServerFDs[0]-own0 {
			break
		}
		time.Sleep(time.Second)
	}
	_, kinds := fdCount(s.Pid)
	rep.ServerFDs[1] = fdsAfter
	rep.ServerThreads[1] = threads(s.Pid)
	rep.ServerRSSMiB[1] = rssMiB(s.Pid)
	// A few sockets the server opens on first use (netlink, nftables, the
	// DNS forwarder's) are allowed; a leak per cycle, with tens of cycles,
	// is not. The detail lists every fd that is new since the baseline and,
	// for a socket, who holds its other end.
	rep.Checks = append(rep.Checks, Check{Name: "server fds back to baseline", OK: fdsAfter-own <= rep.ServerFDs[0]-own0+4,
		Detail: fmt.Sprintf("%d before, %d after, of which connections of this benchmark's clients %d and %d (%v); new: %v",
			rep.ServerFDs[0], fdsAfter, own0, own, kinds, newFDs(s.Pid, fds0, fdTable(s.Pid)))})
	// Each VMM the server watches holds one pidfd; with no VMs left only
	// the spares' should remain.
	rep.Checks = append(rep.Checks, Check{Name: "no pidfd left for exited VMMs", OK: kinds["pidfd"] <= kinds0["pidfd"],
		Detail: fmt.Sprintf("%d pidfds before the run, %d after, with the same VMs (none) and spares", kinds0["pidfd"], kinds["pidfd"])})

	// Figures.
	rep.CyclesOK, rep.CyclesFailed = l.okCyc.Load(), l.badCyc.Load()
	rep.PeakLiveVMs = l.peak.Load()
	rep.Ops = map[string]*OpStat{}
	total := 0
	for op, smp := range l.lat {
		rep.Ops[op] = &OpStat{OK: len(*smp), Ms: smp.Stats()}
		total += len(*smp)
	}
	for op, n := range l.errs {
		if rep.Ops[op] == nil {
			rep.Ops[op] = &OpStat{Ms: &Stats{}}
		}
		rep.Ops[op].Errors = n
	}
	rep.OpsPerSecond = float64(total) / rep.Seconds
	rep.CyclesPerMin = float64(rep.CyclesOK) / rep.Seconds * 60
	rep.SampleErrors = append(l.samples, l.anom...)
	b.printLoad(rep)
	for _, c := range rep.Checks {
		if !c.OK {
			b.failf("load check failed: %s: %s", c.Name, c.Detail)
		}
	}
	if rep.CyclesFailed > 0 {
		b.failf("load: %d of %d cycles failed", rep.CyclesFailed, rep.CyclesFailed+rep.CyclesOK)
	}
	return nil
}

// ownConns counts the sockets in fds (pid's fd table) whose other end this
// process holds: API connections of the benchmark's own clients.
func ownConns(pid int, fds map[string]string) int {
	peers := unixPeers(pid)
	me := fmt.Sprintf("[%d]", os.Getpid())
	n := 0
	for _, l := range fds {
		ino := strings.TrimSuffix(strings.TrimPrefix(l, "socket:["), "]")
		if strings.HasSuffix(peers[ino], me) {
			n++
		}
	}
	return n
}

// waitIdleSpare waits, up to 2 minutes, until the server's golden spare
// for the load's VM shape runs (nothing to wait for in a cold run), so that
// fd counts compare a server in the same state.
func waitIdleSpare(ctx context.Context, s *Server, lo LoadOptions) error {
	if lo.Cold {
		return nil
	}
	spec := fmt.Sprintf("%dx%d", 1, lo.MemMiB)
	wctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	for goldenSparesWaiting(wctx, s, spec) == 0 {
		select {
		case <-wctx.Done():
			return fmt.Errorf("no golden spare of shape %s ran within 2 minutes", spec)
		case <-time.After(100 * time.Millisecond):
		}
	}
	return nil
}

func (l *loadRun) client(ctx context.Context, id int, c *client.Client, slots chan struct{}, deadline time.Time) {
	for k := 0; ; k++ {
		if time.Now().After(deadline) || ctx.Err() != nil {
			return
		}
		if l.cycles.Add(1) > int64(l.opts.MaxOps) {
			return
		}
		// Wait for a VM slot; meanwhile keep the API busy with lists.
		got := false
		if l.opts.Poll <= 0 {
			select {
			case slots <- struct{}{}:
				got = true
			case <-ctx.Done():
				return
			}
			if time.Now().After(deadline) {
				<-slots
				return
			}
		}
		for !got {
			t0 := time.Now()
			_, err := c.ListVMs(ctx)
			l.record("list", t0, err)
			if time.Now().After(deadline) || ctx.Err() != nil {
				return
			}
			select {
			case slots <- struct{}{}:
				got = true
			case <-time.After(l.opts.Poll):
			case <-ctx.Done():
				return
			}
		}
		ok := l.cycle(ctx, c, fmt.Sprintf("l%02d-%d", id, k))
		<-slots
		if ok {
			l.okCyc.Add(1)
		} else {
			l.badCyc.Add(1)
		}
	}
}

// cycle runs one create → exec → checkpoint → clone → exec → destroy ×2.
// It returns false if any step failed (after cleaning up what it can).
func (l *loadRun) cycle(ctx context.Context, c *client.Client, name string) bool {
	op := func(kind string, fn func(context.Context) error) error {
		octx, cancel := context.WithTimeout(ctx, 3*time.Minute)
		defer cancel()
		t0 := time.Now()
		err := fn(octx)
		l.record(kind, t0, err)
		return err
	}
	clone := name + "-c"
	made := map[string]bool{}
	cleanup := func() {
		for n := range made {
			dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Minute)
			if _, err := c.DestroyVM(dctx, n); err == nil || client.IsNotFound(err) {
				if err != nil {
					l.anomaly("%s: created but already gone at clean-up", n)
				}
				l.exists(n, -1)
				l.vmUp(-1)
			} else {
				l.anomaly("%s: destroy during clean-up failed: %v", n, err)
			}
			cancel()
		}
	}
	// afterFailedCreate records a VM that a failed create left behind.
	afterFailedCreate := func(n string) {
		gctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
		defer cancel()
		if _, err := c.GetVM(gctx, n); err == nil {
			l.anomaly("%s: the create failed but the VM is listed (half-created)", n)
			l.exists(n, 1)
			l.vmUp(1)
			made[n] = true
		}
	}
	vmOf := map[string]*client.VM{}
	var cpID string
	err := op("create", func(ctx context.Context) error {
		vm, err := c.CreateVM(ctx, client.CreateVMRequest{Name: name, MemoryMiB: l.opts.MemMiB, ColdBoot: l.opts.Cold})
		vmOf[name] = vm
		return err
	})
	if err != nil {
		afterFailedCreate(name)
		cleanup()
		return false
	}
	l.exists(name, 1)
	l.vmUp(1)
	made[name] = true
	l.verifyLive(ctx, c, vmOf[name])
	err = op("exec", func(ctx context.Context) error {
		out, err := execOK(ctx, c, name, "echo", name)
		if err == nil && strings.TrimSpace(out) != name {
			err = fmt.Errorf("exec in %s printed %q", name, out)
		}
		return err
	})
	if err == nil {
		err = op("checkpoint", func(ctx context.Context) error {
			cp, err := c.Checkpoint(ctx, name, client.CheckpointRequest{Name: "c"})
			if err != nil {
				return err
			}
			cps, err := c.ListCheckpoints(ctx, name)
			if err != nil {
				return err
			}
			if len(cps) != 1 || cps[0].ID != cp.ID {
				l.anomaly("%s: after one checkpoint, the list holds %d", name, len(cps))
			}
			cpID = cp.ID
			if l.s.checkpointDir(cp.ID) == "" {
				l.anomaly("%s: checkpoint %s is listed but has no directory", name, cp.ID)
			}
			return nil
		})
	}
	if err == nil {
		// A write after the checkpoint, then a rewind to it: the write is
		// gone and the VM answers as before.
		err = op("exec", func(ctx context.Context) error {
			_, err := execOK(ctx, c, name, "sh", "-c", "echo after > /tmp/after")
			return err
		})
	}
	if err == nil {
		err = op("rewind", func(ctx context.Context) error {
			vm, err := c.Restore(ctx, name, "c")
			if err == nil && vm.ID != vmOf[name].ID {
				l.anomaly("%s: the rewind changed its id from %s to %s", name, vmOf[name].ID, vm.ID)
			}
			if err == nil {
				vmOf[name] = vm
			}
			return err
		})
		if err == nil {
			l.verifyLive(ctx, c, vmOf[name])
			err = op("exec", func(ctx context.Context) error {
				out, err := execOK(ctx, c, name, "sh", "-c", "cat /tmp/after 2>/dev/null || echo rewound")
				if err == nil && strings.TrimSpace(out) != "rewound" {
					err = fmt.Errorf("after the rewind %s still has the later write (%q)", name, strings.TrimSpace(out))
				}
				return err
			})
		}
	}
	if err == nil {
		err = op("clone", func(ctx context.Context) error {
			vm, err := c.Clone(ctx, name, "c", clone)
			vmOf[clone] = vm
			return err
		})
		if err != nil {
			afterFailedCreate(clone)
		} else {
			l.exists(clone, 1)
			l.vmUp(1)
			made[clone] = true
			l.verifyLive(ctx, c, vmOf[clone])
		}
	}
	if err == nil {
		err = op("exec", func(ctx context.Context) error {
			out, err := execOK(ctx, c, clone, "hostname")
			if err == nil && strings.TrimSpace(out) != clone {
				err = fmt.Errorf("clone %s has hostname %q", clone, strings.TrimSpace(out))
			}
			return err
		})
	}
	if err != nil {
		cleanup()
		return false
	}
	for _, n := range []string{clone, name} {
		if e := op("destroy", func(ctx context.Context) error { _, err := c.DestroyVM(ctx, n); return err }); e != nil {
			err = e
			continue
		}
		delete(made, n)
		l.exists(n, -1)
		l.vmUp(-1)
		l.verifyGone(ctx, c, vmOf[n])
	}
	if cpID != "" && l.s.checkpointDir(cpID) != "" {
		l.anomaly("%s: its checkpoint %s is still on disk after destroy", name, cpID)
	}
	if err != nil {
		cleanup()
		return false
	}
	return true
}

// loadMemoryBudget is how many VMs of memMiB the load keeps alive at once
// when --max-vms is not given: as many as half the host's available memory
// holds (guest RAM is allocated lazily, so this is generous), but no more
// than two per client. It returns the number and where it came from.
func loadMemoryBudget(clients, memMiB int) (int, string) {
	avail := hostMemAvailableMiB()
	n := avail / 2 / max(memMiB, 1)
	why := fmt.Sprintf("half of %d MiB available", avail)
	if n > 2*clients {
		n, why = 2*clients, fmt.Sprintf("two per client; half of %d MiB available would hold %d", avail, n)
	}
	return n - n%2, why
}

// verifyLive checks, right after a create or clone returned, that the VM is
// listed under the same id, has its directory and a live VMM process.
func (l *loadRun) verifyLive(ctx context.Context, c *client.Client, vm *client.VM) {
	if vm == nil {
		return
	}
	gctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
	defer cancel()
	got, err := c.GetVM(gctx, vm.Name)
	switch {
	case err != nil:
		l.anomaly("%s: created but not found: %v", vm.Name, err)
	case got.ID != vm.ID:
		l.anomaly("%s: created as %s but listed as %s", vm.Name, vm.ID, got.ID)
	case got.State != "running":
		l.anomaly("%s: created but %s (%s)", vm.Name, got.State, got.StateReason)
	}
	if l.s.vmDir(vm.ID) == "" {
		l.anomaly("%s: created but has no directory on disk", vm.Name)
	}
	if vm.PID <= 0 || !alive(vm.PID) {
		l.anomaly("%s: created but its VMM (pid %d) is not running", vm.Name, vm.PID)
	}
}

// verifyGone checks, right after a destroy returned, that the VM is not
// listed, its directory is gone and its VMM has exited.
func (l *loadRun) verifyGone(ctx context.Context, c *client.Client, vm *client.VM) {
	if vm == nil {
		return
	}
	gctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
	defer cancel()
	if _, err := c.GetVM(gctx, vm.Name); !client.IsNotFound(err) {
		l.anomaly("%s: destroyed but GetVM answers %v", vm.Name, err)
	}
	if l.s.vmDir(vm.ID) != "" {
		l.anomaly("%s: destroyed but its directory is still on disk", vm.Name)
	}
	if vm.PID > 0 && alive(vm.PID) && isOurVMM(vm.PID, vm.ID) {
		l.anomaly("%s: destroyed but its VMM (pid %d) still runs", vm.Name, vm.PID)
	}
}

func alive(pid int) bool { return !procfs.Exited(pid) }

// isOurVMM guards against pid reuse: QEMU runs with -name noid-<id>.
func isOurVMM(pid int, id string) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	return err == nil && strings.Contains(string(b), "noid-"+id)
}

// checks compares the benchmark's model with the DB (list), the disk, the
// VMM processes and the TAPs.
func (l *loadRun) checks(ctx context.Context, tapsBefore int) []Check {
	s := l.s
	var out []Check
	vms, err := s.Client.ListAllVMs(ctx)
	if err != nil {
		return []Check{{Name: "list VMs", Detail: err.Error()}}
	}
	listed := map[string]int{}
	ids := map[string]bool{}
	running := 0
	for _, v := range vms {
		listed[v.Name]++
		ids[v.ID] = true
		if v.State == "running" {
			running++
		}
	}
	l.mu.Lock()
	var lost, extra, dup []string
	for n, k := range l.model {
		if k != 1 {
			dup = append(dup, fmt.Sprintf("%s (model %d)", n, k))
		}
		if listed[n] == 0 {
			lost = append(lost, n)
		}
	}
	for n, k := range listed {
		if k > 1 {
			dup = append(dup, fmt.Sprintf("%s listed %d times", n, k))
		}
		if l.model[n] == 0 {
			extra = append(extra, n)
		}
	}
	anom := append([]string(nil), l.anom...)
	l.mu.Unlock()
	out = append(out, Check{Name: "no VM lost", OK: len(lost) == 0, Detail: fmt.Sprintf("%d VMs expected, %d listed; lost: %v", len(l.model), len(vms), lost)})
	out = append(out, Check{Name: "no VM duplicated or unexpected", OK: len(dup) == 0 && len(extra) == 0, Detail: fmt.Sprintf("duplicated: %v; unexpected: %v", dup, extra)})
	out = append(out, Check{Name: "no anomalies during the run", OK: len(anom) == 0, Detail: fmt.Sprintf("%d (half-created VMs, wrong checkpoint lists, failed clean-ups)", len(anom))})

	// DB against disk.
	cpIDs := map[string]bool{}
	for _, v := range vms {
		ref := v.Name
		if v.Owner != "" {
			ref = v.Owner + "/" + v.Name
		}
		cps, err := s.Client.ListCheckpoints(ctx, ref)
		if err != nil {
			out = append(out, Check{Name: "list checkpoints of " + v.Name, Detail: err.Error()})
			continue
		}
		for _, c := range cps {
			cpIDs[c.ID] = true
		}
	}
	vmDirs := dirNames(filepath.Join(s.StorageDir(), "users", "*", "vms", "*"))
	cpDirs := dirNames(filepath.Join(s.StorageDir(), "users", "*", "checkpoints", "*"))
	out = append(out, Check{Name: "VM dirs on disk = VMs in the DB", OK: sameSet(vmDirs, ids), Detail: fmt.Sprintf("%d dirs, %d rows; %s", len(vmDirs), len(ids), setDiff(vmDirs, ids))})
	out = append(out, Check{Name: "checkpoint dirs on disk = checkpoints in the DB", OK: sameSet(cpDirs, cpIDs), Detail: fmt.Sprintf("%d dirs, %d rows; %s", len(cpDirs), len(cpIDs), setDiff(cpDirs, cpIDs))})
	// Warm-pool spares (prepared VMMs for the golden snapshot, not VMs) own
	// a QEMU process, run-dir sockets and a TAP each; they are expected.
	spares := dirNames(filepath.Join(s.StorageDir(), "pool", "*"))
	out = append(out, Check{Name: "warm-pool spares (expected, not VMs)", OK: true, Detail: fmt.Sprintf("%d: %v", len(spares), keys(spares))})
	// Sockets in the run dir belong to live VMs and spares only.
	socks := map[string]bool{}
	ents, _ := os.ReadDir(filepath.Join(s.DataDir, "run"))
	for _, e := range ents {
		n := e.Name()
		if i := strings.IndexByte(n, '.'); i > 0 && (strings.HasSuffix(n, ".qmp") || strings.HasSuffix(n, ".agent")) {
			socks[n[:i]] = true
		}
	}
	var stray []string
	for id := range socks {
		if !ids[id] && !spares[id] {
			stray = append(stray, id)
		}
	}
	out = append(out, Check{Name: "no stray VMM sockets in the run dir", OK: len(stray) == 0, Detail: fmt.Sprintf("stray: %v", stray)})
	// Processes.
	var procs, spareProcs []int
	for _, p := range pidsUsing(s.Dir) {
		if p == s.Pid {
			continue
		}
		if b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", p)); strings.Contains(string(b), "/pool/") {
			spareProcs = append(spareProcs, p)
			continue
		}
		procs = append(procs, p)
	}
	out = append(out, Check{Name: "QEMU processes = running VMs (+ spares)", OK: len(procs) == running && len(spareProcs) <= len(spares),
		Detail: fmt.Sprintf("%d VM processes, %d running VMs; %d spare processes, %d spares", len(procs), running, len(spareProcs), len(spares))})
	// TAPs.
	if s.Opts.Network {
		have, err := s.tapNames()
		want := map[string]bool{}
		for _, v := range vms {
			if v.Network != "none" {
				want[network.TapName(v.ID)] = true
			}
		}
		for id := range spares {
			want[network.TapName(id)] = true
		}
		var stray []string
		for t := range have {
			if !want[t] {
				stray = append(stray, t)
			}
		}
		out = append(out, Check{Name: "TAPs = networked VMs + spares", OK: err == nil && len(stray) == 0,
			Detail: fmt.Sprintf("%d TAPs (%d before the run), %d networked VMs and spares; stray: %v %v", len(have), tapsBefore, len(want), stray, errString(err))})
	}
	return out
}

// taps counts noid TAP devices in the server's network namespace.
func (s *Server) taps() (int, error) {
	m, err := s.tapNames()
	return len(m), err
}

// tapNames lists the TAP devices in the server's network namespace.
func (s *Server) tapNames() (map[string]bool, error) {
	out := map[string]bool{}
	if !s.ns.IsOpen() {
		return out, nil
	}
	h, err := netlink.NewHandleAt(s.ns)
	if err != nil {
		return out, err
	}
	defer h.Close()
	links, err := h.LinkList()
	if err != nil {
		return out, err
	}
	for _, l := range links {
		if l.Type() == "tuntap" || strings.HasPrefix(l.Attrs().Name, network.TapPrefix) {
			out[l.Attrs().Name] = true
		}
	}
	return out, nil
}

func keys(m map[string]bool) []string {
	k := make([]string, 0, len(m))
	for s := range m {
		k = append(k, s)
	}
	sort.Strings(k)
	return k
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

func dirNames(glob string) map[string]bool {
	m, _ := filepath.Glob(glob)
	out := map[string]bool{}
	for _, p := range m {
		out[filepath.Base(p)] = true
	}
	return out
}

func sameSet(a, b map[string]bool) bool {
	if len(a) != len(b) {
		return false
	}
	for k := range a {
		if !b[k] {
			return false
		}
	}
	return true
}

func setDiff(disk, db map[string]bool) string {
	var onlyDisk, onlyDB []string
	for k := range disk {
		if !db[k] {
			onlyDisk = append(onlyDisk, k)
		}
	}
	for k := range db {
		if !disk[k] {
			onlyDB = append(onlyDB, k)
		}
	}
	if len(onlyDisk)+len(onlyDB) == 0 {
		return "they match"
	}
	return fmt.Sprintf("only on disk: %v; only in DB: %v", onlyDisk, onlyDB)
}

func rssMiB(pid int) float64 {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "VmRSS:") {
			var kb int
			fmt.Sscanf(strings.TrimSpace(l[6:]), "%d", &kb)
			return float64(kb) / 1024
		}
	}
	return 0
}

var opOrder = []string{"create", "exec", "checkpoint", "rewind", "clone", "destroy", "list"}

func (b *Bench) printLoad(r *LoadReport) {
	w := b.out
	net := "on (TAP per VM, in a network namespace)"
	if !r.Network {
		net = "off"
	}
	fmt.Fprintf(w, "  %d clients of %d users for %.0f s; creates from %s; %d MiB VMs; at most %d VMs alive (%s; peak %d); network %s\n",
		r.Clients, r.Users, r.Seconds, r.CreatePath, r.MemoryMiB, r.MaxLiveVMs, r.MaxLiveWhy, r.PeakLiveVMs, net)
	poll := fmt.Sprintf("clients waiting for a VM slot list VMs every %.0f ms", r.PollMs)
	if r.PollMs <= 0 {
		poll = "clients waiting for a VM slot just wait"
	}
	fmt.Fprintf(w, "  %s\n", poll)
	fmt.Fprintf(w, "  cycles: %d ok, %d failed (%.1f per minute); %.1f API operations per second; noid-server used %.0f%% of one core\n",
		r.CyclesOK, r.CyclesFailed, r.CyclesPerMin, r.OpsPerSecond, r.ServerCPUPct)
	fmt.Fprintf(w, "  %-11s %6s %6s %9s %9s %9s %9s\n", "operation", "ok", "errors", "ops/s", "p50 ms", "p99 ms", "max ms")
	keys := append([]string(nil), opOrder...)
	for k := range r.Ops {
		if !contains(keys, k) {
			keys = append(keys, k)
		}
	}
	for _, k := range keys {
		o := r.Ops[k]
		if o == nil {
			continue
		}
		fmt.Fprintf(w, "  %-11s %6d %6d %9.2f %9s %9s %9s\n", k, o.OK, o.Errors, float64(o.OK)/r.Seconds, fmtNum(o.Ms.P50), fmtNum(o.Ms.P99), fmtNum(o.Ms.Max))
	}
	fmt.Fprintf(w, "  server: fds %d → %d, OS threads %d → %d (the Go runtime keeps idle threads; goroutines are not visible from outside), RSS %.0f → %.0f MiB\n",
		r.ServerFDs[0], r.ServerFDs[1], r.ServerThreads[0], r.ServerThreads[1], r.ServerRSSMiB[0], r.ServerRSSMiB[1])
	fmt.Fprintf(w, "  checks:\n")
	for _, c := range r.Checks {
		st := "ok  "
		if !c.OK {
			st = "FAIL"
		}
		fmt.Fprintf(w, "    %s %-46s %s\n", st, c.Name, c.Detail)
	}
	if len(r.SampleErrors) > 0 {
		sort.Strings(r.SampleErrors)
		fmt.Fprintf(w, "  sample errors and anomalies:\n")
		for _, e := range r.SampleErrors {
			fmt.Fprintf(w, "    %s\n", firstLine(e))
		}
	}
	fmt.Fprintf(w, "  load average %.2f → %.2f\n", r.LoadAvgStart[0], r.LoadAvgEnd[0])
}

func firstLine(s string) string {
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		return s[:i] + " …"
	}
	return s
}

// hostMemAvailableMiB reads MemAvailable from the host's /proc/meminfo, in
// MiB (0 if it cannot).
func hostMemAvailableMiB() int {
	return max(procfs.MeminfoMiB("MemAvailable"), 0)
}
