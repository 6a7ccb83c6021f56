package manager

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	agentclient "github.com/noid-vm/noid/internal/agent/client"
	"github.com/noid-vm/noid/internal/agent/proto"
	"github.com/noid-vm/noid/internal/api"
	"github.com/noid-vm/noid/internal/errdefs"
	"github.com/noid-vm/noid/internal/network"
	"github.com/noid-vm/noid/internal/procfs"
	"github.com/noid-vm/noid/internal/store"
	"github.com/noid-vm/noid/internal/vmm"
)

// The warm pool keeps VMMs started ahead of time for snapshots that are
// likely to be used next, so that the process start and the preparation of
// a VM's files are off the critical path:
//
//   - for each golden snapshot in use, spares already running it: state
//     loaded, guest resumed and warmed up through its agent. A golden
//     create only moves a spare to the new VM and syncs its identity,
//     clock and entropy.
//   - for the checkpoints taken last, spares prepared for them: their disk
//     (a new top over the checkpoint's chain) and memory file laid out and
//     a VMM waiting for the device state. A clone or a rewind loads the
//     state into one, so the clone is the checkpoint's exact instant.
//
// When no spare waits, a clone or rewind prepares one on the spot: every
// snapshot start goes the same way. Spares are not VMs: they belong to no
// user, are killed on shutdown and swept at start-up.

// spare is one prepared VMM.
type spare struct {
	id  string
	dir string
	// key is the snapshot directory it was prepared for.
	key string
	// shape is the VM shape its VMM was started for.
	shape    spareShape
	promoted time.Time
	inst     vmm.Prepared
	// agent is set for a golden spare that already runs: its state is
	// loaded, its guest resumed and warmed up, and this is its agent
	// connection. A create then only applies the VM's identity.
	agent *agentclient.Client
	// fresh is how long preparing it took, for a spare prepared for the
	// request that uses it (none waited); 0 for one from the pool.
	fresh time.Duration
}

// alive reports whether the spare's VMM (and, for a running spare, its
// agent connection) still works.
func (sp *spare) alive() bool {
	select {
	case <-sp.inst.Done():
		return false
	default:
	}
	return sp.agent == nil || sp.agent.Err() == nil
}

// maxCheckpointSpares bounds how many checkpoints keep spares.
const maxCheckpointSpares = 4

// warmPool holds the spares, per snapshot directory.
type warmPool struct {
	m       *Manager
	size    int
	mu      sync.Mutex
	spares  map[string][]*spare
	filling map[string]int
	// gen counts the drains of each key, so that a fill in flight when
	// its snapshot was removed discards what it made.
	gen map[string]int
	// running holds, per golden key, the guest memory of one of its
	// running spares and the user owning the golden (0: a system golden),
	// for the memory budget (admitRunning).
	running map[string]runningKey
	// recent is the checkpoints with spares, most recent last.
	recent []string
	closed bool
	wg     sync.WaitGroup
	// ctx ends when the pool closes, so that fills in flight stop.
	ctx    context.Context
	cancel context.CancelFunc
}

func newWarmPool(m *Manager, size int) *warmPool {
	ctx, cancel := context.WithCancel(context.Background())
	return &warmPool{m: m, size: size, spares: map[string][]*spare{}, filling: map[string]int{}, gen: map[string]int{}, running: map[string]runningKey{}, ctx: ctx, cancel: cancel}
}

// spareShape is what a spare's VMM was started with, besides its snapshot.
type spareShape struct {
	VCPUs, MemoryMiB int
	// DiskBytes is the size of the disk the VM sees (for metrics).
	DiskBytes      int64
	HasNet         bool
	Kernel, Initrd string
	// Golden marks a golden snapshot's running spare.
	Golden bool
}

func (m *Manager) poolDir() string { return filepath.Join(m.cfg.StorageDir(), "pool") }

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
		if sp.alive() && sp.promoted.Equal(promoted) {
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
		wp.spares[sp.key] = append(wp.spares[sp.key], sp)
		sp = nil
	}
	wp.mu.Unlock()
	if sp != nil {
		wp.discard(sp)
	}
}

