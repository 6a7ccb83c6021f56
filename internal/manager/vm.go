package manager

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/noid-vm/noid/internal/agent/client"
	"github.com/noid-vm/noid/internal/api"
	"github.com/noid-vm/noid/internal/config"
	"github.com/noid-vm/noid/internal/errdefs"
	"github.com/noid-vm/noid/internal/store"
	"github.com/noid-vm/noid/internal/vmm"
	"github.com/noid-vm/noid/internal/vmm/firecracker"
)

// vmRT is the server's in-memory handle on one VM: its VMM instance and
// agent connection. The DB row stays the source of truth for metadata.
type vmRT struct {
	m  *Manager
	id string

	// op serialises lifecycle operations (checkpoint, restore, destroy).
	op sync.Mutex

	mu       sync.Mutex
	inst     vmm.Instance
	agent    *client.Client
	agentMu  sync.Mutex // serialises connecting
	stopping bool       // an intended kill is in progress: don't mark dead
	startAt  time.Time
	log      *slog.Logger
}

func newID(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

func (m *Manager) rt(id string) *vmRT {
	m.mu.Lock()
	defer m.mu.Unlock()
	rt := m.vms[id]
	if rt == nil {
		rt = &vmRT{m: m, id: id, log: m.log.With("vm_id", id)}
		m.vms[id] = rt
	}
	return rt
}

func (m *Manager) dropRT(id string) {
	m.mu.Lock()
	delete(m.vms, id)
	m.mu.Unlock()
}

// lookupRT returns the runtime of VM id, or nil when the manager has none:
// every VM in the store has one, so nil means it was destroyed.
func (m *Manager) lookupRT(id string) *vmRT {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.vms[id]
}

// forgetRT drops rt when it is still the runtime of its VM id (a request
// that lost a race to the VM's destroy made it again).
func (m *Manager) forgetRT(rt *vmRT) {
	m.mu.Lock()
	if m.vms[rt.id] == rt {
		delete(m.vms, rt.id)
	}
	m.mu.Unlock()
}

// lockVM takes the op lock of v's runtime and reads v again, as it is once
// the lock is held, by id: a VM of the same name made after a destroy is
// another VM. When v is gone (a destroy held the lock), it returns
// ErrNotFound with the lock released and no runtime kept for v.
func (m *Manager) lockVM(ctx context.Context, v *store.VM) (*vmRT, *store.VM, error) {
	rt := m.rt(v.ID)
	rt.op.Lock()
	cur, err := m.store.GetVMByID(ctx, v.ID)
	if err != nil {
		rt.op.Unlock()
		if errors.Is(err, errdefs.ErrNotFound) {
			m.forgetRT(rt)
			return nil, nil, errdefs.WithHint(fmt.Errorf("vm %q: %w", v.Name, errdefs.ErrNotFound), "noid list")
		}
		return nil, nil, fmt.Errorf("reading vm %s: %w", v.Name, err)
	}
	return rt, cur, nil
}

// instance returns the running instance or ErrNotRunning.
func (rt *vmRT) instance() (vmm.Instance, error) {
	rt.mu.Lock()
	defer rt.mu.Unlock()
	if rt.inst == nil {
		return nil, errdefs.WithHint(errdefs.ErrNotRunning, "noid info <vm> shows why; destroy it or restore a checkpoint")
	}
	select {
	case <-rt.inst.Done():
		return nil, errdefs.WithHint(errdefs.ErrNotRunning, "its VMM process exited; destroy it or restore a checkpoint")
	default:
	}
	return rt.inst, nil
}

// setInstance installs inst and starts watching it for an unexpected exit.
func (rt *vmRT) setInstance(inst vmm.Instance) {
	rt.mu.Lock()
	old := rt.inst
	rt.inst = inst
	rt.stopping = false
	rt.startAt = time.Now()
	rt.mu.Unlock()
	if old != nil && old != inst {
		old.Close()
	}
	go rt.watch(inst)
}

func (rt *vmRT) watch(inst vmm.Instance) {
	<-inst.Done()
	rt.mu.Lock()
	current := rt.inst == inst
	intended := rt.stopping
	ag := rt.agent
	if current {
		rt.agent = nil
	}
	rt.mu.Unlock()
	if !current || intended {
		return
	}
	if ag != nil {
		ag.Close()
	}
	select {
	case <-rt.m.closed:
		return
	default:
	}
	rt.log.Warn("vmm process exited unexpectedly", "pid", inst.Pid())
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if v, err := rt.m.store.GetVMByID(ctx, rt.id); err == nil && v.State == store.StateRunning {
		rt.m.store.SetVMState(ctx, rt.id, store.StateDead, "vmm process exited unexpectedly", 0)
		rt.m.metrics.vmDied()
	}
}

// kill stops the instance on purpose (destroy, restore).
func (rt *vmRT) kill(ctx context.Context) error {
	rt.mu.Lock()
	inst := rt.inst
	ag := rt.agent
	rt.agent = nil
	rt.stopping = true
	rt.mu.Unlock()
	if ag != nil {
		ag.Close()
	}
	if inst == nil {
		return nil
	}
	return inst.Kill(ctx)
}

// release drops host-side handles without stopping the VM (server shutdown).
func (rt *vmRT) release() {
	rt.mu.Lock()
	inst, ag := rt.inst, rt.agent
	rt.stopping = true
	rt.agent = nil
	rt.mu.Unlock()
	if ag != nil {
		ag.Close()
	}
	if inst != nil {
		inst.Close()
	}
}

// spec builds the VMM spec of a stored VM.
func (m *Manager) spec(v *store.VM) vmm.Spec {
	dir := m.vmDir(v)
	sp := vmm.Spec{
		ID:        v.Runtime(),
		Name:      v.Name,
		Dir:       dir,
		RunDir:    m.runDir(),
		VCPUs:     v.VCPUs,
		MemoryMiB: v.MemoryMiB,
		Kernel:    v.Kernel,
		Initrd:    v.Initrd,
		Disk:      filepath.Join(dir, "disk.ext4"),
		MemFile:   filepath.Join(dir, "mem.raw"),
		Accel:     vmm.Accel(v.Accel),
		SerialLog: filepath.Join(dir, "serial.log"),
	}
	if v.Tap != "" {
		sp.Net = &vmm.NetSpec{Tap: v.Tap, MAC: v.MAC}
	}
	sp.Sandbox = m.sandboxSpec(v)
	return sp
}

// bootFiles are the kernel, initrd and base rootfs new VMs use.
type bootFiles struct {
	Kernel, Initrd, Rootfs string
}

func (m *Manager) resolveBootFiles() (bootFiles, error) {
	bf := bootFiles{Kernel: m.cfg.Kernel, Initrd: m.cfg.Initrd, Rootfs: m.cfg.Rootfs}
	if bf.Kernel == "" || bf.Initrd == "" || bf.Rootfs == "" {
		img, err := loadImage(m.cfg)
		if err != nil {
			return bf, err
		}
		if bf.Kernel == "" {
			bf.Kernel = img.Kernel
			if m.backend.Name() == firecracker.BackendName {
				bf.Kernel = img.Vmlinux // Firecracker boots an ELF vmlinux
			}
		}
		if bf.Initrd == "" {
			bf.Initrd = img.Initrd
		}
		if bf.Rootfs == "" {
			bf.Rootfs = img.Rootfs
		}
	}
	for _, f := range []struct{ key, path string }{{"kernel", bf.Kernel}, {"initrd", bf.Initrd}, {"rootfs", bf.Rootfs}} {
		if _, err := os.Stat(f.path); err != nil {
			return bf, errdefs.WithHint(fmt.Errorf("%w: %s %s is missing", errdefs.ErrUnavailable, f.key, f.path),
				"run `noid-server image build` or set "+f.key+" in the config")
		}
	}
	return bf, nil
}

// createParams is a validated create request.
type createParams struct {
	user      *store.User
	name      string
	vcpus     int
	memMiB    int
	diskBytes int64
	network   string
	allowPeer bool
	noWait    bool
	coldBoot  bool
}

func (m *Manager) validateCreate(u *store.User, req api.CreateVMRequest) (*createParams, error) {
	if err := api.ValidateVMName(req.Name); err != nil {
		return nil, err
	}
	p := &createParams{user: u, name: req.Name, vcpus: req.VCPUs, memMiB: req.MemoryMiB, network: req.Network,
		allowPeer: req.AllowPeers, noWait: req.NoWait, coldBoot: req.ColdBoot}
	if p.vcpus == 0 {
		p.vcpus = m.cfg.DefaultVCPUs
	}
	if p.memMiB == 0 {
		p.memMiB = m.cfg.DefaultMemoryMiB
	}
	maxV, maxM := hostLimits()
	if p.vcpus < 1 || p.vcpus > maxV {
		return nil, fmt.Errorf("%w: vcpus must be between 1 and %d (this host's CPU count), got %d", errdefs.ErrInvalidArgument, maxV, p.vcpus)
	}
	if p.memMiB < 64 || p.memMiB > maxM {
		return nil, fmt.Errorf("%w: memory must be between 64 and %d MiB (this host's RAM), got %d", errdefs.ErrInvalidArgument, maxM, p.memMiB)
	}
	disk := req.DiskSize
	if disk == "" {
		disk = m.cfg.DefaultDiskSize
	}
	if disk != "" {
		n, err := config.ParseSize(disk)
		if err != nil {
			return nil, fmt.Errorf("%w: disk size: %v", errdefs.ErrInvalidArgument, err)
		}
		if n < 64<<20 || n > 16<<40 {
			return nil, fmt.Errorf("%w: disk size must be between 64M and 16T, got %s", errdefs.ErrInvalidArgument, disk)
		}
		if max := m.cfg.QuotaLimitsFor(u.IsAdmin).MaxDiskBytes; max > 0 && n > max {
			return nil, errdefs.WithHint(fmt.Errorf("%w: a VM's disk may be at most %s, asked for %s", errdefs.ErrQuotaExceeded, humanBytes(max), disk),
				"ask for a smaller --disk-size, or ask the admin to raise [quota] max_disk_size")
		}
		p.diskBytes = n
	}
	switch p.network {
	case "", "default":
		p.network = "default"
		if !m.cfg.NetworkEnabled() {
			p.network = "none"
		}
	case "none":
	default:
		return nil, fmt.Errorf("%w: network must be \"default\" or \"none\", got %q", errdefs.ErrInvalidArgument, p.network)
	}
	return p, nil
}

// insertVM records v, a new VM in state creating, after checking the
// free space reserve, with the user's quota checked and (with networking)
// its address allocated in the same transaction, then reaches crash point point. It returns v's runtime with
// its logger set and its op lock held: the caller unlocks it.
func (m *Manager) insertVM(ctx context.Context, u *store.User, v *store.VM, point string) (*vmRT, error) {
	if err := m.checkFreeSpace("creating vm " + v.Name); err != nil {
		return nil, err
	}
	opts := store.CreateOpts{CheckQuota: m.checkQuota(u, 1, v.VCPUs, v.MemoryMiB)}
	m.prepareNetwork(v, &opts)
	if err := m.store.CreateVM(ctx, v, opts); err != nil {
		return nil, err
	}
	crashpoint(point)
	rt := m.rt(v.ID)
	rt.log = m.log.With("vm", v.Name, "vm_id", v.ID, "user", u.Name)
	rt.op.Lock()
	return rt, nil
}

func (m *Manager) checkQuota(u *store.User, addVMs, addVCPUs, addMem int) func(store.Usage) error {
	lim := func(override *int64, def int) int64 {
		if override != nil {
			return *override
		}
		return int64(def)
	}
	q := m.cfg.QuotaLimitsFor(u.IsAdmin)
	return func(use store.Usage) error {
		if n := lim(u.MaxVMs, q.MaxVMs); n > 0 && int64(use.VMs+addVMs) > n {
			return fmt.Errorf("%w: user %s may have at most %d VMs (has %d)", errdefs.ErrQuotaExceeded, u.Name, n, use.VMs)
		}
		if n := lim(u.MaxVCPUs, q.MaxVCPUs); n > 0 && int64(use.VCPUs+addVCPUs) > n {
			return fmt.Errorf("%w: user %s may use at most %d vCPUs in total (uses %d, asked for %d more)", errdefs.ErrQuotaExceeded, u.Name, n, use.VCPUs, addVCPUs)
		}
		if n := lim(u.MaxMemoryMiB, q.MaxMemoryMiB); n > 0 && int64(use.MemoryMiB+addMem) > n {
			return fmt.Errorf("%w: user %s may use at most %d MiB of memory in total (uses %d, asked for %d more)", errdefs.ErrQuotaExceeded, u.Name, n, use.MemoryMiB, addMem)
		}
		return nil
	}
}

// CreateVM creates and boots a VM and, unless NoWait, waits for its agent.
func (m *Manager) CreateVM(ctx context.Context, u *store.User, req api.CreateVMRequest) (*api.VM, error) {
	p, err := m.validateCreate(u, req)
	if err != nil {
		return nil, err
	}
	if err := m.checkHostMemory(p.memMiB); err != nil {
		return nil, err
	}
	if err := m.backend.Check(ctx); err != nil {
		return nil, err
	}
	start := time.Now()
	bf, err := m.resolveBootFiles()
	if err != nil {
		return nil, err
	}
	var warnings []string
	reason := "custom disk size"
	if p.diskBytes == 0 {
		var dir string
		dir, reason = m.pickGolden(ctx, u, p, bf)
		if dir != "" {
			return m.createFromGolden(ctx, u, p, bf, dir, start)
		}
		if strings.Contains(reason, "stale") || strings.Contains(reason, "made with") {
			m.log.Warn("not using golden snapshot", "user", u.Name, "vm", p.name, "reason", reason)
			warnings = append(warnings, reason+"; cold-booting")
		}
	}
	v := &store.VM{
		ID: newID(6), UserID: u.ID, Name: p.name, State: store.StateCreating, VCPUs: p.vcpus, MemoryMiB: p.memMiB,
		VMM: m.backend.Name(), Accel: string(m.accel), BootPath: "cold", BootReason: reason, Kernel: bf.Kernel, Initrd: bf.Initrd,
		Network: p.network, AllowPeers: p.allowPeer,
	}
	rt, err := m.insertVM(ctx, u, v, "create.after-insert")
	if err != nil {
		return nil, err
	}
	defer rt.op.Unlock()
	log := rt.log

	fail := func(err error) (*api.VM, error) {
		log.Warn("create failed; cleaning up", "err", err)
		cctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		m.destroyVM(cctx, v)
		m.metrics.op("create", start, err)
		return nil, err
	}

	dir := m.vmDir(v)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fail(fmt.Errorf("creating vm dir: %w", err))
	}
	sp := m.spec(v)
	if l, ok := m.backend.(vmm.Layered); ok {
		// The disk is a new top over the pinned base image: nothing is
		// copied unless the VM asked for a larger disk.
		base, err := m.pinBase(ctx, bf.Rootfs)
		if err != nil {
			return fail(err)
		}
		if err := l.NewDisk(ctx, dir, base, p.diskBytes, m.copier); err != nil {
			return fail(classifyIOErr("laying out the disk", err))
		}
		v.DiskBytes, _ = l.DiskSize(dir)
	} else {
		if err := m.copier.CopyFile(ctx, bf.Rootfs, sp.Disk); err != nil {
			return fail(fmt.Errorf("copying rootfs: %w", err))
		}
		if p.diskBytes > 0 {
			if err := growDisk(ctx, sp.Disk, p.diskBytes); err != nil {
				return fail(err)
			}
		}
		if fi, err := os.Stat(sp.Disk); err == nil {
			v.DiskBytes = fi.Size()
		}
	}
	netStart := time.Now()
	if err := m.attachNetwork(ctx, v); err != nil {
		return fail(err)
	}
	netDur := time.Since(netStart)
	sp = m.spec(v)
	inst, err := m.backend.Boot(ctx, sp)
	if err != nil {
		return fail(err)
	}
	rt.setInstance(inst)
	v.PID = inst.Pid()
	v.StartedAt = time.Now().UTC()
	crashpoint("create.after-boot")
	if p.noWait {
		v.State = store.StateRunning
		if err := m.store.UpdateVM(ctx, v); err != nil {
			return fail(err)
		}
		m.metrics.op("create", start, nil)
		log.Info("vm created (not waiting for agent)", "pid", v.PID)
		out := m.apiVM(ctx, v)
		out.Warnings = warnings
		out.Timings = &api.Timings{TotalMs: ms(time.Since(start)), NetMs: ms(netDur)}
		go m.connectAgentAsync(v.ID)
		return out, nil
	}
	// Record the pid before waiting, so a crash now leaves a VM that the
	// next server can clean up.
	if err := m.store.UpdateVM(ctx, v); err != nil {
		return fail(err)
	}
	agentStart := time.Now()
	if _, err := rt.agentClient(ctx, v); err != nil {
		return fail(fmt.Errorf("%w: the vm's agent did not answer: %v%s", errdefs.ErrUnavailable, err, m.serialTail(v)))
	}
	crashpoint("create.before-running")
	v.State = store.StateRunning
	if err := m.store.UpdateVM(ctx, v); err != nil {
		return fail(err)
	}
	m.metrics.op("create", start, nil)
	log.Info("vm created", "pid", v.PID, "boot", v.BootPath, "ms", ms(time.Since(start)))
	out := m.apiVM(ctx, v)
	out.Warnings = warnings
	out.Timings = &api.Timings{TotalMs: ms(time.Since(start)), AgentMs: ms(time.Since(agentStart)), NetMs: ms(netDur)}
	return out, nil
}

