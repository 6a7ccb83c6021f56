// Package chaos drives a real noid-server with concurrent clients while it
// injects faults at random moments (SIGKILL of the server, then a restart on
// the same data dir; SIGKILL of a VMM), and after every fault and at the end
// checks the invariants noid promises (issue 16): every running VM has a
// live VMM and answers exec, no VMM runs that the server does not know, no
// VM is left paused or half-way, every listed checkpoint restores, no
// partial checkpoint or temporary file is left, every acknowledged write
// survives a rewind, and no cgroup, uid lease or loop device leaks.
//
// Every random choice comes from one seeded RNG (the seed is printed;
// Options.Seed replays the same choices, though not the same timing).
// cmd/noid-chaos is the command; test/e2e runs a bounded form.
package chaos

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	mrand "math/rand"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vishvananda/netns"

	"github.com/noid-vm/noid/internal/image"
	"github.com/noid-vm/noid/internal/network"
	"github.com/noid-vm/noid/internal/storage"
)

// Options configure a chaos run.
type Options struct {
	// Seed seeds every random choice; 0 picks one (printed either way).
	Seed int64
	// ServerKills is how many times noid-server is killed and restarted.
	ServerKills int
	// VMMKills is how many times a random VMM process is killed.
	VMMKills int
	// DiskFulls is how many full-disk phases run (diskPhase).
	DiskFulls int
	// Hostiles is how many hostile-guest phases run (hostilePhase).
	Hostiles int
	// HostileSeconds is how long each hostile mode runs (default 20).
	HostileSeconds int
	// HostileModes are the modes a hostile phase runs (default all of
	// HostileModes).
	HostileModes []string
	// GuestTool is a static noid-chaos binary, copied into a VM by the
	// hostile phase (required when Hostiles > 0).
	GuestTool string
	// DiskSize is the size of the run's own filesystem holding the data
	// dir (default 3 GiB, sparse); DiskFS is its type, ext4 (default) or
	// xfs.
	DiskSize int64
	DiskFS   string
	// Network runs the server with networking on, in a network namespace
	// of the run's own: VMs get TAPs and addresses, and the checks count
	// TAPs and look for shared addresses.
	Network bool
	// Clients is the number of concurrent clients (default 2).
	Clients int
	// MaxGap is the longest random wait between faults (default 6s); the
	// shortest is a tenth of it.
	MaxGap time.Duration
	// SampleEvery restores a sample (a clone of a listed checkpoint and a
	// rewind to an acknowledged write) after every SampleEvery-th fault
	// and at the end (default 1: after every fault). The other invariants
	// are checked after every fault.
	SampleEvery int
	// ServerBin is the noid-server binary.
	ServerBin string
	// Image is the guest image (the tiny one).
	Image *image.Image
	// TempDir holds the run's data dir ("" is os.TempDir()).
	TempDir string
	// Keep leaves the data dir in place at the end.
	Keep bool
	// ServerLog, when set, receives the server's whole log (across its
	// restarts).
	ServerLog string
	// Out receives the progress, the invariant reports and the summary.
	Out io.Writer
	// Verbose also prints every failed client operation (expected around
	// faults).
	Verbose bool
}

// Result is what a run did.
type Result struct {
	Seed                  int64
	ServerKills, VMMKills int
	// DiskFulls and Hostiles count the phases that ran.
	DiskFulls, Hostiles int
	Checks              int
	Duration            time.Duration
	// Ops counts successful operations by name; Failed the failed ones.
	Ops, Failed map[string]int
	// Violations are the broken invariants (empty when the run passed).
	Violations []string
	// History is every fault injected, in order.
	History []string
}

// ErrViolated is returned (wrapped) when an invariant broke.
var ErrViolated = errors.New("chaos: invariants violated")

type runner struct {
	o    Options
	rng  *mrand.Rand
	srv  *server
	disk *disk
	led  *ledger
	// pw does the phases' acknowledged writes (worker -1).
	pw   *worker
	gate sync.RWMutex // workers hold it shared per operation; checks hold it exclusively
	// held stops workers from starting operations (from just before a
	// fault until its check is done), so a check waits only for the
	// operations the fault hit.
	held   bool
	heldMu sync.Mutex
	resume *sync.Cond
	start  time.Time
	// tmp holds the clients' local files (for cp).
	tmp string

	mu         sync.Mutex
	violations []string
	history    []string
	checkSeq   int
	seen       map[string]bool // problems reported so far
	cloneSeq   int
}

// since is the run's age in seconds.
func (r *runner) since() float64 { return time.Since(r.start).Seconds() }