// ids is the runtime ids of the spares waiting in the pool.
func (wp *warmPool) ids() map[string]bool {
	out := map[string]bool{}
	if wp == nil {
		return out
	}
	wp.mu.Lock()
	defer wp.mu.Unlock()
	for _, sps := range wp.spares {
		for _, sp := range sps {
			out[sp.id] = true
		}
	}
	return out
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

// counts is the number of spares waiting for golden creates, and for
// clones and rewinds, per shape.
func (wp *warmPool) counts() (golden, blank map[spareShape]int) {
	golden, blank = map[spareShape]int{}, map[spareShape]int{}
	if wp == nil {
		return golden, blank
	}
	wp.mu.Lock()
	defer wp.mu.Unlock()
	for _, sps := range wp.spares {
		for _, sp := range sps {
			if !sp.shape.Golden {
				blank[sp.shape]++
			} else {
				golden[sp.shape]++
			}
		}
	}
	return golden, blank
}

// refill starts spares in the background until the golden in dir has size
// of them, as far as the memory budget admits them (admitRunning).
func (wp *warmPool) refill(dir string) {
	if wp == nil {
		return
	}
	c, err := readGoldenConfig(dir)
	if err != nil {
		return // gone, or not a golden: the create that asked loads it on the spot
	}
	wp.mu.Lock()
	wp.running[dir] = runningKey{memMiB: c.MemoryMiB, owner: wp.m.goldenOwner(dir)}
	wp.mu.Unlock()
	wp.fill(dir, func(ctx context.Context) (*spare, error) {
		if err := wp.admitRunning(ctx, dir); err != nil {
			return nil, err
		}
		return wp.m.makeGoldenSpare(ctx, dir)
	})
}

// runningKey is what the memory budget knows of a golden's spares.
type runningKey struct {
	memMiB int
	owner  int64
}

// errOverBudget marks a running spare not started for lack of memory
// budget: the pool's, or its owner's memory quota.
var errOverBudget = errors.New("over the memory budget")

// admitRunning decides whether one more running spare of the golden in dir
// (already counted in filling) may start. Running spares, whose guests
// run, together keep within [pool] memory_budget; those of a user's golden
// also keep, with the user's VMs, within the user's memory quota, so that
// promoting goldens cannot run VMMs beyond what the user may run.
func (wp *warmPool) admitRunning(ctx context.Context, dir string) error {
	m := wp.m
	budget := m.cfg.PoolMemoryBudgetMiB(procfs.MeminfoMiB("MemTotal"))
	wp.mu.Lock()
	me := wp.running[dir]
	var total, owners int
	for key, rk := range wp.running {
		n := (len(wp.spares[key]) + wp.filling[key]) * rk.memMiB
		total += n
		if rk.owner == me.owner {
			owners += n
		}
	}
	wp.mu.Unlock()
	if total > budget {
		return fmt.Errorf("%w: running spares would hold %d MiB of guest memory, [pool] memory_budget is %d MiB", errOverBudget, total, budget)
	}
	if me.owner == 0 {
		return nil
	}
	u, err := m.store.UserByID(ctx, me.owner)
	if err != nil {
		return err
	}
	lim := int64(m.cfg.QuotaLimitsFor(u.IsAdmin).MaxMemoryMiB)
	if u.MaxMemoryMiB != nil {
		lim = *u.MaxMemoryMiB
	}
	use, err := m.store.UserUsage(ctx, u.ID)
	if err != nil {
		return err
	}
	if lim > 0 && int64(use.MemoryMiB+owners) > lim {
		return fmt.Errorf("%w: user %s's VMs (%d MiB) and golden spares (%d MiB) would exceed their memory quota of %d MiB", errOverBudget, u.Name, use.MemoryMiB, owners, lim)
	}
	return nil
}

// goldenOwner returns the id of the user whose golden dir is, or 0 for a
// system golden.
func (m *Manager) goldenOwner(dir string) int64 {
	rel, err := filepath.Rel(filepath.Join(m.cfg.StorageDir(), "users"), dir)
	if err != nil || strings.HasPrefix(rel, "..") {
		return 0
	}
	id, _ := strconv.ParseInt(strings.SplitN(rel, string(filepath.Separator), 2)[0], 10, 64)
	return id
}

// refillCheckpoint starts spares for the checkpoint in dir, taken of a VM
// of shape k, and drops the spares of the checkpoint used least recently
// when more than maxCheckpointSpares have them.
func (wp *warmPool) refillCheckpoint(dir string, k spareShape) {
	if wp == nil || wp.size <= 0 {
		return
	}
	var evict []*spare
	wp.mu.Lock()
	for i, key := range wp.recent {
		if key == dir {
			wp.recent = append(wp.recent[:i:i], wp.recent[i+1:]...)
			break
		}
	}
	wp.recent = append(wp.recent, dir)
	for len(wp.recent) > maxCheckpointSpares {
		old := wp.recent[0]
		wp.recent = wp.recent[1:]
		evict = append(evict, wp.spares[old]...)
		delete(wp.spares, old)
	}
	wp.mu.Unlock()
	for _, sp := range evict {
		go wp.discard(sp)
	}
	wp.fill(dir, func(ctx context.Context) (*spare, error) { return wp.m.makeSpare(ctx, dir, k) })
}

// fill starts spares for key in the background until it has size of them.
func (wp *warmPool) fill(key string, make func(context.Context) (*spare, error)) {
	if wp == nil || wp.size <= 0 {
		return
	}
	if _, ok := wp.m.backend.(vmm.Preparer); !ok {
		return
	}
	wp.mu.Lock()
	need := wp.size - len(wp.spares[key]) - wp.filling[key]
	if wp.closed || need <= 0 {
		wp.mu.Unlock()
		return
	}
	wp.filling[key] += need
	gen := wp.gen[key]
	wp.wg.Add(1)
	wp.mu.Unlock()
	go func() {
		defer wp.wg.Done()
		for i := 0; i < need; i++ {
			ctx, cancel := context.WithTimeout(wp.ctx, 2*time.Minute)
			sp, err := make(ctx)
			cancel()
			wp.mu.Lock()
			wp.filling[key]--
			stale := wp.closed || wp.gen[key] != gen
			if err == nil && !stale {
				wp.spares[key] = append(wp.spares[key], sp)
				sp = nil
			}
			if err != nil || stale {
				wp.filling[key] -= need - i - 1
			}
			wp.mu.Unlock()
			if sp != nil {
				wp.discard(sp)
			}
			switch {
			case err != nil && errors.Is(err, errOverBudget):
				wp.m.log.Info("warm pool: no spare started", "for", poolLabel(key), "reason", err)
			case err != nil && !stale:
				wp.m.log.Warn("warm pool: could not prepare a spare", "for", poolLabel(key), "err", err)
			}
			if err != nil || stale {
				return
			}
		}
	}()
}

// poolLabel names a pool key (a snapshot directory) in logs.
func poolLabel(key string) string {
	return filepath.Base(filepath.Dir(key)) + "/" + filepath.Base(key)
}

// drain discards every spare of the snapshot in dir (it was replaced or
// removed), including those still being prepared.
func (wp *warmPool) drain(dir string) {
	if wp == nil {
		return
	}
	wp.mu.Lock()
	sps := wp.spares[dir]
	delete(wp.spares, dir)
	delete(wp.running, dir)
	wp.gen[dir]++
	for i, key := range wp.recent {
		if key == dir {
			wp.recent = append(wp.recent[:i:i], wp.recent[i+1:]...)
			break
		}
	}
	wp.mu.Unlock()
	for _, sp := range sps {
		wp.discard(sp)
	}
}

// close discards every spare, and cancels and waits for the fills in flight.
func (wp *warmPool) close() {
	if wp == nil {
		return
	}
	wp.mu.Lock()
	wp.closed = true
	all := wp.spares
	wp.spares = map[string][]*spare{}
	wp.mu.Unlock()
	wp.cancel()
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
	if sp.agent != nil {
		sp.agent.Close()
	}
	if sp.inst != nil {
		sp.inst.Kill(ctx)
	}
	wp.m.releaseSpareResources(ctx, sp.id, sp.dir)
}

func (m *Manager) releaseSpareResources(ctx context.Context, id, dir string) {
	if m.net != nil {
		m.net.RemoveVM(ctx, id)
	}
	m.releaseSandbox(ctx, id)
	os.RemoveAll(dir)
	os.Remove(filepath.Join(m.runDir(), id+".qmp"))
	os.Remove(filepath.Join(m.runDir(), id+".agent"))
}

// makeGoldenSpare prepares one running spare for the golden in dir.
func (m *Manager) makeGoldenSpare(ctx context.Context, dir string) (*spare, error) {
	bf, err := m.resolveBootFiles()
	if err != nil {
		return nil, err
	}
	l := m.goldenLock(dir)
	l.RLock()
	defer l.RUnlock()
	gc, err := readGoldenConfig(dir)
	if err != nil {
		return nil, err
	}
	k := spareShape{VCPUs: gc.VCPUs, MemoryMiB: gc.MemoryMiB, HasNet: gc.HasNet, Kernel: bf.Kernel, Initrd: bf.Initrd, Golden: true}
	sp, err := m.makeSpare(ctx, dir, k)
	if err != nil {
		return nil, err
	}
	sp.promoted = gc.PromotedAt
	if err := m.startSpare(ctx, sp); err != nil {
		m.pool.discard(sp)
		return nil, err
	}
	m.log.Debug("warm pool: golden spare running", "spare", sp.id, "golden", filepath.Base(dir))
	return sp, nil
}

// startSpare runs a golden spare ahead of its create: it loads the golden's
// state, resumes the guest, connects to its agent (clock and entropy only;
// the identity comes with the create) and runs a few commands, so the
// guest code a create and its first exec need is already translated under
// TCG, and paged in everywhere.
func (m *Manager) startSpare(ctx context.Context, sp *spare) error {
	if _, err := sp.inst.Load(ctx); err != nil {
		return err
	}
	conn, err := sp.inst.DialAgent(ctx)
	if err != nil {
		return err
	}
	c, err := agentclient.Connect(ctx, conn, agentclient.Options{})
	if err != nil {
		conn.Close()
		return fmt.Errorf("connecting to the spare's agent: %w", err)
	}
	if _, err = c.Sync(ctx, spareSync(sp)); err == nil {
		for i := 0; i < 3 && err == nil; i++ {
			err = runQuiet(ctx, c, "true")
		}
	}
	if err != nil {
		c.Close()
		return fmt.Errorf("warming up the spare: %w", err)
	}
	sp.agent = c
	return nil
}

// spareSync is a golden spare's first sync: the host clock and entropy,
// and a placeholder identity (the spare's id as hostname and, with a NIC,
// its own MAC and a link-local address) that the create replaces. Setting
// one ahead of time runs, once, the guest code that a create's identity
// change runs: under TCG that code is translated here instead of during
// the create, which it made 70 ms (hostname) to 170 ms (with a NIC)
// slower. The spare's TAP is not on the bridge, so nothing sees the
// placeholder address.
func spareSync(sp *spare) proto.Sync {
	sync := hostSync()
	sync.Identity = &proto.Identity{Hostname: "spare-" + sp.id}
	if sp.shape.HasNet {
		sync.Identity.MAC = network.MACFor(sp.id).String()
		sync.Identity.IPv4 = "169.254.0.2/16"
		sync.Identity.Gateway = "169.254.0.1"
		sync.Identity.DNS = []string{"169.254.0.1"}
	}
	return sync
}

// runQuiet runs argv through the agent and fails unless it exits 0.
func runQuiet(ctx context.Context, c *agentclient.Client, argv ...string) error {
	p, err := c.Exec(ctx, proto.ExecRequest{Argv: argv})
	if err != nil {
		return err
	}
	done := make(chan struct{})
	go func() { io.Copy(io.Discard, p.Stderr()); close(done) }()
	io.Copy(io.Discard, p.Stdout())
	<-done
	ex, err := p.Wait()
	if err == nil && ex.Code != 0 {
		err = fmt.Errorf("%v exited %d", argv, ex.Code)
	}
	return err
}

// makeSpare prepares one spare for the snapshot in dir: its directory
// under the pool, a TAP when k has a NIC, and a VMM with its files laid
// out, waiting for the snapshot's device state. The snapshot is verified
// first. On any failure it removes everything, the VMM included.
func (m *Manager) makeSpare(ctx context.Context, dir string, k spareShape) (_ *spare, err error) {
	prep, ok := m.backend.(vmm.Preparer)
	if !ok {
		return nil, fmt.Errorf("%w: the %s backend cannot prepare VMMs ahead of time", errdefs.ErrNotImplemented, m.backend.Name())
	}
	if k.HasNet && m.net == nil {
		return nil, fmt.Errorf("%s has a NIC but networking is off", poolLabel(dir))
	}
	if _, err := m.verifySnapshot(ctx, dir, "snapshot "+poolLabel(dir)); err != nil {
		return nil, err
	}
	id := newID(6)
	sp := &spare{id: id, dir: filepath.Join(m.poolDir(), id), key: dir, shape: k}
	if err := os.MkdirAll(sp.dir, 0o700); err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			m.pool.discard(sp)
		}
	}()
	v := &store.VM{ID: id, Name: "spare-" + id, VCPUs: k.VCPUs, MemoryMiB: k.MemoryMiB, Accel: string(m.accel), Kernel: k.Kernel, Initrd: k.Initrd}
	spec := m.spec(v)
	spec.Dir, spec.SerialLog = sp.dir, filepath.Join(sp.dir, "serial.log")
	if k.HasNet {
		tap, err := m.net.PrepareTap(ctx, v.ID)
		if err != nil {
			return nil, err
		}
		spec.Net = &vmm.NetSpec{Tap: tap, MAC: network.MACFor(v.ID).String()}
	}
	if sp.inst, err = prep.Prepare(ctx, spec, dir, m.copier); err != nil {
		return nil, err
	}
	if l, ok := m.backend.(vmm.Layered); ok {
		sp.shape.DiskBytes, _ = l.DiskSize(sp.dir)
	}
	m.log.Debug("warm pool: spare prepared", "spare", sp.id, "snapshot", poolLabel(dir))
	return sp, nil
}