func (m *Manager) connectAgentAsync(id string) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	v, err := m.store.GetVMByID(ctx, id)
	if err != nil {
		return
	}
	m.rt(id).agentClient(ctx, v)
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// serialTail returns the end of the VM's serial log for error messages.
func (m *Manager) serialTail(v *store.VM) string {
	b, err := readLogTail(filepath.Join(m.vmDir(v), "serial.log"), 1500)
	if err != nil || len(b) == 0 {
		return ""
	}
	return "\n--- last lines of the serial console ---\n" + strings.TrimSpace(string(b))
}

// growDisk enlarges a raw ext4 image and its filesystem.
func growDisk(ctx context.Context, path string, size int64) error {
	fi, err := os.Stat(path)
	if err != nil {
		return err
	}
	if size < fi.Size() {
		return fmt.Errorf("%w: disk size %d is smaller than the image (%d bytes)", errdefs.ErrInvalidArgument, size, fi.Size())
	}
	if size == fi.Size() {
		return nil
	}
	if err := os.Truncate(path, size); err != nil {
		return fmt.Errorf("growing disk: %w", err)
	}
	out, err := exec.CommandContext(ctx, "resize2fs", "-f", path).CombinedOutput()
	if err != nil {
		return fmt.Errorf("resizing filesystem (resize2fs from e2fsprogs): %v: %s", err, strings.TrimSpace(string(out)))
	}
	return nil
}

