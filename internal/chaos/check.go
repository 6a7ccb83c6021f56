package chaos

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/noid-vm/noid/client"
	"github.com/noid-vm/noid/internal/sandbox"
)

// settleTimeout is how long the state may take to settle after a fault
// (the server noticing a killed VMM) before a broken invariant counts.
const settleTimeout = 90 * time.Second

// check holds the workers, then checks every invariant: the passive ones
// are polled until they hold or settleTimeout passes; then a sample of
// checkpoints is restored and an acknowledged write is rewound to, when
// sample is set.
func (r *runner) check(ctx context.Context, when string, sample bool) {
	r.gate.Lock()
	defer r.gate.Unlock()
	t0 := time.Now()
	var problems []string
	deadline := time.Now().Add(settleTimeout)
	for {
		// A problem reported by an earlier check (a leak that stays) is
		// reported again but not waited for.
		problems = r.inspect(ctx)
		if len(r.fresh(problems)) == 0 || time.Now().After(deadline) || ctx.Err() != nil {
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	r.mu.Lock()
	for _, p := range problems {
		r.seen[p] = true
	}
	r.mu.Unlock()
	for _, p := range problems {
		r.violate("%s: %s", when, p)
	}
	tInspect := time.Since(t0)
	if sample {
		r.sampleRestores(ctx, when)
	}
	r.mu.Lock()
	r.checkSeq++
	n := r.checkSeq
	r.mu.Unlock()
	state := "held"
	if len(problems) > 0 {
		state = fmt.Sprintf("%d violated", len(problems))
	}
	r.logf("check %d %s: invariants %s (%s; %.1fs, of which inspecting %.1fs)", n, when, state, r.census(ctx), time.Since(t0).Seconds(), tInspect.Seconds())
}

// fresh is the problems no earlier check reported.
func (r *runner) fresh(problems []string) []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []string
	for _, p := range problems {
		if !r.seen[p] {
			out = append(out, p)
		}
	}
	return out
}

// census is a one-line count of the VMs and checkpoints.
func (r *runner) census(ctx context.Context) string {
	vms, err := r.srv.client.ListVMs(ctx)
	if err != nil {
		return "listing failed: " + err.Error()
	}
	states := map[string]int{}
	cps := 0
	for _, v := range vms {
		states[v.State]++
		cps += v.Checkpoints
	}
	return fmt.Sprintf("%d VMs (%s), %d checkpoints, %d VMMs, %d MiB free", len(vms), fmtCounts(states), cps, len(r.srv.vmmPids()), r.disk.avail()>>20)
}

// inspect checks the invariants that only look (and exec `true`), and
// brings the ledger in line with the server's list. It returns what is
// wrong.
func (r *runner) inspect(ctx context.Context) []string {
	c := r.srv.client
	lctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	vms, err := c.ListVMs(lctx)
	if err != nil {
		return []string{"listing VMs: " + err.Error()}
	}
	var bad []string
	byName := map[string]*client.VM{}
	vmIDs := map[string]bool{}
	runtimeIDs := map[string]bool{} // of running VMs
	pids := map[int]string{}
	cpIDs := map[string]bool{}
	cpsOf := map[string]map[string]bool{}
	for _, v := range vms {
		byName[v.Name] = v
		vmIDs[v.ID] = true
		// Each listing gets its own minute: an exec below may take one.
		cctx, ccancel := context.WithTimeout(ctx, time.Minute)
		cps, err := c.ListCheckpoints(cctx, v.Name)
		ccancel()
		if err != nil {
			bad = append(bad, fmt.Sprintf("listing checkpoints of %s: %v", v.Name, err))
		}
		cpsOf[v.Name] = map[string]bool{}
		for _, cp := range cps {
			cpIDs[cp.ID] = true
			cpsOf[v.Name][cp.ID] = true
		}
		switch v.State {
		case "dead":
			continue
		case "running":
		default:
			bad = append(bad, fmt.Sprintf("VM %s stays %s (%s)", v.Name, v.State, v.StateReason))
			continue
		}
		runtimeIDs[v.RuntimeID] = true
		runtimeIDs[v.ID] = true
		pids[v.PID] = v.Name
		if v.PID <= 0 || !alive(v.PID) {
			bad = append(bad, fmt.Sprintf("VM %s is listed running with pid %d, which does not run", v.Name, v.PID))
			continue
		}
		if out, err := execOut(ctx, c, v.Name, "echo", "ok"); err != nil || strings.TrimSpace(out) != "ok" {
			bad = append(bad, fmt.Sprintf("VM %s is listed running but does not answer exec (paused or hung?): %v", v.Name, err))
		}
	}
	for _, pid := range r.srv.vmmPids() {
		if _, ok := pids[pid]; !ok {
			bad = append(bad, fmt.Sprintf("VMM process %d (%s) runs from the data dir but no running VM has it", pid, vmmName(pid)))
		}
	}
	bad = append(bad, r.checkFiles(cpIDs, vmIDs)...)
	bad = append(bad, r.checkLeases(runtimeIDs)...)
	bad = append(bad, r.checkCgroups(runtimeIDs)...)
	bad = append(bad, r.checkLoops()...)
	bad = append(bad, r.checkNetwork(vms)...)
	bad = append(bad, r.syncLedger(byName, cpsOf)...)
	return bad
}

// checkNetwork (networking on) finds TAP devices in the run's namespace
// that no listed VM has, running VMs without a TAP or address, and
// addresses, MACs or TAPs two VMs share.
func (r *runner) checkNetwork(vms []*client.VM) []string {
	if !r.srv.ns.IsOpen() {
		return nil
	}
	var bad []string
	owner := map[string]string{}
	for _, v := range vms {
		if v.State == "running" && (v.Tap == "" || v.IP == "") {
			bad = append(bad, fmt.Sprintf("VM %s runs without a TAP or address (tap %q, ip %q)", v.Name, v.Tap, v.IP))
		}
		for _, id := range []string{"tap " + v.Tap, "ip " + v.IP, "mac " + v.MAC} {
			if strings.HasSuffix(id, " ") {
				continue
			}
			if o, ok := owner[id]; ok {
				bad = append(bad, fmt.Sprintf("VMs %s and %s share %s", o, v.Name, id))
			}
			owner[id] = v.Name
		}
	}
	taps, err := r.taps()
	if err != nil {
		return append(bad, err.Error())
	}
	for _, t := range taps {
		if _, ok := owner["tap "+t]; !ok {
			bad = append(bad, "TAP "+t+" is left in the run's namespace with no VM")
		}
	}
	return bad
}

// taps lists the TAP devices in the run's network namespace.
func (r *runner) taps() ([]string, error) {
	h, err := netlink.NewHandleAt(r.srv.ns)
	if err != nil {
		return nil, fmt.Errorf("netlink in the run's namespace: %w", err)
	}
	defer h.Close()
	links, err := h.LinkList()
	if err != nil {
		return nil, fmt.Errorf("listing links in the run's namespace: %w", err)
	}
	var out []string
	for _, l := range links {
		if l.Type() == "tuntap" {
			out = append(out, l.Attrs().Name)
		}
	}
	return out, nil
}

// checkFiles finds checkpoint and VM directories the server does not list
// and temporary files anywhere in the data dir.
func (r *runner) checkFiles(cpIDs, vmIDs map[string]bool) []string {
	var bad []string
	for _, root := range []string{r.srv.dataDir, filepath.Join(r.srv.dataDir, "reflink")} {
		cps, _ := filepath.Glob(filepath.Join(root, "users", "*", "checkpoints", "*"))
		for _, p := range cps {
			if !cpIDs[filepath.Base(p)] {
				bad = append(bad, "checkpoint directory "+p+" is not a listed checkpoint (partial or orphaned)")
			}
		}
		vds, _ := filepath.Glob(filepath.Join(root, "users", "*", "vms", "*"))
		for _, p := range vds {
			if !vmIDs[filepath.Base(p)] {
				bad = append(bad, "VM directory "+p+" is not a listed VM's")
			}
		}
	}
	filepath.WalkDir(r.srv.dataDir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return nil
		}
		n := d.Name()
		if strings.Contains(n, ".tmp-") || strings.HasPrefix(n, ".noid-probe-") || strings.HasPrefix(n, ".chown-probe-") {
			bad = append(bad, "temporary file left: "+p)
			if d.IsDir() {
				return fs.SkipDir
			}
		}
		return nil
	})
	return bad
}