// takeOrMakeSpare returns a spare for the snapshot in dir: one from the
// pool, or one prepared now.
func (m *Manager) takeOrMakeSpare(ctx context.Context, dir string, k spareShape) (*spare, error) {
	if sp := m.pool.take(dir, time.Time{}); sp != nil {
		return sp, nil
	}
	start := time.Now()
	sp, err := m.makeSpare(ctx, dir, k)
	if err != nil {
		return nil, err
	}
	sp.fresh = time.Since(start)
	return sp, nil
}

// errStaleSpare means the golden changed after the spare was made.
var errStaleSpare = errors.New("the warm spare is older than its golden snapshot")

// createFromSpare turns a spare into the user's new VM. It holds the
// golden's read lock throughout, so the golden cannot change between the
// check that the spare still matches it and the state load.
func (m *Manager) createFromSpare(ctx context.Context, u *store.User, p *createParams, bf bootFiles, dir string, sp *spare, start time.Time) (*api.VM, error) {
	l := m.goldenLock(dir)
	l.RLock()
	defer l.RUnlock()
	if gc, err := readGoldenConfig(dir); err != nil || !gc.PromotedAt.Equal(sp.promoted) {
		go m.pool.discard(sp)
		return nil, errStaleSpare
	}
	src := "system"
	if strings.HasPrefix(dir, m.userDir(u.ID)) {
		src = "user"
	}
	reason := "warm spare"
	if sp.agent == nil {
		reason = "prepared now"
	}
	v := &store.VM{
		ID: sp.id, UserID: u.ID, Name: p.name, State: store.StateCreating, VCPUs: p.vcpus, MemoryMiB: p.memMiB,
		VMM: m.backend.Name(), Accel: string(m.accel), BootPath: "golden", BootReason: reason, Kernel: bf.Kernel, Initrd: bf.Initrd,
		Network: p.network, AllowPeers: p.allowPeer, Source: "golden:" + src + ":" + filepath.Base(dir),
	}
	v.DiskBytes = sp.shape.DiskBytes
	return m.startFromSpare(ctx, u, v, sp, start)
}