// destroyVM stops the VM, removes its network, files, checkpoints and rows.
// It never blocks on a hung VMM for long and is safe to repeat.
func (m *Manager) destroyVM(ctx context.Context, v *store.VM) (int, error) {
	rt := m.rt(v.ID)
	if v.State != store.StateDestroying {
		m.store.SetVMState(ctx, v.ID, store.StateDestroying, "", v.PID)
	}
	kctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	err := rt.kill(kctx)
	cancel()
	if err != nil {
		return 0, fmt.Errorf("stopping vmm of %s: %w", v.Name, err)
	}
	crashpoint("destroy.after-kill")
	// A VMM that died (or a start that a crash cut short) left no instance
	// to remove its cgroup and uid lease.
	m.releaseSandbox(ctx, v.Runtime())
	m.detachNetwork(ctx, v)
	cps, _ := m.store.ListCheckpoints(ctx, v.UserID, v.ID)
	for _, c := range cps {
		m.pool.drain(m.checkpointDir(c))
		if err := os.RemoveAll(m.checkpointDir(c)); err != nil {
			return 0, fmt.Errorf("removing checkpoint %s: %w", c.Name, err)
		}
	}
	if err := os.RemoveAll(m.vmDir(v)); err != nil {
		return 0, fmt.Errorf("removing vm dir: %w", err)
	}
	crashpoint("destroy.after-rmdir")
	sp := m.spec(v)
	os.Remove(filepath.Join(sp.RunDir, sp.ID+".qmp"))
	os.Remove(filepath.Join(sp.RunDir, sp.ID+".agent"))
	if err := m.store.DeleteVM(ctx, v.ID); err != nil {
		return 0, err
	}
	m.dropRT(v.ID)
	return len(cps), nil
}