// checkLeases finds uid leases of VMMs that do not run.
func (r *runner) checkLeases(running map[string]bool) []string {
	var bad []string
	dir := filepath.Join(r.srv.dataDir, "sandbox", "uids")
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), ".") {
			continue // temporary files are reported by checkFiles
		}
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			continue
		}
		l, err := sandbox.ParseLease(b)
		if err != nil {
			bad = append(bad, fmt.Sprintf("uid lease %s is malformed: %v", e.Name(), err))
			continue
		}
		if !running[l.ID] {
			bad = append(bad, fmt.Sprintf("uid lease %s is held for %s, which runs no VMM", e.Name(), l.ID))
		}
	}
	return bad
}

// cgroupDirs lists the VMM cgroups under the run's private parent in every
// hierarchy (v1 and v2).
func (r *runner) cgroupDirs() []string {
	var out []string
	for _, pat := range []string{filepath.Join("/sys/fs/cgroup", "*", r.srv.cgroup, "*"), filepath.Join("/sys/fs/cgroup", r.srv.cgroup, "*")} {
		ms, _ := filepath.Glob(pat)
		for _, m := range ms {
			if fi, err := os.Stat(m); err == nil && fi.IsDir() {
				out = append(out, m)
			}
		}
	}
	return out
}

// checkCgroups finds VMM cgroups of VMMs that do not run.
func (r *runner) checkCgroups(running map[string]bool) []string {
	var bad []string
	for _, d := range r.cgroupDirs() {
		if !running[filepath.Base(d)] {
			bad = append(bad, "cgroup "+d+" is left for a VMM that does not run")
		}
	}
	return bad
}

