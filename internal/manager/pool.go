package manager

import (
	"bytes"
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
	"github.com/noid-vm/noid/internal/store"
	"github.com/noid-vm/noid/internal/vmm"
)

// The warm pool keeps VMMs started ahead of time for golden snapshots: each
// spare already has its own copy of the golden's memory and disk, its TAP,
// its sandbox and a VMM that has loaded the golden's state and runs, with a
// warmed-up agent connection. A golden create that finds a spare only moves
// the spare's directory to the new VM and syncs the VM's identity, clock
// and entropy; the process start, the copies and the state load are off
// its critical path. Spares are not VMs: they belong to no
// user, are killed on shutdown and swept at start-up.

//
// Clones get spares too: a blank spare has empty memory and disk files of
// the right sizes and a VMM that waits for state; a clone copies (reflinks
// where it can) the checkpoint's memory and disk into those files, then
// loads the device state. Blank spares are kept per shape (vCPUs, memory,
// disk size, NIC, kernel), for the few shapes used last.

// spare is one prepared VMM.
type spare struct {
	id  string
	dir string
	// key is the pool it belongs to: a golden directory, or (for a blank
	// spare) its shape's String.
	key string
	// shape is the VM shape its VMM was started for.
	shape    shapeKey
	promoted time.Time
	inst     vmm.Prepared
	// agent is set for a golden spare that already runs: its state is
	// loaded, its guest resumed and warmed up, and this is its agent
	// connection. A create then only applies the VM's identity.
	agent *agentclient.Client
}

// blank reports whether the spare waits for state (for a clone or rewind)
// rather than running a golden's.
func (sp *spare) blank() bool { return sp.key == sp.shape.String() }

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

// maxShapes bounds how many clone shapes keep blank spares.
const maxShapes = 4

// warmPool holds the spares, per golden directory or clone shape.
type warmPool struct {
	m       *Manager
	size    int
	mu      sync.Mutex
	spares  map[string][]*spare
	filling map[string]int
	// shapes is the clone shapes with blank spares, most recent last.
	shapes []string
	closed bool
	wg     sync.WaitGroup
}

func newWarmPool(m *Manager, size int) *warmPool {
	return &warmPool{m: m, size: size, spares: map[string][]*spare{}, filling: map[string]int{}}
}

// shapeKey is what a blank spare must match for a clone of a snapshot.
type shapeKey struct {
	VCPUs, MemoryMiB int
	DiskBytes        int64
	HasNet           bool
	Kernel, Initrd   string
}

