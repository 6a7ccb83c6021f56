package manager

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/noid-vm/noid/internal/api"
	"github.com/noid-vm/noid/internal/errdefs"
	"github.com/noid-vm/noid/internal/network"
	"github.com/noid-vm/noid/internal/store"
	"github.com/noid-vm/noid/internal/testutil"
)

// raceMemMiB is the memory of the VMs the race tests make: small, so that
// several run at once on a small host.
const raceMemMiB = 128

// race runs fns at once: every one waits for a shared channel, which is
// closed when all are started, and race returns their errors in order.
func race(fns ...func() error) []error {
	start := make(chan struct{})
	errs := make([]error, len(fns))
	var wg sync.WaitGroup
	for i, fn := range fns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			errs[i] = fn()
		}()
	}
	close(start)
	wg.Wait()
	return errs
}

// outcomes counts errs: how many are nil, and how many match each of want.
func outcomes(t *testing.T, what string, errs []error, want ...error) (ok int) {
	t.Helper()
	for _, err := range errs {
		if err == nil {
			ok++
			continue
		}
		known := false
		for _, w := range want {
			known = known || errors.Is(err, w)
		}
		if !known {
			t.Errorf("%s: unexpected error: %v", what, err)
		}
	}
	return ok
}

// with is the env driven by another (sub)test.
func (e *env) with(t *testing.T) *env {
	c := *e
	c.t = t
	return &c
}

// setQuota gives the env's user these own limits (nil: the config's) and
// reloads the user, whose limits the manager reads from it.
func (e *env) setQuota(vms, memMiB, cpBytes *int64) {
	e.t.Helper()
	ctx := tctx(e.t)
	if err := e.mgr.store.SetQuota(ctx, e.user.Name, vms, nil, memMiB, cpBytes); err != nil {
		e.t.Fatal(err)
	}
	u, err := e.mgr.store.UserByID(ctx, e.user.ID)
	if err != nil {
		e.t.Fatal(err)
	}
	*e.user = *u
}

func i64(n int64) *int64 { return &n }

// vmms lists the VMM processes of the env's data dir: pid by runtime id.
func (e *env) vmms() map[string][]int {
	out, _ := exec.Command("pgrep", "-af", "qemu-system.*"+regexp.QuoteMeta(e.dir)).Output()
	re := regexp.MustCompile(`(?m)^(\d+) .*-name noid-([0-9a-f]+),`)
	got := map[string][]int{}
	for _, m := range re.FindAllStringSubmatch(string(out), -1) {
		pid, _ := strconv.Atoi(m[1])
		got[m[2]] = append(got[m[2]], pid)
	}
	return got
}

// poolBusy reports whether the warm pool is preparing spares.
func (e *env) poolBusy() bool {
	wp := e.mgr.pool
	wp.mu.Lock()
	defer wp.mu.Unlock()
	for _, n := range wp.filling {
		if n > 0 {
			return true
		}
	}
	return false
}