// checkLoops finds loop devices backed by a file of the run's directory
// other than the run's own data disk while it is mounted (the server makes
// no loop mounts in this configuration, so any other is a leak).
func (r *runner) checkLoops() []string {
	var bad []string
	ms, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	for _, m := range ms {
		b, err := os.ReadFile(m)
		f := strings.TrimSpace(string(b))
		if r.disk != nil && f == r.disk.image && r.disk.mounted() {
			continue
		}
		if err == nil && strings.HasPrefix(f, r.srv.dir+"/") {
			bad = append(bad, fmt.Sprintf("loop device %s is backed by %s", filepath.Base(filepath.Dir(filepath.Dir(m))), strings.TrimSpace(string(b))))
		}
	}
	return bad
}

// syncLedger compares the acknowledged VMs and writes with the server's
// list: an acknowledged VM that was not destroyed must still be listed,
// with every acknowledged checkpoint. VMs whose create or clone completed
// unacknowledged (a fault cut the answer) join their worker's set.
func (r *runner) syncLedger(byName map[string]*client.VM, cpsOf map[string]map[string]bool) []string {
	var bad []string
	l := r.led
	l.mu.Lock()
	defer l.mu.Unlock()
	for name, rec := range l.vms {
		if _, ok := byName[name]; !ok {
			if !rec.destroying {
				bad = append(bad, fmt.Sprintf("VM %s (created and acknowledged, never destroyed) is no longer listed", name))
			}
			delete(l.vms, name)
			continue
		}
		rec.destroying = false // a destroy that never reached the server
		for _, a := range rec.acks {
			if !cpsOf[name][a.checkpoint] {
				bad = append(bad, fmt.Sprintf("checkpoint %s of VM %s (acknowledged, holding %s) is no longer listed", a.checkpoint, name, a.path))
			}
		}
	}
	for name := range byName {
		if l.vms[name] != nil {
			continue
		}
		if w, ok := workerOf(name); ok {
			l.vms[name] = &vmRec{worker: w}
		}
	}
	return bad
}

// workerOf parses the worker of a VM name "w<worker>-<n>" or "c<worker>-<n>".
func workerOf(name string) (int, bool) {
	if len(name) < 2 || (name[0] != 'w' && name[0] != 'c') {
		return 0, false
	}
	num, _, ok := strings.Cut(name[1:], "-")
	if !ok {
		return 0, false
	}
	w, err := strconv.Atoi(num)
	return w, err == nil
}