func (k shapeKey) String() string {
	return fmt.Sprintf("shape:%d:%d:%d:%t:%s:%s", k.VCPUs, k.MemoryMiB, k.DiskBytes, k.HasNet, k.Kernel, k.Initrd)
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
// clones and rewinds per shape.
func (wp *warmPool) counts() (golden int, shapes map[shapeKey]int) {
	shapes = map[shapeKey]int{}
	if wp == nil {
		return 0, shapes
	}
	wp.mu.Lock()
	defer wp.mu.Unlock()
	for _, sps := range wp.spares {
		for _, sp := range sps {
			if sp.blank() {
				shapes[sp.shape]++
			} else {
				golden++
			}
		}
	}
	return golden, shapes
}

// refill starts spares in the background until the golden in dir has size
// of them.
func (wp *warmPool) refill(dir string) {
	wp.fill(dir, func(ctx context.Context) (*spare, error) { return wp.m.makeSpare(ctx, dir) })
}

// refillShape starts blank spares for clones of shape k, and drops the
// spares of the shape used least recently when more than maxShapes have them.
func (wp *warmPool) refillShape(k shapeKey) {
	if wp == nil || wp.size <= 0 {
		return
	}
	key := k.String()
	var evict []*spare
	wp.mu.Lock()
	for i, sk := range wp.shapes {
		if sk == key {
			wp.shapes = append(wp.shapes[:i:i], wp.shapes[i+1:]...)
			break
		}
	}
	wp.shapes = append(wp.shapes, key)
	for len(wp.shapes) > maxShapes {
		old := wp.shapes[0]
		wp.shapes = wp.shapes[1:]
		evict = append(evict, wp.spares[old]...)
		delete(wp.spares, old)
	}
	wp.mu.Unlock()
	for _, sp := range evict {
		go wp.discard(sp)
	}
	wp.fill(key, func(ctx context.Context) (*spare, error) { return wp.m.makeBlankSpare(ctx, k) })
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
	wp.wg.Add(1)
	wp.mu.Unlock()
	go func() {
		defer wp.wg.Done()
		for i := 0; i < need; i++ {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			sp, err := make(ctx)
			cancel()
			wp.mu.Lock()
			wp.filling[key]--
			if err == nil && !wp.closed {
				wp.spares[key] = append(wp.spares[key], sp)
				sp = nil
			}
			wp.mu.Unlock()
			if sp != nil {
				wp.discard(sp)
			}
			if err != nil {
				wp.m.log.Warn("warm pool: could not prepare a spare", "for", poolLabel(key), "err", err)
				wp.mu.Lock()
				wp.filling[key] -= need - i - 1
				wp.mu.Unlock()
				return
			}
		}
	}()
}

// poolLabel names a pool key in logs: a golden's directory name or a shape.
func poolLabel(key string) string {
	if strings.HasPrefix(key, "shape:") {
		return key
	}
	return "golden " + filepath.Base(key)
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
	if m.uids != nil {
		m.uids.Release(id)
	}
	os.RemoveAll(dir)
	os.Remove(filepath.Join(m.runDir(), id+".qmp"))
	os.Remove(filepath.Join(m.runDir(), id+".agent"))
}

// makeSpare prepares one spare for the golden in dir.
func (m *Manager) makeSpare(ctx context.Context, dir string) (*spare, error) {
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
	if _, err := m.verifySnapshot(ctx, dir, "golden snapshot "+filepath.Base(dir)); err != nil {
		return nil, err
	}
	k := shapeKey{VCPUs: gc.VCPUs, MemoryMiB: gc.MemoryMiB, HasNet: gc.HasNet, Kernel: bf.Kernel, Initrd: bf.Initrd}
	sp, err := m.newSpare(ctx, dir, k, func(sdir string) error {
		if err := m.copier.CopyFile(ctx, filepath.Join(dir, vmm.SnapMemory), filepath.Join(sdir, "mem.raw")); err != nil {
			return err
		}
		return m.copier.CopyFile(ctx, filepath.Join(dir, vmm.SnapDisk), filepath.Join(sdir, "disk.ext4"))
	})
	if err != nil {
		return nil, err
	}
	sp.promoted = gc.PromotedAt
	if err := m.startSpare(ctx, sp, dir); err != nil {
		m.pool.discard(sp)
		return nil, err
	}
	m.log.Debug("warm pool: spare ready", "spare", sp.id, "golden", filepath.Base(dir))
	return sp, nil
}

// startSpare runs a golden spare ahead of its create: it loads the golden's
// state, resumes the guest, connects to its agent (clock and entropy only;
// the identity comes with the create) and runs a few commands, so the
// guest code a create and its first exec need is already translated under
// TCG, and paged in everywhere.
func (m *Manager) startSpare(ctx context.Context, sp *spare, dir string) error {
	if _, err := sp.inst.Load(ctx, dir); err != nil {
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

// makeBlankSpare prepares one spare for clones of shape k: empty memory and
// disk files of the right sizes, filled by the clone that takes it.
func (m *Manager) makeBlankSpare(ctx context.Context, k shapeKey) (*spare, error) {
	sp, err := m.newSpare(ctx, k.String(), k, func(sdir string) error {
		if err := createSparse(filepath.Join(sdir, "mem.raw"), int64(k.MemoryMiB)<<20); err != nil {
			return err
		}
		return createSparse(filepath.Join(sdir, "disk.ext4"), k.DiskBytes)
	})
	if err != nil {
		return nil, err
	}
	m.log.Debug("warm pool: blank spare ready", "spare", sp.id, "shape", sp.key)
	return sp, nil
}

// newSpare makes a spare for the pool key with the shape k: its directory
// under the pool, the memory and disk files that files puts there (with
// their final sizes), a TAP when k has a NIC, and a VMM prepared for state.
// On any failure it removes everything, the VMM included.
func (m *Manager) newSpare(ctx context.Context, key string, k shapeKey, files func(sdir string) error) (_ *spare, err error) {
	prep, ok := m.backend.(vmm.Preparer)
	if !ok {
		return nil, fmt.Errorf("%w: the %s backend cannot prepare VMMs ahead of time", errdefs.ErrNotImplemented, m.backend.Name())
	}
	if k.HasNet && m.net == nil {
		return nil, fmt.Errorf("%s has a NIC but networking is off", poolLabel(key))
	}
	id := newID(6)
	sp := &spare{id: id, dir: filepath.Join(m.poolDir(), id), key: key, shape: k}
	if err := os.MkdirAll(sp.dir, 0o700); err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			m.pool.discard(sp)
		}
	}()
	if err := files(sp.dir); err != nil {
		return nil, err
	}
	v := &store.VM{ID: id, Name: "spare-" + id, VCPUs: k.VCPUs, MemoryMiB: k.MemoryMiB, Accel: string(m.accel), Kernel: k.Kernel, Initrd: k.Initrd}
	if sp.inst, err = m.prepareSpare(ctx, prep, v, sp.dir, k.HasNet); err != nil {
		return nil, err
	}
	return sp, nil
}

// createSparse creates path as a file of size bytes that holds no data.
func createSparse(path string, size int64) error {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		return fmt.Errorf("sizing %s: %w", path, err)
	}
	return f.Close()
}