// settle waits until the warm pool is idle and every VMM of the data dir
// is a listed VM's or a waiting spare's (spares are discarded in the
// background), then checks that the store, the disk and the processes
// agree (checkConsistent), that no spare waits for a snapshot that is
// gone, that no checkpoint space stays reserved, that the manager keeps a
// runtime for listed VMs only, and that the metrics count what the store
// holds.
func (e *env) settle(when string) {
	e.t.Helper()
	ctx := tctx(e.t)
	e.pollVMs(when, func(vms []*store.VM) string {
		known := e.mgr.pool.ids()
		for _, v := range vms {
			known[v.Runtime()] = true
		}
		stray := []string{}
		for id := range e.vmms() {
			if !known[id] {
				stray = append(stray, id)
			}
		}
		if e.poolBusy() || len(stray) > 0 {
			return fmt.Sprintf("the pool is busy (%v) or VMMs of neither a VM nor a spare run: %v", e.poolBusy(), stray)
		}
		return ""
	})
	e.checkConsistent(when)
	wp := e.mgr.pool
	wp.mu.Lock()
	for key, sps := range wp.spares {
		if _, err := os.Stat(key); len(sps) > 0 && err != nil {
			e.t.Errorf("%s: %d spares wait for %s, which is gone: %v", when, len(sps), poolLabel(key), err)
		}
	}
	wp.mu.Unlock()
	if n := e.mgr.checkpointReserved(e.user.ID); n != 0 {
		e.t.Errorf("%s: %d checkpoint bytes are still reserved", when, n)
	}
	vms, _ := e.mgr.store.ListVMs(ctx, -1)
	ids := map[string]bool{}
	for _, v := range vms {
		ids[v.ID] = true
	}
	e.mgr.mu.Lock()
	for id := range e.mgr.vms {
		if !ids[id] {
			e.t.Errorf("%s: the manager keeps a runtime for vm id %s, which is not in the store", when, id)
		}
	}
	e.mgr.mu.Unlock()
	m, err := e.mgr.Metrics(ctx)
	if err != nil {
		e.t.Fatal(err)
	}
	cps, _ := e.mgr.store.ListCheckpoints(ctx, -1, "")
	n := 0
	for _, c := range m.VMsByState {
		n += c
	}
	if n != len(vms) || m.Checkpoints != len(cps) {
		e.t.Errorf("%s: metrics count %d VMs and %d checkpoints, the store has %d and %d", when, n, m.Checkpoints, len(vms), len(cps))
	}
}

