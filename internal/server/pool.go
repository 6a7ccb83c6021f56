package server

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/noid-vm/noid/internal/api"
	"github.com/noid-vm/noid/internal/errdefs"
	"github.com/noid-vm/noid/internal/network"
	"github.com/noid-vm/noid/internal/store"
	"github.com/noid-vm/noid/internal/vmm"
)

// The warm pool keeps VMMs started ahead of time for golden snapshots: each
// spare already has its own copy of the golden's memory and disk, its TAP,
// its sandbox and a VMM process waiting for incoming state. A golden create
// that finds a spare only moves the spare's directory to the new VM, loads
// the device state, resumes and greets the agent; the process start and the
// copies are off its critical path. Spares are not VMs: they belong to no
// user, are killed on shutdown and swept at start-up.

// spare is one prepared VMM.
type spare struct {
	id       string
	dir      string
	golden   string
	promoted time.Time
	inst     vmm.Prepared
}

// warmPool holds the spares, per golden directory.
type warmPool struct {
	s       *Server
	size    int
	mu      sync.Mutex
	spares  map[string][]*spare
	filling map[string]int
	closed  bool
	wg      sync.WaitGroup
}

func newWarmPool(s *Server, size int) *warmPool {
	return &warmPool{s: s, size: size, spares: map[string][]*spare{}, filling: map[string]int{}}
}

func (s *Server) poolDir() string { return filepath.Join(s.cfg.StorageDir(), "pool") }

// take returns a usable spare for the golden in dir, or nil.
func (wp *warmPool) take(dir string, promoted time.Time) *spare {
	if wp == nil || wp.size <= 0 {
		return nil
	}
	wp.mu.Lock()
	defer wp.mu.Unlock()
	for len(wp.spares[dir]) > 0 {
		sp := wp.spares[dir][0]
		wp.spares[dir] = wp.spares[dir][1:]
		alive := true
		select {
		case <-sp.inst.Done():
			alive = false
		default:
		}
		if alive && sp.promoted.Equal(promoted) {
			return sp
		}
		go wp.discard(sp)
	}
	return nil
}

// putBack returns an untouched spare to the pool.
func (wp *warmPool) putBack(sp *spare) {
	wp.mu.Lock()
	if !wp.closed {
		wp.spares[sp.golden] = append(wp.spares[sp.golden], sp)
		sp = nil
	}
	wp.mu.Unlock()
	if sp != nil {
		wp.discard(sp)
	}
}

// ready is the number of spares waiting for the golden in dir.
func (wp *warmPool) ready(dir string) int {
	if wp == nil {
		return 0
	}
	wp.mu.Lock()
	defer wp.mu.Unlock()
	return len(wp.spares[dir])
}

// refill starts spares in the background until dir has size of them.
func (wp *warmPool) refill(dir string) {
	if wp == nil || wp.size <= 0 {
		return
	}
	wp.mu.Lock()
	need := wp.size - len(wp.spares[dir]) - wp.filling[dir]
	if wp.closed || need <= 0 {
		wp.mu.Unlock()
		return
	}
	wp.filling[dir] += need
	wp.wg.Add(1)
	wp.mu.Unlock()
	go func() {
		defer wp.wg.Done()
		for i := 0; i < need; i++ {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			sp, err := wp.s.makeSpare(ctx, dir)
			cancel()
			wp.mu.Lock()
			wp.filling[dir]--
			if err == nil && !wp.closed {
				wp.spares[dir] = append(wp.spares[dir], sp)
				sp = nil
			}
			wp.mu.Unlock()
			if sp != nil {
				wp.discard(sp)
			}
			if err != nil {
				wp.s.log.Warn("warm pool: could not prepare a spare", "golden", filepath.Base(dir), "err", err)
				return
			}
		}
	}()
}

// drain discards every spare of the golden in dir (it was replaced or removed).
func (wp *warmPool) drain(dir string) {
	if wp == nil {
		return
	}
	wp.mu.Lock()
	sps := wp.spares[dir]
	delete(wp.spares, dir)
	wp.mu.Unlock()
	for _, sp := range sps {
		wp.discard(sp)
	}
}

// close discards every spare and waits for fills in flight.
func (wp *warmPool) close() {
	if wp == nil {
		return
	}
	wp.mu.Lock()
	wp.closed = true
	all := wp.spares
	wp.spares = map[string][]*spare{}
	wp.mu.Unlock()
	wp.wg.Wait()
	for _, sps := range all {
		for _, sp := range sps {
			wp.discard(sp)
		}
	}
}