// shapeOf is the shape of a spare for a snapshot of src.
func shapeOf(src *store.VM) spareShape {
	return spareShape{VCPUs: src.VCPUs, MemoryMiB: src.MemoryMiB, DiskBytes: src.DiskBytes, HasNet: src.Tap != "", Kernel: src.Kernel, Initrd: src.Initrd}
}

// startFromSpare inserts v (whose ID is the spare's), moves the spare's
// directory to v's, loads the snapshot's device state (unless the spare
// runs already) and greets the agent. A spare refused at insert goes back
// to the pool untouched; after that, any failure removes everything.
func (m *Manager) startFromSpare(ctx context.Context, u *store.User, v *store.VM, sp *spare, start time.Time) (*api.VM, error) {
	rt, err := m.insertVM(ctx, u, v, "spare.after-insert")
	if err != nil {
		m.pool.putBack(sp) // untouched: the next create can use it
		return nil, err
	}
	defer rt.op.Unlock()
	log := rt.log
	fail := func(err error) (*api.VM, error) {
		log.Warn("start from a warm spare failed; cleaning up", "err", err)
		cctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		rt.setInstance(sp.inst)
		if sp.agent != nil {
			sp.agent.Close()
		}
		m.destroyVM(cctx, v)
		os.RemoveAll(sp.dir)
		m.metrics.op(v.BootPath, start, err)
		return nil, classifyIOErr("starting "+v.Name, err)
	}
	vdir := m.vmDir(v)
	if err := os.MkdirAll(filepath.Dir(vdir), 0o700); err != nil {
		return fail(err)
	}
	if err := os.Rename(sp.dir, vdir); err != nil {
		return fail(fmt.Errorf("moving the spare into place: %w", err))
	}
	if m.uids != nil {
		if err := m.uids.Rehome(v.ID, vdir); err != nil {
			return fail(err)
		}
	}
	spec := m.spec(v)
	sp.inst.Moved(spec)
	rt.setInstance(sp.inst)
	v.PID = sp.inst.Pid()
	if err := m.store.UpdateVM(ctx, v); err != nil {
		return fail(err)
	}
	netStart := time.Now()
	if err := m.attachNetwork(ctx, v); err != nil {
		return fail(err)
	}
	netDur := time.Since(netStart)
	var t vmm.Timings
	if sp.agent == nil {
		if t, err = sp.inst.Load(ctx); err != nil {
			return fail(err)
		}
	}
	v.StartedAt = time.Now().UTC()
	agentStart := time.Now()
	if sp.agent != nil {
		// A running spare: give it the VM's identity, clock and entropy
		// over the connection it has.
		if err := rt.takeAgent(ctx, sp.agent, v); err != nil {
			return fail(fmt.Errorf("%w: the agent of the warm spare did not sync: %v", errdefs.ErrUnavailable, err))
		}
	} else if _, err := rt.agentClient(ctx, v); err != nil {
		return fail(fmt.Errorf("%w: the agent did not answer after restore: %v", errdefs.ErrUnavailable, err))
	}
	v.State = store.StateRunning
	if err := m.store.UpdateVM(ctx, v); err != nil {
		return fail(err)
	}
	m.metrics.op(v.BootPath, start, nil)
	log.Info("vm started from a warm spare", "path", v.BootPath, "source", v.Source, "ms", ms(time.Since(start)))
	out := m.apiVM(ctx, v)
	out.Timings = &api.Timings{TotalMs: ms(time.Since(start)), SpawnMs: ms(sp.fresh), LoadMs: ms(t.Load), AgentMs: ms(time.Since(agentStart)), NetMs: ms(netDur), WarmSpare: sp.fresh == 0}
	return out, nil
}