// TestRaces launches requests that race on one manager together, several
// times each, and checks after every round that the outcome is one the
// requests allow and that nothing is left behind: two creates of one name,
// creates and clones at the VM and memory quotas, checkpoints at the
// checkpoint space quota, a destroy racing a checkpoint of its VM, and two
// rewinds of one VM. The VMs are small (1 vCPU, 128 MiB); the clones
// start from one checkpoint of one VM.
func TestRaces(t *testing.T) {
	e := newEnv(t, "")
	ctx := tctx(t)
	if _, err := e.mgr.CreateVM(ctx, e.user, api.CreateVMRequest{Name: "src", MemoryMiB: raceMemMiB}); err != nil {
		t.Fatal(err)
	}
	// RAM that holds data, so that checkpoints (of src and of its clones)
	// are not mostly holes.
	e.mustExec("src", "sh", "-c", "mkdir -p /run/fill && mount -t tmpfs -o size=64m fill /run/fill && dd if=/dev/urandom of=/run/fill/f bs=1M count=40 2>/dev/null && echo zero > /root/mark && sync")
	if _, err := e.mgr.Checkpoint(ctx, e.user, "src", api.CheckpointRequest{Name: "c0"}); err != nil {
		t.Fatal(err)
	}
	e.mustExec("src", "sh", "-c", "echo one > /root/mark && sync")
	if _, err := e.mgr.Checkpoint(ctx, e.user, "src", api.CheckpointRequest{Name: "c1"}); err != nil {
		t.Fatal(err)
	}
	clone := func(e *env, name string) error {
		_, err := e.mgr.Restore(tctx(e.t), e.user, "src", api.RestoreRequest{Checkpoint: "c0", As: name})
		return err
	}
	destroy := func(e *env, names ...string) {
		e.t.Helper()
		for _, n := range names {
			if _, err := e.mgr.DestroyVM(tctx(e.t), e.user, n); err != nil && !errors.Is(err, errdefs.ErrNotFound) {
				e.t.Fatalf("destroying %s: %v", n, err)
			}
		}
	}

	t.Run("SameName", func(t *testing.T) {
		e := e.with(t)
		for round := range 3 {
			mk := func() error {
				_, err := e.mgr.CreateVM(tctx(t), e.user, api.CreateVMRequest{Name: "dup", MemoryMiB: raceMemMiB})
				return err
			}
			cl := func() error { return clone(e, "dup") }
			// Two creates, then two clones, then a create and a clone.
			fns := [][]func() error{{mk, mk}, {cl, cl}, {mk, cl}}[round]
			errs := race(fns...)
			if ok := outcomes(t, "same name", errs, errdefs.ErrAlreadyExists); ok != 1 {
				t.Errorf("round %d: %d of 2 requests for one name succeeded: %v", round, ok, errs)
			}
			vms, _ := e.mgr.ListVMs(tctx(t), e.user)
			if n := len(vms); n != 2 {
				t.Errorf("round %d: %d VMs, want src and dup", round, n)
			}
			e.mustExec("dup", "true")
			e.settle(fmt.Sprintf("same name, round %d", round))
			destroy(e, "dup")
		}
	})

	t.Run("VMQuota", func(t *testing.T) {
		e := e.with(t)
		defer e.setQuota(nil, nil, nil)
		for round := range 2 {
			// Room for one more VM, of any memory.
			e.setQuota(i64(2), nil, nil)
			names := []string{"q1", "q2", "q3"}
			fns := []func() error{}
			for _, n := range names {
				fns = append(fns, func() error {
					if round == 1 { // clones the second time
						return clone(e, n)
					}
					_, err := e.mgr.CreateVM(tctx(t), e.user, api.CreateVMRequest{Name: n, MemoryMiB: raceMemMiB})
					return err
				})
			}
			errs := race(fns...)
			if ok := outcomes(t, "vm quota", errs, errdefs.ErrQuotaExceeded); ok != 1 {
				t.Errorf("round %d: %d of 3 creates succeeded with room for one: %v", round, ok, errs)
			}
			if vms, _ := e.mgr.ListVMs(tctx(t), e.user); len(vms) != 2 {
				t.Errorf("round %d: %d VMs with max_vms 2", round, len(vms))
			}
			e.settle(fmt.Sprintf("vm quota, round %d", round))
			destroy(e, names...)
		}
	})

	t.Run("MemoryQuota", func(t *testing.T) {
		e := e.with(t)
		defer e.setQuota(nil, nil, nil)
		for round := range 2 {
			// Room for one more VM's memory, not two; clones this time.
			e.setQuota(nil, i64(raceMemMiB+raceMemMiB+raceMemMiB/2), nil)
			names := []string{"m1", "m2", "m3"}
			fns := []func() error{}
			for _, n := range names {
				fns = append(fns, func() error { return clone(e, n) })
			}
			errs := race(fns...)
			if ok := outcomes(t, "memory quota", errs, errdefs.ErrQuotaExceeded); ok != 1 {
				t.Errorf("round %d: %d of 3 clones succeeded with memory for one: %v", round, ok, errs)
			}
			if use, _ := e.mgr.store.UserUsage(tctx(t), e.user.ID); int64(use.MemoryMiB) > *e.user.MaxMemoryMiB {
				t.Errorf("round %d: %d MiB in use, the quota is %d", round, use.MemoryMiB, *e.user.MaxMemoryMiB)
			}
			e.settle(fmt.Sprintf("memory quota, round %d", round))
			destroy(e, names...)
		}
	})

	t.Run("CheckpointQuota", func(t *testing.T) {
		e := e.with(t)
		defer e.setQuota(nil, nil, nil)
		for _, n := range []string{"k1", "k2"} {
			if err := clone(e, n); err != nil {
				t.Fatal(err)
			}
		}
		defer destroy(e, "k1", "k2")
		cpRoot := filepath.Join(e.mgr.userDir(e.user.ID), "checkpoints")
		racers := []string{"src", "k1", "k2"}
		for round := range 3 {
			// Room for any one of the three checkpoints by its estimate,
			// on top of those stored, and not for two.
			use, err := e.mgr.store.UserUsage(tctx(t), e.user.ID)
			if err != nil {
				t.Fatal(err)
			}
			var lo, hi int64
			for _, n := range racers {
				v, err := e.mgr.store.GetVM(tctx(t), e.user.ID, n)
				if err != nil {
					t.Fatal(err)
				}
				est := e.mgr.cpEstimate(v)
				if lo == 0 || est < lo {
					lo = est
				}
				hi = max(hi, est)
			}
			if 3*lo <= 2*hi {
				for _, n := range racers {
					v, _ := e.mgr.store.GetVM(tctx(t), e.user.ID, n)
					out, _ := exec.Command("ls", "-ls", e.mgr.vmDir(v)).CombinedOutput()
					t.Logf("%s:\n%s", n, out)
				}
				t.Fatalf("the checkpoint estimates differ too much for this test: %d and %d", lo, hi)
			}
			quota := use.CheckpointBytes + hi + lo/2
			e.setQuota(nil, nil, i64(quota))

			w := watchCreates(t, cpRoot)
			stop, peak := e.sampleCheckpointBytes(cpRoot)
			fns := []func() error{}
			for _, n := range racers {
				fns = append(fns, func() error {
					_, err := e.mgr.Checkpoint(tctx(t), e.user, n, api.CheckpointRequest{Name: fmt.Sprintf("q%d", round)})
					return err
				})
			}
			errs := race(fns...)
			stop()
			made := w.stop()
			if ok := outcomes(t, "checkpoint quota", errs, errdefs.ErrQuotaExceeded); ok != 1 {
				t.Errorf("round %d: %d of 3 checkpoints succeeded with room for one: %v", round, ok, errs)
			}
			if len(made) != 1 {
				t.Errorf("round %d: %d checkpoint directories were written for one that fits (a refused checkpoint must write nothing): %v", round, len(made), made)
			}
			after, _ := e.mgr.store.UserUsage(tctx(t), e.user.ID)
			if after.CheckpointBytes > quota {
				t.Errorf("round %d: %d checkpoint bytes stored, the quota is %d", round, after.CheckpointBytes, quota)
			}
			if p := peak(); p > quota {
				t.Errorf("round %d: the checkpoints took %d bytes on disk while written, the quota is %d", round, p, quota)
			}
			e.settle(fmt.Sprintf("checkpoint quota, round %d", round))
			for i, err := range errs {
				if err == nil {
					if err := e.mgr.DeleteCheckpoint(tctx(t), e.user, racers[i], fmt.Sprintf("q%d", round)); err != nil {
						t.Fatal(err)
					}
				}
			}
		}
	})

	t.Run("DestroyVsCheckpoint", func(t *testing.T) {
		e := e.with(t)
		won := 0
		for round := range 4 {
			if err := clone(e, "dv"); err != nil {
				t.Fatal(err)
			}
			v, err := e.mgr.store.GetVM(tctx(t), e.user.ID, "dv")
			if err != nil {
				t.Fatal(err)
			}
			del := func() error {
				_, err := e.mgr.DestroyVM(tctx(t), e.user, "dv")
				return err
			}
			cp := func() error {
				_, err := e.mgr.Checkpoint(tctx(t), e.user, "dv", api.CheckpointRequest{Name: "x"})
				return err
			}
			// The order the racers start in alternates: errs[0] is the
			// destroy's, errs[1] the checkpoint's.
			var errs []error
			if round%2 == 0 {
				errs = race(del, cp)
			} else {
				errs = race(cp, del)
				errs[0], errs[1] = errs[1], errs[0]
			}
			if errs[0] != nil {
				t.Errorf("round %d: destroy: %v", round, errs[0])
			}
			if errs[1] == nil {
				won++
			} else if !errors.Is(errs[1], errdefs.ErrNotFound) && !errors.Is(errs[1], errdefs.ErrNotRunning) {
				t.Errorf("round %d: a checkpoint that lost to the destroy: %v", round, errs[1])
			}
			when := fmt.Sprintf("destroy vs checkpoint, round %d", round)
			if _, err := e.mgr.GetVM(tctx(t), e.user, "dv"); !errors.Is(err, errdefs.ErrNotFound) {
				t.Errorf("%s: the destroyed vm: %v", when, err)
			}
			cps, _ := e.mgr.store.ListCheckpoints(tctx(t), -1, "")
			for _, c := range cps {
				if c.VMID == v.ID {
					t.Errorf("%s: checkpoint %s of the destroyed vm is still stored", when, c.Name)
				}
			}
			e.settle(when)
			if pids := e.vmms()[v.ID]; len(pids) > 0 {
				t.Errorf("%s: the destroyed vm's VMM still runs: %v", when, pids)
			}
			if _, err := os.Stat(e.mgr.vmDir(v)); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("%s: the destroyed vm's directory: %v", when, err)
			}
		}
		t.Logf("the checkpoint came first in %d of 4 rounds", won)
	})

	t.Run("DestroyAfterNameReused", func(t *testing.T) {
		// A destroy that waits for its VM's lock while another destroy
		// removes the VM and a new VM takes the name must not destroy
		// the new VM: it answers that its VM is gone.
		e := e.with(t)
		if err := clone(e, "re"); err != nil {
			t.Fatal(err)
		}
		old, err := e.mgr.store.GetVM(tctx(t), e.user.ID, "re")
		if err != nil {
			t.Fatal(err)
		}
		rt := e.mgr.rt(old.ID)
		rt.op.Lock() // as the first destroy holds it
		res := make(chan error, 1)
		go func() {
			_, err := e.mgr.DestroyVM(tctx(t), e.user, "re")
			res <- err
		}()
		waitGoroutine(t, "manager.(*Manager).DestroyVM.func", "sync.(*Mutex).Lock")
		if _, err := e.mgr.destroyVM(tctx(t), old); err != nil {
			rt.op.Unlock()
			t.Fatal(err)
		}
		if err := clone(e, "re"); err != nil {
			rt.op.Unlock()
			t.Fatal(err)
		}
		rt.op.Unlock()
		if err := <-res; !errors.Is(err, errdefs.ErrNotFound) {
			t.Errorf("the destroy of the vm that is gone: %v", err)
		}
		if v, err := e.mgr.GetVM(tctx(t), e.user, "re"); err != nil || v.ID == old.ID || v.State != store.StateRunning {
			t.Fatalf("the new vm of that name: %+v %v", v, err)
		}
		e.mustExec("re", "true")
		e.settle("destroy after the name was reused")
		destroy(e, "re")
	})

	t.Run("TwoRewinds", func(t *testing.T) {
		e := e.with(t)
		seen := map[string]bool{}
		for round := range 4 {
			before, err := e.mgr.store.GetVM(tctx(t), e.user.ID, "src")
			if err != nil {
				t.Fatal(err)
			}
			seen[before.Runtime()] = true
			rewind := func(cp string) func() error {
				return func() error {
					_, err := e.mgr.Restore(tctx(t), e.user, "src", api.RestoreRequest{Checkpoint: cp})
					return err
				}
			}
			errs := race(rewind("c0"), rewind("c1"))
			when := fmt.Sprintf("two rewinds, round %d", round)
			for _, err := range errs {
				if err == nil {
					continue
				}
				if code, _ := errdefs.Classify(err); code == errdefs.CodeInternal {
					t.Errorf("%s: a rewind failed without a clear error: %v", when, err)
				}
			}
			if errs[0] != nil && errs[1] != nil {
				t.Errorf("%s: both rewinds failed: %v", when, errs)
			}
			if got := e.mustExec("src", "cat", "/root/mark"); got != "zero\n" && got != "one\n" {
				t.Errorf("%s: the mark is %q, from neither checkpoint", when, got)
			}
			v, err := e.mgr.store.GetVM(tctx(t), e.user.ID, "src")
			if err != nil {
				t.Fatal(err)
			}
			if v.State != store.StateRunning {
				t.Errorf("%s: src is %s", when, v.State)
			}
			e.settle(when)
			vmms := e.vmms()
			if pids := vmms[v.Runtime()]; len(pids) != 1 || pids[0] != v.PID {
				t.Errorf("%s: VMMs of src's runtime %s: %v, its row says pid %d", when, v.Runtime(), pids, v.PID)
			}
			for id := range seen {
				if id != v.Runtime() && len(vmms[id]) > 0 {
					t.Errorf("%s: the VMM of an earlier runtime %s of src still runs: %v", when, id, vmms[id])
				}
			}
			waitNoRewound(t, e.mgr.vmDir(v))
		}
	})
}