// sampleRestores clones a random listed checkpoint (checking the
// acknowledged write it holds, if any) and destroys the clone, then
// rewinds one VM to a random acknowledged write's checkpoint and checks
// the file. Clones an earlier check left are destroyed.
func (r *runner) sampleRestores(ctx context.Context, when string) {
	c := r.srv.client
	vms, err := c.ListVMs(ctx)
	if err != nil {
		r.violate("%s: listing VMs: %v", when, err)
		return
	}
	type cpRef struct{ vm, id string }
	var all []cpRef
	for _, v := range vms {
		if strings.HasPrefix(v.Name, "k-") {
			if _, err := c.DestroyVM(ctx, v.Name); err != nil {
				r.violate("%s: destroying the check's clone %s: %v", when, v.Name, err)
			}
			continue
		}
		cps, err := c.ListCheckpoints(ctx, v.Name)
		if err != nil {
			continue
		}
		for _, cp := range cps {
			all = append(all, cpRef{v.Name, cp.ID})
		}
	}
	acked := map[string]ack{}
	r.led.mu.Lock()
	var acks []ack
	names := make([]string, 0, len(r.led.vms))
	for n := range r.led.vms {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		for _, a := range r.led.vms[n].acks {
			acked[a.checkpoint] = a
			acks = append(acks, a)
		}
	}
	r.led.mu.Unlock()
	if len(all) > 0 {
		cp := all[r.rng.Intn(len(all))]
		if a, ok := acked[cp.id]; ok {
			r.sampleClone(ctx, when, a)
		} else {
			r.sampleClone(ctx, when, ack{vm: cp.vm, checkpoint: cp.id})
		}
	}
	r.sampleGolden(ctx, when)
	if len(acks) == 0 {
		return
	}
	a := acks[r.rng.Intn(len(acks))]
	rctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	_, err = c.Restore(rctx, a.vm, a.checkpoint)
	cancel()
	if err != nil {
		r.violate("%s: rewinding %s to checkpoint %s (acknowledged write %s) failed: %v", when, a.vm, a.checkpoint, a.path, err)
		return
	}
	r.checkAck(ctx, a.vm, a, when+", after the check's rewind")
}

// checkName is a new name for a VM the checks make (k-N; each check
// destroys the ones an earlier one left).
func (r *runner) checkName() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.cloneSeq++
	return fmt.Sprintf("k-%d", r.cloneSeq)
}

// sampleClone clones a's checkpoint, checks a's write in the clone (or
// that it answers exec, for a checkpoint without one: a.path empty) and
// destroys it; any failure is a violation.
func (r *runner) sampleClone(ctx context.Context, when string, a ack) {
	c := r.srv.client
	name := r.checkName()
	cctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	_, err := c.Clone(cctx, a.vm, a.checkpoint, name)
	cancel()
	if err != nil {
		r.violate("%s: listed checkpoint %s of VM %s does not restore (clone as %s): %v", when, a.checkpoint, a.vm, name, err)
		return
	}
	r.checkNew(ctx, when+", in a check's clone", name, a)
}

// checkNew checks a's write in the check's new VM name (or that it
// answers exec when a.path is empty) and destroys it.
func (r *runner) checkNew(ctx context.Context, how, name string, a ack) {
	c := r.srv.client
	if a.path != "" {
		r.checkAck(ctx, name, a, how)
	} else if _, err := execOut(ctx, c, name, "true"); err != nil {
		r.violate("%s: %s does not answer exec: %v", how, name, err)
	}
	dctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	if _, err := c.DestroyVM(dctx, name); err != nil {
		r.violate("%s: destroying the check's VM %s: %v", how, name, err)
	}
	cancel()
}

// sampleGolden creates a VM when a golden snapshot was promoted: it must
// start from the golden and, when the run knows which acknowledged write
// the golden holds (the last promote answered), show it.
func (r *runner) sampleGolden(ctx context.Context, when string) {
	g, known, any := r.led.goldenState()
	if !any {
		return
	}
	name := r.checkName()
	cctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	v, err := r.srv.client.CreateVM(cctx, client.CreateVMRequest{Name: name})
	cancel()
	if err != nil {
		r.violate("%s: creating %s after a golden promote: %v", when, name, err)
		return
	}
	how := when + ", in a VM created from the golden snapshot"
	switch {
	case v.BootPath != "golden" && known:
		r.violate("%s: %s was created by a %s boot (%s), not from the promoted golden snapshot", when, name, v.BootPath, v.BootReason)
		g = ack{}
	case !known:
		// A promote whose answer was lost: the golden is either one.
		g = ack{}
	}
	r.checkNew(ctx, how, name, g)
}

// checkAck verifies a's file in vm with nothing else in flight: any
// failure is a violation.
func (r *runner) checkAck(ctx context.Context, vm string, a ack, how string) {
	if err := r.verifyAck(ctx, vm, a, how); err != nil && !errors.Is(err, errLost) {
		r.violate("%s: reading acknowledged write %s in %s: %v", how, a.path, vm, err)
	}
}

// errLost marks an acknowledged write found missing or changed (already
// reported as a violation).
var errLost = errors.New("acknowledged write lost")