// rewindIntoSpare rewinds v to checkpoint c by moving it to a spare
// prepared for c: the checkpoint's device state is loaded into it, vCPUs
// stopped, while the VM still runs; only then is the old VMM killed, the
// VM's runtime id made the spare's, the files moved into the VM's
// directory and the spare resumed.
// A checkpoint that does not load so leaves the VM running as it was. The
// VM keeps its id, name, MAC and IP; its TAP, cgroup, sandbox uid and
// sockets are the spare's from then on. The caller holds the VM's op lock.
func (m *Manager) rewindIntoSpare(ctx context.Context, u *store.User, v *store.VM, c *store.Checkpoint, sp *spare, start time.Time) (*api.VM, error) {
	rt := m.rt(v.ID)
	owned := true // the spare is still ours to discard
	defer func() {
		if owned {
			go m.pool.discard(sp)
		}
	}()
	t, err := sp.inst.LoadPaused(ctx)
	if err != nil {
		m.metrics.op("restore", start, err)
		return nil, errdefs.WithHint(fmt.Errorf("%w: checkpoint %s of vm %q did not load, and the vm keeps running as it was: %v", errdefs.ErrConflict, c.Name, v.Name, err),
			"the checkpoint may be damaged or from another QEMU; `noid logs "+v.Name+"` and the server log say more")
	}
	if err := m.store.SetVMState(ctx, v.ID, store.StateRestoring, "", v.PID); err != nil {
		return nil, err
	}
	kctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	err = rt.kill(kctx)
	cancel()
	if err != nil {
		return nil, err
	}
	crashpoint("restore.after-kill")
	old := m.spec(v)
	os.Remove(filepath.Join(old.RunDir, old.ID+".qmp"))
	os.Remove(filepath.Join(old.RunDir, old.ID+".agent"))
	dead := func(err error) (*api.VM, error) {
		rt.log.Warn("rewind into a warm spare failed", "err", err)
		kctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		rt.kill(kctx)
		cancel()
		m.store.SetVMState(context.Background(), v.ID, store.StateDead, "restore failed: "+err.Error(), 0)
		m.metrics.op("restore", start, err)
		return nil, classifyIOErr("restoring "+v.Name, err)
	}
	// Record the new runtime first: from here a crash leaves a process the
	// next start adopts (and whose files it moves into place), never one
	// nobody knows of.
	v.RuntimeID, v.PID = sp.id, sp.inst.Pid()
	if v.Tap != "" {
		v.Tap = network.TapName(sp.id)
	}
	if err := m.store.UpdateVM(ctx, v); err != nil {
		return dead(err)
	}
	owned = false
	rt.setInstance(sp.inst)
	if err := m.moveSpareFiles(v, sp.dir, old.ID); err != nil {
		return dead(err)
	}
	sp.inst.Moved(m.spec(v))
	crashpoint("restore.spare-after-move")
	if err := m.attachNetwork(ctx, v); err != nil {
		return dead(err)
	}
	resumeStart := time.Now()
	if err := sp.inst.Resume(ctx); err != nil {
		return dead(fmt.Errorf("resuming the rewound vm: %w", err))
	}
	t.Load += time.Since(resumeStart)
	crashpoint("restore.after-spawn")
	return m.finishRewind(ctx, u, v, c, start, "vm rewound into a spare", api.Timings{SpawnMs: ms(sp.fresh), LoadMs: ms(t.Load), WarmSpare: sp.fresh == 0})
}