// waitGoroutine waits until a goroutine whose stack has fn is blocked in
// blocked.
func waitGoroutine(t *testing.T, fn, blocked string) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		for _, g := range strings.Split(string(buf[:n]), "\n\n") {
			if strings.Contains(g, fn) && strings.Contains(g, blocked) {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no goroutine in %s blocked in %s within a minute", fn, blocked)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// waitNoRewound waits until the files a rewind moved out of the way in the
// vm dir are gone.
func waitNoRewound(t *testing.T, dir string) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		left, _ := filepath.Glob(filepath.Join(dir, rewoundPrefix+"*"))
		if len(left) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("%v are still there a minute after the rewinds", left)
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// createWatch records the entries created in one directory (inotify).
type createWatch struct {
	fd, wd int
	done   chan []string
}

// watchCreates starts recording the entries created in dir, which it makes
// if missing.
func watchCreates(t *testing.T, dir string) *createWatch {
	t.Helper()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	fd, err := unix.InotifyInit1(unix.IN_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	wd, err := unix.InotifyAddWatch(fd, dir, unix.IN_CREATE)
	if err != nil {
		unix.Close(fd)
		t.Fatal(err)
	}
	w := &createWatch{fd: fd, wd: wd, done: make(chan []string, 1)}
	go w.read()
	return w
}

func (w *createWatch) read() {
	var names []string
	buf := make([]byte, 64<<10)
	for {
		n, err := unix.Read(w.fd, buf)
		if n <= 0 || err != nil {
			w.done <- names
			return
		}
		for off := 0; off+unix.SizeofInotifyEvent <= n; {
			ev := (*unix.InotifyEvent)(unsafe.Pointer(&buf[off]))
			name := buf[off+unix.SizeofInotifyEvent : off+unix.SizeofInotifyEvent+int(ev.Len)]
			if ev.Mask&unix.IN_IGNORED != 0 {
				w.done <- names
				return
			}
			names = append(names, string(bytes.TrimRight(name, "\x00")))
			off += unix.SizeofInotifyEvent + int(ev.Len)
		}
	}
}

// stop ends the watch and returns the names of the created entries.
func (w *createWatch) stop() []string {
	// Removing the watch queues IN_IGNORED after every earlier event.
	unix.InotifyRmWatch(w.fd, uint32(w.wd))
	names := <-w.done
	unix.Close(w.fd)
	return names
}

// sampleCheckpointBytes measures the disk space the checkpoints in dir
// take (written and being written, as snapshotSize counts it) until stop
// is called; peak returns the largest it saw.
func (e *env) sampleCheckpointBytes(dir string) (stop func(), peak func() int64) {
	var mu sync.Mutex
	var top int64
	quit, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		for {
			var n int64
			ents, _ := os.ReadDir(dir)
			for _, ent := range ents {
				n += e.mgr.snapshotSize(filepath.Join(dir, ent.Name()))
			}
			mu.Lock()
			top = max(top, n)
			mu.Unlock()
			select {
			case <-quit:
				return
			case <-time.After(5 * time.Millisecond):
			}
		}
	}()
	return func() { close(quit); <-done }, func() int64 { mu.Lock(); defer mu.Unlock(); return top }
}

// racesNetEnv marks the child process that TestRacesNetwork runs its races
// in, in a network namespace the kernel made for it.
const racesNetEnv = "NOID_RACES_NETNS"

// TestRacesNetwork races clones with networking on: two of one name, and
// three at max_vms with room for one. Every round must leave a
// TAP for each VM and waiting spare and for nothing else, and give each VM
// an address of its own. The manager runs in a child process (this test
// binary) in a network namespace of its own, so its bridge, TAPs and rules
// meet nobody else's.
func TestRacesNetwork(t *testing.T) {
	if os.Getenv(racesNetEnv) == "" {
		testutil.RequireRoot(t)
		cmd := exec.Command(os.Args[0], "-test.run=^TestRacesNetwork$", "-test.v", "-test.count=1")
		cmd.Env = append(os.Environ(), racesNetEnv+"=1")
		cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWNET}
		out, err := cmd.CombinedOutput()
		if err != nil || !bytes.Contains(out, []byte("--- PASS: TestRacesNetwork")) {
			t.Fatalf("the races in a network namespace: %v\n%s", err, lastLines(string(out), 80))
		}
		t.Logf("in a network namespace of its own:\n%s", lastLines(string(out), 3))
		return
	}
	lo, err := netlink.LinkByName("lo")
	if err == nil {
		err = netlink.LinkSetUp(lo)
	}
	if err != nil {
		t.Fatalf("bringing up lo in the test's network namespace: %v", err)
	}
	e := newEnv(t, "[network]\nenabled = true\n")
	ctx := tctx(t)
	if _, err := e.mgr.CreateVM(ctx, e.user, api.CreateVMRequest{Name: "src", MemoryMiB: raceMemMiB}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.mgr.Checkpoint(ctx, e.user, "src", api.CheckpointRequest{Name: "c0"}); err != nil {
		t.Fatal(err)
	}
	cl := func(name string) func() error {
		return func() error {
			_, err := e.mgr.Restore(tctx(t), e.user, "src", api.RestoreRequest{Checkpoint: "c0", As: name})
			return err
		}
	}
	destroy := func(names ...string) {
		for _, n := range names {
			if _, err := e.mgr.DestroyVM(tctx(t), e.user, n); err != nil && !errors.Is(err, errdefs.ErrNotFound) {
				t.Fatalf("destroying %s: %v", n, err)
			}
		}
	}
	// Clones only: they take spares, with TAPs of their own, and a cold
	// boot under TCG is slow (TestRaces races creates without a NIC).
	for round := range 2 {
		if ok := outcomes(t, "same name", race(cl("dup"), cl("dup")), errdefs.ErrAlreadyExists); ok != 1 {
			t.Errorf("round %d: %d of 2 requests for one name succeeded", round, ok)
		}
		e.settleNet(fmt.Sprintf("same name with networking, round %d", round))
		destroy("dup")
	}
	e.setQuota(i64(2), nil, nil)
	if ok := outcomes(t, "vm quota", race(cl("q1"), cl("q2"), cl("q3")), errdefs.ErrQuotaExceeded); ok != 1 {
		t.Errorf("%d of 3 requests succeeded with room for one VM", ok)
	}
	e.settleNet("vm quota with networking")
	destroy("q1", "q2", "q3")
	e.settleNet("after the destroys")
}

// settleNet is settle, then waits until the TAPs are those of the VMs and
// the waiting spares (a discarded spare's goes after its VMM), and checks
// that every VM has an address of its own.
func (e *env) settleNet(when string) {
	e.t.Helper()
	e.settle(when)
	e.pollVMs(when, func(vms []*store.VM) string {
		want, ips := map[string]bool{}, map[string]string{}
		for _, v := range vms {
			want[v.Tap] = true
			if v.IP == "" || ips[v.IP] != "" {
				return fmt.Sprintf("vm %s has address %q (also %q's)", v.Name, v.IP, ips[v.IP])
			}
			ips[v.IP] = v.Name
		}
		for id := range e.mgr.pool.ids() {
			want[network.TapName(id)] = true
		}
		links, err := netlink.LinkList()
		if err != nil {
			e.t.Fatal(err)
		}
		var extra, missing []string
		have := map[string]bool{}
		for _, l := range links {
			if name := l.Attrs().Name; strings.HasPrefix(name, "noid-") {
				have[name] = true
				if !want[name] {
					extra = append(extra, name)
				}
			}
		}
		for name := range want {
			if !have[name] {
				missing = append(missing, name)
			}
		}
		if len(extra) > 0 || len(missing) > 0 {
			return fmt.Sprintf("TAPs of neither a VM nor a spare: %v; TAPs missing: %v", extra, missing)
		}
		return ""
	})
}

// pollVMs lists every VM until cond, given them, returns "", and fails the
// test with what cond last returned when a minute passes first.
func (e *env) pollVMs(when string, cond func([]*store.VM) string) {
	e.t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		vms, err := e.mgr.store.ListVMs(tctx(e.t), -1)
		if err != nil {
			e.t.Fatal(err)
		}
		msg := cond(vms)
		if msg == "" {
			return
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("%s: after a minute, %s", when, msg)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