// prepareSpare starts the VMM of a spare whose files are in sdir.
func (m *Manager) prepareSpare(ctx context.Context, prep vmm.Preparer, v *store.VM, sdir string, hasNet bool) (vmm.Prepared, error) {
	spec := m.spec(v)
	spec.Dir = sdir
	spec.Disk, spec.MemFile, spec.SerialLog = filepath.Join(sdir, "disk.ext4"), filepath.Join(sdir, "mem.raw"), filepath.Join(sdir, "serial.log")
	if hasNet {
		tap, err := m.net.PrepareTap(ctx, v.ID)
		if err != nil {
			return nil, err
		}
		spec.Net = &vmm.NetSpec{Tap: tap, MAC: network.MACFor(v.ID).String()}
	}
	return prep.Prepare(ctx, spec)
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
	v := &store.VM{
		ID: sp.id, UserID: u.ID, Name: p.name, State: store.StateCreating, VCPUs: p.vcpus, MemoryMiB: p.memMiB,
		VMM: m.backend.Name(), Accel: string(m.accel), BootPath: "golden", BootReason: "warm spare", Kernel: bf.Kernel, Initrd: bf.Initrd,
		Network: p.network, AllowPeers: p.allowPeer, Source: "golden:" + src + ":" + filepath.Base(dir),
	}
	if fi, err := os.Stat(filepath.Join(sp.dir, "disk.ext4")); err == nil {
		v.DiskBytes = fi.Size()
	}
	return m.startFromSpare(ctx, u, v, dir, sp, false, start)
}

// cloneKey is the shape of blank spare that a clone of the snapshot in dir,
// taken from src, needs.
func cloneKey(src *store.VM, dir string) (shapeKey, error) {
	fi, err := os.Stat(filepath.Join(dir, vmm.SnapDisk))
	if err != nil {
		return shapeKey{}, err
	}
	return shapeKey{VCPUs: src.VCPUs, MemoryMiB: src.MemoryMiB, DiskBytes: fi.Size(), HasNet: src.Tap != "", Kernel: src.Kernel, Initrd: src.Initrd}, nil
}