// moveSpareFiles moves the files of the spare in spDir, which v now runs
// on, into v's directory, and the files of v's previous runtime oldID out
// of the way (removed in the background: freeing a large RAM file's page
// cache and blocks takes longer than the rest of a rewind). The old
// console log is kept at the head of the new one. A rewind calls it, and
// so does start-up for a rewind a crash interrupted after the VM was
// recorded on the spare.
func (m *Manager) moveSpareFiles(v *store.VM, spDir, oldID string) error {
	vdir := m.vmDir(v)
	// One console log: the old one goes into the spare's (still empty)
	// log, which the spare's VMM appends to.
	if err := appendFileTo(filepath.Join(vdir, "serial.log"), filepath.Join(spDir, "serial.log")); err != nil {
		m.log.Warn("keeping the console log across the rewind", "vm", v.Name, "vm_id", v.ID, "err", err)
	}
	trash := filepath.Join(vdir, rewoundPrefix+oldID)
	if err := os.Mkdir(trash, 0o700); err != nil && !os.IsExist(err) {
		return err
	}
	defer func() { go os.RemoveAll(trash) }()
	old, _ := os.ReadDir(vdir)
	for _, e := range old {
		if !strings.HasPrefix(e.Name(), rewoundPrefix) {
			os.Rename(filepath.Join(vdir, e.Name()), filepath.Join(trash, e.Name()))
		}
	}
	ents, err := os.ReadDir(spDir)
	if err != nil {
		return fmt.Errorf("listing the spare's files: %w", err)
	}
	for _, e := range ents {
		if err := os.Rename(filepath.Join(spDir, e.Name()), filepath.Join(vdir, e.Name())); err != nil {
			return fmt.Errorf("moving the spare's %s into place: %w", e.Name(), err)
		}
	}
	go os.RemoveAll(spDir)
	if m.uids != nil {
		if err := m.uids.Rehome(v.Runtime(), vdir); err != nil {
			return err
		}
	}
	return nil
}