// discard kills a spare and removes everything it had.
func (wp *warmPool) discard(sp *spare) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if sp.inst != nil {
		sp.inst.Kill(ctx)
	}
	wp.s.releaseSpareResources(ctx, sp.id, sp.dir)
}

func (s *Server) releaseSpareResources(ctx context.Context, id, dir string) {
	if s.net != nil {
		s.net.RemoveVM(ctx, id)
	}
	if s.uids != nil {
		s.uids.Release(id)
	}
	os.RemoveAll(dir)
	os.Remove(filepath.Join(s.runDir(), id+".qmp"))
	os.Remove(filepath.Join(s.runDir(), id+".agent"))
}

// makeSpare prepares one spare for the golden in dir.
func (s *Server) makeSpare(ctx context.Context, dir string) (*spare, error) {
	prep, ok := s.backend.(vmm.Preparer)
	if !ok {
		return nil, fmt.Errorf("%w: the %s backend cannot prepare VMMs ahead of time", errdefs.ErrNotImplemented, s.backend.Name())
	}
	bf, err := s.resolveBootFiles()
	if err != nil {
		return nil, err
	}
	l := s.goldenLock(dir)
	l.RLock()
	defer l.RUnlock()
	gc, err := readGoldenConfig(dir)
	if err != nil {
		return nil, err
	}
	if gc.HasNet && s.net == nil {
		return nil, fmt.Errorf("golden %s has a NIC but networking is off", filepath.Base(dir))
	}
	id := newID(6)
	sdir := filepath.Join(s.poolDir(), id)
	if err := os.MkdirAll(sdir, 0o700); err != nil {
		return nil, err
	}
	sp := &spare{id: id, dir: sdir, golden: dir, promoted: gc.PromotedAt}
	ok = false
	defer func() {
		if !ok {
			s.releaseSpareResources(context.Background(), id, sdir)
		}
	}()
	v := &store.VM{ID: id, Name: "spare-" + id, VCPUs: gc.VCPUs, MemoryMiB: gc.MemoryMiB, Accel: string(s.accel), Kernel: bf.Kernel, Initrd: bf.Initrd}
	spec := s.spec(v)
	spec.Dir = sdir
	spec.Disk, spec.MemFile, spec.SerialLog = filepath.Join(sdir, "disk.ext4"), filepath.Join(sdir, "mem.raw"), filepath.Join(sdir, "serial.log")
	if err := s.copier.CopyFile(ctx, filepath.Join(dir, vmm.SnapMemory), spec.MemFile); err != nil {
		return nil, err
	}
	if err := s.copier.CopyFile(ctx, filepath.Join(dir, vmm.SnapDisk), spec.Disk); err != nil {
		return nil, err
	}
	if gc.HasNet {
		tap, err := s.net.PrepareTap(ctx, id)
		if err != nil {
			return nil, err
		}
		spec.Net = &vmm.NetSpec{Tap: tap, MAC: network.MACFor(id).String()}
	}
	inst, err := prep.Prepare(ctx, spec)
	if err != nil {
		return nil, err
	}
	sp.inst = inst
	ok = true
	s.log.Debug("warm pool: spare ready", "spare", id, "golden", filepath.Base(dir))
	return sp, nil
}

// errStaleSpare means the golden changed after the spare was made.
var errStaleSpare = errors.New("the warm spare is older than its golden snapshot")