// DestroyVM destroys the user's named VM (see Owner) and its checkpoints.
func (m *Manager) DestroyVM(ctx context.Context, u *store.User, name string) (*api.DestroyResult, error) {
	u, name, err := m.Owner(ctx, u, name)
	if err != nil {
		return nil, err
	}
	v, err := m.store.GetVM(ctx, u.ID, name)
	if err != nil {
		return nil, err
	}
	rt := m.rt(v.ID)
	// Destroy must never be blocked by a stuck operation for long: take the
	// op lock with a deadline, then proceed regardless.
	locked := make(chan struct{})
	go func() { rt.op.Lock(); close(locked) }()
	select {
	case <-locked:
		defer rt.op.Unlock()
	case <-time.After(30 * time.Second):
		go func() { <-locked; rt.op.Unlock() }()
	}
	// Re-read, by id: the VM may have changed while we waited, or been
	// destroyed (and its name taken by another VM).
	if v, err = m.store.GetVMByID(ctx, v.ID); err != nil {
		if errors.Is(err, errdefs.ErrNotFound) {
			m.forgetRT(rt)
			return nil, errdefs.WithHint(fmt.Errorf("vm %q: %w", name, errdefs.ErrNotFound), "noid list")
		}
		return nil, err
	}
	start := time.Now()
	n, err := m.destroyVM(ctx, v)
	m.metrics.op("destroy", start, err)
	if err != nil {
		return nil, err
	}
	rt.log.Info("vm destroyed", "user", u.Name, "checkpoints_removed", n)
	return &api.DestroyResult{Name: name, Checkpoints: n}, nil
}