// startFromSpare inserts v (whose ID is the spare's), moves the spare's
// directory to v's, fills its files from the snapshot in dir when fill is
// set (a blank spare), loads the snapshot's device state and greets the
// agent. A spare refused at insert goes back to the pool untouched; after
// that, any failure removes everything.
func (m *Manager) startFromSpare(ctx context.Context, u *store.User, v *store.VM, dir string, sp *spare, fill bool, start time.Time) (*api.VM, error) {
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
	var copyDur time.Duration
	if fill {
		copyStart := time.Now()
		if err := m.fillSpare(ctx, dir, spec.MemFile, spec.Disk); err != nil {
			return fail(err)
		}
		copyDur = time.Since(copyStart)
	}
	netStart := time.Now()
	if err := m.attachNetwork(ctx, v); err != nil {
		return fail(err)
	}
	netDur := time.Since(netStart)
	var t vmm.Timings
	if sp.agent == nil {
		if t, err = sp.inst.Load(ctx, dir); err != nil {
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
	out.Timings = &api.Timings{TotalMs: ms(time.Since(start)), CopyMs: ms(copyDur), LoadMs: ms(t.Load), AgentMs: ms(time.Since(agentStart)), NetMs: ms(netDur), WarmSpare: true}
	return out, nil
}

// rewindIntoSpare rewinds v to checkpoint c (files in dir) by moving it to
// a blank spare: the checkpoint's memory and disk are copied into the
// spare's files and its device state loaded, vCPUs stopped, while the VM
// still runs; only then is the old VMM killed, the VM's runtime id made the
// spare's, the files moved into the VM's directory and the spare resumed.
// A checkpoint that does not load so leaves the VM running as it was. The
// VM keeps its id, name, MAC and IP; its TAP, cgroup, sandbox uid and
// sockets are the spare's from then on. The caller holds the VM's op lock.
func (m *Manager) rewindIntoSpare(ctx context.Context, u *store.User, v *store.VM, c *store.Checkpoint, dir string, sp *spare, start time.Time) (*api.VM, error) {
	rt := m.rt(v.ID)
	owned := true // the spare is still ours to discard
	defer func() {
		if owned {
			go m.pool.discard(sp)
		}
	}()
	copyStart := time.Now()
	if err := m.fillSpare(ctx, dir, filepath.Join(sp.dir, "mem.raw"), filepath.Join(sp.dir, "disk.ext4")); err != nil {
		m.metrics.op("restore", start, err)
		return nil, classifyIOErr("restoring "+v.Name, err) // the VM was not touched
	}
	copyDur := time.Since(copyStart)
	t, err := sp.inst.LoadPaused(ctx, dir)
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
	return m.finishRewind(ctx, u, v, c, start, "vm rewound into a warm spare", api.Timings{CopyMs: ms(copyDur), LoadMs: ms(t.Load), WarmSpare: true})
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
	trash := filepath.Join(vdir, ".rewound-"+oldID)
	if err := os.Mkdir(trash, 0o700); err != nil && !os.IsExist(err) {
		return err
	}
	defer func() { go os.RemoveAll(trash) }()
	for _, name := range []string{"mem.raw", "disk.ext4", "serial.log", "qemu.pid"} {
		os.Rename(filepath.Join(vdir, name), filepath.Join(trash, name))
		if err := os.Rename(filepath.Join(spDir, name), filepath.Join(vdir, name)); err != nil && !os.IsNotExist(err) {
			return fmt.Errorf("moving the spare's %s into place: %w", name, err)
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

// fillSpare copies (reflinks where it can) the memory and disk of the
// snapshot in dir into a blank spare's memory file mem and disk file disk.
func (m *Manager) fillSpare(ctx context.Context, dir, mem, disk string) error {
	if err := m.copier.CopyInto(ctx, filepath.Join(dir, vmm.SnapMemory), mem); err != nil {
		return err
	}
	return m.copier.CopyInto(ctx, filepath.Join(dir, vmm.SnapDisk), disk)
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
func (m *Manager) sweepPool(ctx context.Context) {
	ents, err := os.ReadDir(m.poolDir())
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
		if i := bytes.Index(cmd, []byte("noid-")); i >= 0 {
			rest := cmd[i+len("noid-"):]
			if j := bytes.IndexByte(rest, ','); j > 0 && ids[string(rest[:j])] {
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	}
	for id := range ids {
		m.releaseSpareResources(ctx, id, filepath.Join(m.poolDir(), id))
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