// createFromSpare turns a spare into the user's new VM. It holds the
// golden's read lock throughout, so the golden cannot change between the
// check that the spare still matches it and the state load.
func (s *Server) createFromSpare(ctx context.Context, u *store.User, p *createParams, bf bootFiles, dir string, sp *spare, start time.Time) (*api.VM, error) {
	l := s.goldenLock(dir)
	l.RLock()
	defer l.RUnlock()
	if gc, err := readGoldenConfig(dir); err != nil || !gc.PromotedAt.Equal(sp.promoted) {
		go s.pool.discard(sp)
		return nil, errStaleSpare
	}
	src := "system"
	if strings.HasPrefix(dir, s.userDir(u.ID)) {
		src = "user"
	}
	v := &store.VM{
		ID: sp.id, UserID: u.ID, Name: p.name, State: store.StateCreating, VCPUs: p.vcpus, MemoryMiB: p.memMiB,
		VMM: s.backend.Name(), Accel: string(s.accel), BootPath: "golden", BootReason: "warm spare", Kernel: bf.Kernel, Initrd: bf.Initrd,
		Network: p.network, AllowPeers: p.allowPeer, Source: "golden:" + src + ":" + filepath.Base(dir),
	}
	if fi, err := os.Stat(filepath.Join(sp.dir, "disk.ext4")); err == nil {
		v.DiskBytes = fi.Size()
	}
	opts := store.CreateOpts{CheckQuota: s.checkQuota(u, 1, v.VCPUs, v.MemoryMiB)}
	s.prepareNetwork(v, &opts)
	if err := s.store.CreateVM(ctx, v, opts); err != nil {
		s.pool.putBack(sp) // untouched: the next create can use it
		return nil, err
	}
	crashpoint("spare.after-insert")
	log := s.log.With("vm", v.Name, "vm_id", v.ID, "user", u.Name)
	rt := s.rt(v.ID)
	rt.log = log
	rt.op.Lock()
	defer rt.op.Unlock()
	fail := func(err error) (*api.VM, error) {
		log.Warn("create from a warm spare failed; cleaning up", "err", err)
		cctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		rt.setInstance(sp.inst)
		s.destroyVM(cctx, v)
		os.RemoveAll(sp.dir)
		s.metrics.op("golden", start, err)
		return nil, classifyIOErr("starting "+v.Name, err)
	}
	vdir := s.vmDir(v)
	if err := os.MkdirAll(filepath.Dir(vdir), 0o700); err != nil {
		return fail(err)
	}
	if err := os.Rename(sp.dir, vdir); err != nil {
		return fail(fmt.Errorf("moving the spare into place: %w", err))
	}
	if s.uids != nil {
		if err := s.uids.Rehome(v.ID, vdir); err != nil {
			return fail(err)
		}
	}
	sp.inst.Moved(s.spec(v))
	rt.setInstance(sp.inst)
	v.PID = sp.inst.Pid()
	if err := s.store.UpdateVM(ctx, v); err != nil {
		return fail(err)
	}
	netStart := time.Now()
	if err := s.attachNetwork(ctx, v); err != nil {
		return fail(err)
	}
	netDur := time.Since(netStart)
	t, err := sp.inst.Load(ctx, dir)
	if err != nil {
		return fail(err)
	}
	v.StartedAt = time.Now().UTC()
	agentStart := time.Now()
	if _, err := rt.agentClient(ctx, v); err != nil {
		return fail(fmt.Errorf("%w: the agent did not answer after restore: %v", errdefs.ErrUnavailable, err))
	}
	v.State = store.StateRunning
	if err := s.store.UpdateVM(ctx, v); err != nil {
		return fail(err)
	}
	s.metrics.op("golden", start, nil)
	log.Info("vm created from a warm spare", "source", v.Source, "ms", ms(time.Since(start)))
	out := s.apiVM(ctx, v)
	out.Timings = &api.Timings{TotalMs: ms(time.Since(start)), LoadMs: ms(t.Load), AgentMs: ms(time.Since(agentStart)), NetMs: ms(netDur)}
	return out, nil
}

// sweepPool removes spares left by an earlier server: their VMMs are killed
// (checked by command line, so a reused pid is never hit), their TAPs, uid
// leases and files removed.
func (s *Server) sweepPool(ctx context.Context) {
	ents, err := os.ReadDir(s.poolDir())
	if err != nil {
		return
	}
	for _, e := range ents {
		id := e.Name()
		dir := filepath.Join(s.poolDir(), id)
		if b, err := os.ReadFile(filepath.Join(dir, "qemu.pid")); err == nil {
			if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && pid > 0 {
				if cmd, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid)); err == nil && strings.Contains(string(cmd), "noid-"+id+",") {
					syscall.Kill(pid, syscall.SIGKILL)
				}
			}
		}
		s.releaseSpareResources(ctx, id, dir)
	}
}

// warmUp fills the pool for the system golden snapshots that are fresh.
func (s *Server) warmUp(ctx context.Context) {
	if s.pool == nil || s.pool.size <= 0 {
		return
	}
	if _, ok := s.backend.(vmm.Preparer); !ok {
		return
	}
	bf, err := s.resolveBootFiles()
	if err != nil {
		return
	}
	ents, _ := os.ReadDir(s.systemGoldenRoot())
	for _, e := range ents {
		d := filepath.Join(s.systemGoldenRoot(), e.Name())
		if gc, err := readGoldenConfig(d); err == nil && s.staleReason(ctx, gc, bf) == "" && (!gc.HasNet || s.net != nil) {
			s.pool.refill(d)
		}
	}
}