// apiVM converts a stored VM for the API, with a live state check.
func (m *Manager) apiVM(ctx context.Context, v *store.VM) *api.VM {
	out := m.apiVMState(v)
	if n, err := m.store.CheckpointCounts(ctx, v.UserID, v.ID); err == nil {
		out.Checkpoints = n[v.ID]
	}
	if o, err := m.store.UserByID(ctx, v.UserID); err == nil {
		out.Owner = o.Name
	}
	return out
}

// apiVMState converts v for the API, with its liveness checked against
// its VMM, but without its checkpoint count.
func (m *Manager) apiVMState(v *store.VM) *api.VM {
	out := &api.VM{
		Name: v.Name, ID: v.ID, State: v.State, StateReason: v.StateReason, PID: v.PID, VCPUs: v.VCPUs,
		MemoryMiB: v.MemoryMiB, DiskBytes: v.DiskBytes, CreatedAt: v.CreatedAt, StartedAt: v.StartedAt, IP: v.IP, MAC: v.MAC,
		Network: v.Network, VMM: v.VMM, Accel: v.Accel, BootPath: v.BootPath, BootReason: v.BootReason, Source: v.Source,
		Tap: v.Tap, RuntimeID: v.Runtime(),
	}
	if v.State == store.StateRunning {
		if rt := m.lookupRT(v.ID); rt == nil {
			out.State = store.StateDead
			out.StateReason = "vmm process exited unexpectedly"
		} else if _, err := rt.instance(); err != nil {
			out.State = store.StateDead
			out.StateReason = "vmm process exited unexpectedly"
		}
	}
	if out.State == store.StateDead {
		out.PID = 0
	}
	if out.State == store.StateRunning && !v.StartedAt.IsZero() {
		out.UptimeSeconds = time.Since(v.StartedAt).Seconds()
	}
	return out
}