func (r *runner) logf(format string, args ...any) {
	line := fmt.Sprintf("[%7.1fs] ", time.Since(r.start).Seconds()) + fmt.Sprintf(format, args...)
	if strings.HasPrefix(format, "worker ") && !r.o.Verbose {
		return
	}
	fmt.Fprintln(r.o.Out, line)
}

// violate records a broken invariant.
func (r *runner) violate(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	r.mu.Lock()
	r.violations = append(r.violations, msg)
	r.mu.Unlock()
	r.logf("VIOLATION: %s", msg)
}

// Run performs a chaos run and returns what it did. The error wraps
// ErrViolated when an invariant broke, with the seed and fault history in
// the Result; other errors mean the run itself could not proceed.
func Run(ctx context.Context, o Options) (*Result, error) {
	if o.Seed == 0 {
		var b [8]byte
		rand.Read(b[:])
		o.Seed = int64(b[0])<<48 | int64(b[1])<<40 | int64(b[2])<<32 | int64(b[3])<<24 | int64(b[4])<<16 | int64(b[5])<<8 | int64(b[6])
	}
	if o.Clients <= 0 {
		o.Clients = 2
	}
	if o.MaxGap <= 0 {
		o.MaxGap = 6 * time.Second
	}
	if o.SampleEvery <= 0 {
		o.SampleEvery = 1
	}
	if o.Out == nil {
		o.Out = io.Discard
	}
	if o.HostileSeconds <= 0 {
		o.HostileSeconds = 20
	}
	if len(o.HostileModes) == 0 {
		o.HostileModes = HostileModes
	}
	if o.DiskSize <= 0 {
		o.DiskSize = 3 << 30
	}
	if o.DiskFS == "" {
		o.DiskFS = "ext4"
	}
	if o.ServerBin == "" || o.Image == nil {
		return nil, fmt.Errorf("chaos run: the server binary and the image are required")
	}
	if o.Hostiles > 0 {
		if err := checkGuestTool(o.GuestTool); err != nil {
			return nil, fmt.Errorf("chaos run: %w", err)
		}
	}
	r := &runner{o: o, rng: mrand.New(mrand.NewSource(o.Seed)), led: &ledger{vms: map[string]*vmRec{}}, start: time.Now(), seen: map[string]bool{}}
	r.resume = sync.NewCond(&r.heldMu)
	res := &Result{Seed: o.Seed, Ops: map[string]int{}, Failed: map[string]int{}}
	fmt.Fprintf(o.Out, "noid-chaos: seed %d (replay with --seed %d): %d server kills, %d VMM kills, %d full-disk and %d hostile-guest phases, %d clients, networking %v\n",
		o.Seed, o.Seed, o.ServerKills, o.VMMKills, o.DiskFulls, o.Hostiles, o.Clients, o.Network)

	dir, err := os.MkdirTemp(o.TempDir, "noid-chaos-")
	if err != nil {
		return nil, fmt.Errorf("chaos run: %w", err)
	}
	// The run's own copy of the image: a test elsewhere may replace the
	// shared one (another agent), which would make goldens stale mid-run.
	if o.Image, err = pinImage(ctx, o.Image, filepath.Join(dir, "image")); err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("chaos run: %w", err)
	}
	var tagb [4]byte
	rand.Read(tagb[:])
	tag := hex.EncodeToString(tagb[:])
	// A uid range of its own, away from the default one other servers use.
	uidBase := int64(2_100_000_000) + int64(r.rng.Intn(400))*4096
	r.disk, err = setupDisk(ctx, dir, o.DiskFS, o.DiskSize)
	if err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("chaos run: %w", err)
	}
	ns := netns.None()
	if o.Network {
		if ns, err = network.NewNamespace(); err != nil {
			r.disk.teardown()
			os.RemoveAll(dir)
			return nil, fmt.Errorf("chaos run: %w", err)
		}
	}
	srv, err := newServer(dir, filepath.Join(r.disk.mnt, "data"), o.ServerBin, o.Image, tag, uidBase, ns)
	if err != nil {
		if ns.IsOpen() {
			ns.Close()
		}
		r.disk.teardown()
		os.RemoveAll(dir)
		return nil, err
	}
	r.srv = srv
	if o.ServerLog != "" {
		if srv.logFile, err = os.Create(o.ServerLog); err != nil {
			return nil, fmt.Errorf("chaos run: %w", err)
		}
		defer srv.logFile.Close()
	}
	r.tmp = filepath.Join(dir, "files")
	if err := os.Mkdir(r.tmp, 0o700); err != nil {
		return nil, fmt.Errorf("chaos run: %w", err)
	}
	r.pw = &worker{id: -1, rng: mrand.New(mrand.NewSource(o.Seed - 1)), c: srv.client, led: r.led, run: r,
		stats: map[string]int{}, fails: map[string]int{}}
	defer r.cleanup(dir)
	if err := srv.start(ctx); err != nil {
		return nil, err
	}
	r.logf("noid-server %d on %s (%s, %d MiB, loop-mounted), networking %v", srv.pid(), srv.dataDir, o.DiskFS, o.DiskSize>>20, o.Network)

	wctx, stopWorkers := context.WithCancel(ctx)
	var wg sync.WaitGroup
	workers := make([]*worker, o.Clients)
	for i := range workers {
		w := &worker{id: i, rng: mrand.New(mrand.NewSource(o.Seed + int64(i) + 1)), c: srv.client, led: r.led, run: r,
			stats: map[string]int{}, fails: map[string]int{}}
		workers[i] = w
		wg.Add(1)
		go func() { defer wg.Done(); w.loop(wctx) }()
	}

	faults := make([]string, 0, o.ServerKills+o.VMMKills+o.DiskFulls+o.Hostiles)
	for kind, n := range map[string]int{"server": o.ServerKills, "vmm": o.VMMKills, "disk": o.DiskFulls, "hostile": o.Hostiles} {
		for i := 0; i < n; i++ {
			faults = append(faults, kind)
		}
	}
	sort.Strings(faults) // map order is random; the seed decides the order
	r.rng.Shuffle(len(faults), func(i, j int) { faults[i], faults[j] = faults[j], faults[i] })
	var runErr error
	for i, f := range faults {
		// Faults should hit operations on VMs, not only creates: under
		// TCG a cold create takes longer than most gaps.
		r.waitForVMs(ctx, o.Clients, 3*time.Minute)
		if f == "disk" || f == "hostile" {
			// The phases need a VM with an acknowledged checkpoint.
			r.waitForAcks(ctx, 3*time.Minute)
		}
		gap := o.MaxGap/10 + time.Duration(r.rng.Int63n(int64(o.MaxGap-o.MaxGap/10)))
		select {
		case <-time.After(gap):
		case <-ctx.Done():
			runErr = ctx.Err()
		}
		if runErr != nil {
			break
		}
		r.hold(true)
		if err := r.inject(ctx, i+1, f, res); err != nil {
			runErr = err
			break
		}
		r.check(ctx, fmt.Sprintf("after fault %d (%s)", i+1, f), (i+1)%o.SampleEvery == 0)
		res.Checks++
		r.hold(false)
	}
	stopWorkers()
	r.hold(false)
	wg.Wait()
	if runErr == nil {
		r.check(ctx, "at the end", true)
		res.Checks++
		r.finalCheck(ctx)
	}
	for _, w := range append(workers, r.pw) {
		for k, v := range w.stats {
			res.Ops[k] += v
		}
		for k, v := range w.fails {
			res.Failed[k] += v
		}
	}
	res.Duration = time.Since(r.start)
	r.mu.Lock()
	res.Violations = append([]string(nil), r.violations...)
	res.History = append([]string(nil), r.history...)
	r.mu.Unlock()
	r.summary(res)
	if runErr != nil {
		return res, fmt.Errorf("chaos run (seed %d) stopped: %w", o.Seed, runErr)
	}
	if len(res.Violations) > 0 {
		return res, fmt.Errorf("%w: %d (seed %d)", ErrViolated, len(res.Violations), o.Seed)
	}
	return res, nil
}