// verifyAck reads a's file in vm. A missing file or other content is a
// violation (the VM answered); a transport error is returned as it is.
func (r *runner) verifyAck(ctx context.Context, vm string, a ack, how string) error {
	out, err := execOut(ctx, r.srv.client, vm, "cat", a.path)
	var ee *exitError
	switch {
	case errors.As(err, &ee):
		r.violate("acknowledged write lost %s: %s in %s (from checkpoint %s of %s): %v", how, a.path, vm, a.checkpoint, a.vm, err)
		return fmt.Errorf("%w: %s in %s", errLost, a.path, vm)
	case err != nil:
		return err
	case strings.TrimSpace(out) != a.content:
		r.violate("acknowledged write changed %s: %s in %s (from checkpoint %s of %s) reads %q, want %q", how, a.path, vm, a.checkpoint, a.vm, strings.TrimSpace(out), a.content)
		return fmt.Errorf("%w: %s in %s", errLost, a.path, vm)
	}
	return nil
}

// finalCheck destroys every VM, stops the server and checks that nothing
// of the run is left: no VMM, cgroup, uid lease, loop device or temporary
// file. The run's cgroup parent, uid range and data dir are its own, so
// their count before the run is zero by construction.
func (r *runner) finalCheck(ctx context.Context) {
	c := r.srv.client
	vms, err := c.ListVMs(ctx)
	if err != nil {
		r.violate("at the end: listing VMs: %v", err)
	}
	for _, v := range vms {
		dctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
		if _, err := c.DestroyVM(dctx, v.Name); err != nil {
			r.violate("at the end: destroying %s: %v", v.Name, err)
		}
		cancel()
	}
	if err := r.srv.stop(); err != nil {
		r.violate("at the end: %v", err)
	}
	var bad []string
	deadline := time.Now().Add(30 * time.Second)
	for {
		bad = nil
		for _, pid := range r.srv.vmmPids() {
			bad = append(bad, fmt.Sprintf("VMM process %d (%s) still runs after every VM was destroyed", pid, vmmName(pid)))
		}
		bad = append(bad, r.checkFiles(nil, nil)...)
		bad = append(bad, r.checkLeases(nil)...)
		bad = append(bad, r.checkCgroups(nil)...)
		if r.srv.ns.IsOpen() {
			taps, err := r.taps()
			if err != nil {
				bad = append(bad, err.Error())
			}
			for _, t := range taps {
				bad = append(bad, "TAP "+t+" is left after every VM was destroyed")
			}
		}
		if len(bad) == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	// Then the data disk goes, and with it the run's only loop device.
	if err := r.disk.teardown(); err != nil {
		bad = append(bad, err.Error())
	}
	bad = append(bad, r.checkLoops()...)
	for _, b := range bad {
		r.violate("after destroying everything and stopping the server: %s", b)
	}
	r.logf("final check: %d leaks after destroying every VM and stopping the server", len(bad))
}

// cleanup stops the server, kills VMMs of the run's data dir that are left
// (only those: their command lines name it), removes the run's cgroups and
// its directory.
func (r *runner) cleanup(dir string) {
	r.srv.stop()
	for _, pid := range r.srv.vmmPids() {
		syscall.Kill(pid, syscall.SIGKILL)
	}
	deadline := time.Now().Add(30 * time.Second)
	for len(r.srv.vmmPids()) > 0 && time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
	}
	// A killed VMM stays in its cgroup until it is reaped: retry.
	for {
		left := 0
		for _, d := range r.cgroupDirs() {
			if syscall.Rmdir(d) != nil {
				left++
			}
		}
		for _, p := range []string{filepath.Join("/sys/fs/cgroup", "*", r.srv.cgroup), filepath.Join("/sys/fs/cgroup", r.srv.cgroup)} {
			ms, _ := filepath.Glob(p)
			for _, m := range ms {
				if syscall.Rmdir(m) != nil {
					left++
				}
			}
		}
		if left == 0 || time.Now().After(deadline.Add(30*time.Second)) {
			if left > 0 {
				fmt.Fprintf(r.o.Out, "could not remove %d cgroups under %s\n", left, r.srv.cgroup)
			}
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if err := r.disk.teardown(); err != nil {
		fmt.Fprintf(r.o.Out, "%v\n", err)
	}
	if r.srv.ns.IsOpen() {
		r.srv.ns.Close() // the namespace goes with its last process
	}
	if r.o.Keep {
		fmt.Fprintf(r.o.Out, "kept %s (--keep; the data dir is in the image disk.img)\n", dir)
		return
	}
	os.RemoveAll(dir)
}