// apiVMs converts VMs of one user (every user's for a negative userID) for
// the API, counting their checkpoints in one query rather than one per VM;
// owners maps user ids to the names the VMs' owners are given.
func (m *Manager) apiVMs(ctx context.Context, userID int64, vms []*store.VM, owners map[int64]string) []*api.VM {
	counts, err := m.store.CheckpointCounts(ctx, userID, "")
	out := make([]*api.VM, 0, len(vms))
	for _, v := range vms {
		a := m.apiVMState(v)
		if err == nil {
			a.Checkpoints = counts[v.ID]
		}
		a.Owner = owners[v.UserID]
		out = append(out, a)
	}
	return out
}

// ListVMs lists the user's VMs.
func (m *Manager) ListVMs(ctx context.Context, u *store.User) ([]*api.VM, error) {
	vms, err := m.store.ListVMs(ctx, u.ID)
	if err != nil {
		return nil, err
	}
	return m.apiVMs(ctx, u.ID, vms, map[int64]string{u.ID: u.Name}), nil
}

// GetVM returns one of the user's VMs (see Owner).
func (m *Manager) GetVM(ctx context.Context, u *store.User, name string) (*api.VM, error) {
	u, name, err := m.Owner(ctx, u, name)
	if err != nil {
		return nil, err
	}
	v, err := m.store.GetVM(ctx, u.ID, name)
	if err != nil {
		return nil, err
	}
	return m.apiVM(ctx, v), nil
}