// waitForVMs waits (at most d) until each of n workers has a VM.
func (r *runner) waitForVMs(ctx context.Context, n int, d time.Duration) {
	deadline := time.Now().Add(d)
	for ctx.Err() == nil && time.Now().Before(deadline) {
		have := 0
		for w := 0; w < n; w++ {
			if len(r.led.owned(w)) > 0 {
				have++
			}
		}
		if have == n {
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// waitForAcks waits (at most d) until a VM has an acknowledged write.
func (r *runner) waitForAcks(ctx context.Context, d time.Duration) {
	deadline := time.Now().Add(d)
	for ctx.Err() == nil && time.Now().Before(deadline) {
		r.led.mu.Lock()
		n := 0
		for _, v := range r.led.vms {
			n += len(v.acks)
		}
		r.led.mu.Unlock()
		if n > 0 {
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// hold stops (or lets again) the workers start new operations.
func (r *runner) hold(on bool) {
	r.heldMu.Lock()
	r.held = on
	r.heldMu.Unlock()
	if !on {
		r.resume.Broadcast()
	}
}

// waitHeld blocks while the workers are held.
func (r *runner) waitHeld() {
	r.heldMu.Lock()
	for r.held {
		r.resume.Wait()
	}
	r.heldMu.Unlock()
}

// inject performs fault n of kind "server", "vmm", "disk" (diskPhase) or
// "hostile" (hostilePhase).
func (r *runner) inject(ctx context.Context, n int, kind string, res *Result) error {
	switch kind {
	case "disk":
		if r.diskPhase(ctx, n) {
			res.DiskFulls++
		}
	case "hostile":
		if r.hostilePhase(ctx, n) {
			res.Hostiles++
		}
	case "server":
		pid := r.srv.pid()
		if err := r.srv.kill(); err != nil {
			return err
		}
		t0 := time.Now()
		if err := r.srv.start(ctx); err != nil {
			return fmt.Errorf("restarting noid-server after kill %d: %w", n, err)
		}
		res.ServerKills++
		r.record(fmt.Sprintf("fault %d at %.1fs: SIGKILL noid-server %d; restarted as %d in %.1fs", n, time.Since(r.start).Seconds(), pid, r.srv.pid(), time.Since(t0).Seconds()))
	case "vmm":
		pids := r.srv.vmmPids()
		if len(pids) == 0 {
			r.record(fmt.Sprintf("fault %d at %.1fs: no VMM running, nothing killed", n, time.Since(r.start).Seconds()))
			return nil
		}
		sort.Ints(pids)
		pid := pids[r.rng.Intn(len(pids))]
		syscall.Kill(pid, syscall.SIGKILL)
		res.VMMKills++
		r.record(fmt.Sprintf("fault %d at %.1fs: SIGKILL VMM %d (%s)", n, time.Since(r.start).Seconds(), pid, vmmName(pid)))
	}
	return nil
}

func (r *runner) record(s string) {
	r.mu.Lock()
	r.history = append(r.history, s)
	r.mu.Unlock()
	r.logf("%s", s)
}

// vmmName is the -name argument of a QEMU process (noid-<runtime id>,...).
func vmmName(pid int) string {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	args := strings.Split(string(b), "\x00")
	for i, a := range args {
		if a == "-name" && i+1 < len(args) {
			return args[i+1]
		}
	}
	return "?"
}

func (r *runner) summary(res *Result) {
	out := r.o.Out
	fmt.Fprintf(out, "\nnoid-chaos summary: seed %d, %s\n", res.Seed, res.Duration.Round(time.Second))
	fmt.Fprintf(out, "  faults: %d server kills, %d VMM kills, %d full-disk phases, %d hostile-guest phases; %d invariant checks\n",
		res.ServerKills, res.VMMKills, res.DiskFulls, res.Hostiles, res.Checks)
	fmt.Fprintf(out, "  operations ok: %s\n", fmtCounts(res.Ops))
	fmt.Fprintf(out, "  operations failed (around faults): %s\n", fmtCounts(res.Failed))
	if len(res.Violations) == 0 {
		fmt.Fprintf(out, "  invariants: all held\n")
		return
	}
	fmt.Fprintf(out, "  invariants: %d VIOLATED\n", len(res.Violations))
	for _, v := range res.Violations {
		fmt.Fprintf(out, "    - %s\n", v)
	}
	fmt.Fprintf(out, "  fault history:\n")
	for _, h := range res.History {
		fmt.Fprintf(out, "    %s\n", h)
	}
	fmt.Fprintf(out, "  server log (tail):\n%s\n", r.srv.logTail(60))
}

func fmtCounts(m map[string]int) string {
	var keys []string
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var parts []string
	for _, k := range keys {
		parts = append(parts, fmt.Sprintf("%s %d", k, m[k]))
	}
	if len(parts) == 0 {
		return "none"
	}
	return strings.Join(parts, ", ")
}

// pinImage links (or copies) the kernel, initramfs and rootfs of img into
// dir and returns the image that names them.
func pinImage(ctx context.Context, img *image.Image, dir string) (*image.Image, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	pinned := *img
	pinned.Dir = dir
	for _, f := range []*string{&pinned.Kernel, &pinned.Initrd, &pinned.Rootfs} {
		dst := filepath.Join(dir, filepath.Base(*f))
		if err := os.Link(*f, dst); err != nil {
			if err := (&storage.Copier{}).CopyFile(ctx, *f, dst); err != nil {
				return nil, fmt.Errorf("pinning the image file %s: %w", *f, err)
			}
		}
		*f = dst
	}
	return &pinned, nil
}