// rewoundPrefix names the directory a rewind moves a VM's old files to,
// removed once the rewind is done (or at the next start).
const rewoundPrefix = ".rewound-"

// finishSpareMove completes a rewind into a spare that a crash interrupted
// after the VM was recorded on the spare but before the spare's files were
// moved into the VM's directory. It runs at start-up, before the pool is
// swept (which would kill the spare's VMM).
func (m *Manager) finishSpareMove(v *store.VM) {
	spDir := filepath.Join(m.poolDir(), v.Runtime())
	if v.Runtime() == v.ID {
		return
	}
	if _, err := os.Stat(spDir); err != nil {
		return
	}
	m.log.Warn("finishing a rewind interrupted by a crash: moving the spare's files into place", "vm", v.Name, "vm_id", v.ID, "runtime_id", v.Runtime())
	if err := m.moveSpareFiles(v, spDir, "crash-"+newID(2)); err != nil {
		m.log.Warn("moving a spare's files into place", "vm", v.Name, "vm_id", v.ID, "err", err)
	}
}

// appendFileTo appends the log at src, if any, to the file at dst, from
// its first data on (past a hole that trimming punched, see logs.go).
func appendFileTo(src, dst string) error {
	in, err := openLogTail(src, 0, math.MaxInt64)
	if os.IsNotExist(err) {
		return nil
	} else if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// sweepPool removes spares left by an earlier server: their VMMs are killed
// (found by the process name that carries the spare's random id, so a
// reused pid is never hit, and a VMM whose pid file was never written is
// found too), their TAPs, uid leases and files removed.
func (m *Manager) sweepPool(ctx context.Context) { m.sweepPoolDir(ctx, m.poolDir()) }

// sweepPoolDir kills the spares whose directories are in dir, a pool
// directory (this storage root's, or an earlier one's), and removes them.
func (m *Manager) sweepPoolDir(ctx context.Context, dir string) {
	ents, err := os.ReadDir(dir)
	if err != nil || len(ents) == 0 {
		return
	}
	ids := map[string]bool{}
	for _, e := range ents {
		ids[e.Name()] = true
	}
	procs, _ := os.ReadDir("/proc")
	for _, p := range procs {
		pid, err := strconv.Atoi(p.Name())
		if err != nil {
			continue
		}
		cmd, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if err != nil {
			continue
		}
		if id := vmmProcessID(cmd); id != "" && ids[id] {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	for id := range ids {
		m.releaseSpareResources(ctx, id, filepath.Join(dir, id))
	}
}

// warmUp fills the pool for the system golden snapshots that are fresh.
func (m *Manager) warmUp(ctx context.Context) {
	if m.pool == nil || m.pool.size <= 0 {
		return
	}
	if _, ok := m.backend.(vmm.Preparer); !ok {
		return
	}
	bf, err := m.resolveBootFiles()
	if err != nil {
		return
	}
	ents, _ := os.ReadDir(m.systemGoldenRoot())
	for _, e := range ents {
		d := filepath.Join(m.systemGoldenRoot(), e.Name())
		if gc, err := readGoldenConfig(d); err == nil && m.staleReason(ctx, gc, bf) == "" && (!gc.HasNet || m.net != nil) {
			m.pool.refill(d)
		}
	}
}
