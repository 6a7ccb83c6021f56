package manager

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/noid-vm/noid/internal/api"
	"github.com/noid-vm/noid/internal/errdefs"
	"github.com/noid-vm/noid/internal/storage"
	"github.com/noid-vm/noid/internal/store"
	"github.com/noid-vm/noid/internal/vmm"
)

// classifyIOErr maps disk-full errors to ErrResourceExhausted with a message
// that says so.
func classifyIOErr(what string, err error) error {
	if errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) {
		return errdefs.WithHint(fmt.Errorf("%w: %s: the disk holding the data dir is full: %v", errdefs.ErrResourceExhausted, what, err),
			"free space, or delete checkpoints with `noid checkpoint rm`")
	}
	if code, _ := errdefs.Classify(err); code != errdefs.CodeInternal {
		return err
	}
	return fmt.Errorf("%s: %w", what, err)
}

func (m *Manager) apiCheckpoint(c *store.Checkpoint, vmName string) *api.Checkpoint {
	return &api.Checkpoint{ID: c.ID, Name: c.Name, Label: c.Label, VM: vmName, CreatedAt: c.CreatedAt, SizeBytes: c.SizeBytes,
		VCPUs: c.VCPUs, MemoryMiB: c.MemoryMiB, Backend: c.Backend, PauseMs: float64(c.PauseNs) / 1e6}
}

// snapshotMeta describes a snapshot the server is about to take of v.
func (m *Manager) snapshotMeta(ctx context.Context, v *store.VM) *vmm.SnapshotMeta {
	meta := &vmm.SnapshotMeta{Backend: m.backend.Name(), VCPUs: v.VCPUs, MemoryMiB: v.MemoryMiB, Accel: vmm.Accel(v.Accel),
		HasNet: v.Tap != "", CreatedAt: time.Now().UTC()}
	meta.VMMVersion, _ = m.backend.Version(ctx)
	meta.KernelSHA256, _ = m.ids.Get(ctx, v.Kernel, storage.IDSHA256)
	meta.InitrdSHA256, _ = m.ids.Get(ctx, v.Initrd, storage.IDSHA256)
	return meta
}

// Checkpoint captures the user's running VM (vmName as Owner resolves it).
// Its space is reserved against the user's checkpoint quota before
// anything is written (quota.go). The checkpoint directory is written
// under a temporary name, synced, and renamed into place; only then is the
// row inserted, with the real size, so a crash never leaves a listed
// partial checkpoint.
func (m *Manager) Checkpoint(ctx context.Context, u *store.User, vmName string, req api.CheckpointRequest) (*api.Checkpoint, error) {
	start := time.Now()
	u, vmName, err := m.Owner(ctx, u, vmName)
	if err != nil {
		return nil, err
	}
	v, err := m.store.GetVM(ctx, u.ID, vmName)
	if err != nil {
		return nil, err
	}
	id := newID(4)
	name, err := checkpointName(req, id)
	if err != nil {
		return nil, err
	}
	rt, v, err := m.lockVM(ctx, v)
	if err != nil {
		return nil, err
	}
	defer rt.op.Unlock()
	if v.State != store.StateRunning {
		return nil, errdefs.WithHint(fmt.Errorf("cannot checkpoint vm %q: it is %s: %w", vmName, v.State, errdefs.ErrNotRunning), "noid info "+vmName)
	}
	// Under the lock: another checkpoint of this name may have been taken
	// while this one waited for it.
	if err := m.store.CheckpointNameFree(ctx, v.ID, name); err != nil {
		return nil, errdefs.WithHint(err, "pick another name, or `noid checkpoint rm "+vmName+" "+name+"`")
	}
	if err := m.checkFreeSpace("checkpoint of " + vmName); err != nil {
		return nil, err
	}
	inst, err := rt.instance()
	if err != nil {
		return nil, fmt.Errorf("cannot checkpoint vm %q: %w", vmName, err)
	}
	// Reserve the checkpoint's space before writing any of it (quota.go).
	res, err := m.reserveCheckpoint(ctx, u, m.cpEstimate(v))
	if err != nil {
		m.metrics.op("checkpoint", start, err)
		return nil, err
	}
	defer res.release()
	c := &store.Checkpoint{ID: id, VMID: v.ID, UserID: u.ID, Name: name, Label: req.Label, Backend: m.backend.Name(),
		VCPUs: v.VCPUs, MemoryMiB: v.MemoryMiB}
	dir := m.checkpointDir(c)
	tmp := filepath.Join(filepath.Dir(dir), ".tmp-"+id)
	if err := os.MkdirAll(tmp, 0o700); err != nil {
		return nil, classifyIOErr("creating checkpoint dir", err)
	}
	ok := false
	defer func() {
		if !ok {
			os.RemoveAll(tmp)
		}
	}()
	t, err := inst.Checkpoint(ctx, tmp, m.copier)
	crashpoint("checkpoint.after-copy")
	if err != nil {
		m.metrics.op("checkpoint", start, err)
		return nil, classifyIOErr("checkpoint of "+vmName, err)
	}
	// The backend may have written its own metadata; complete it.
	meta := m.snapshotMeta(ctx, v)
	if bm, err := vmm.ReadMeta(tmp); err == nil {
		bm.KernelSHA256, bm.InitrdSHA256 = meta.KernelSHA256, meta.InitrdSHA256
		meta = bm
	}
	if err := m.sealSnapshot(ctx, tmp, meta); err != nil {
		return nil, classifyIOErr("checksumming checkpoint", err)
	}
	if err := vmm.WriteMeta(tmp, meta); err != nil {
		return nil, classifyIOErr("writing checkpoint metadata", err)
	}
	if err := syncTree(tmp); err != nil {
		return nil, classifyIOErr("syncing checkpoint", err)
	}
	if err := os.Rename(tmp, dir); err != nil {
		return nil, classifyIOErr("publishing checkpoint", err)
	}
	ok = true
	storage.FsyncDir(filepath.Dir(dir))
	crashpoint("checkpoint.after-rename")
	c.SizeBytes = m.snapshotSize(dir)
	c.PauseNs = t.Pause.Nanoseconds()
	if err := res.settle(ctx, c); err != nil {
		os.RemoveAll(dir)
		m.metrics.op("checkpoint", start, err)
		return nil, err
	}
	m.metrics.op("checkpoint", start, nil)
	m.metrics.checkpointBytes(c.SizeBytes)
	// A clone of it or a rewind to it is likely: have a VMM waiting.
	m.pool.refillCheckpoint(dir, shapeOf(v))
	rt.log.Info("checkpoint taken", "user", u.Name, "checkpoint", name, "pause_ms", ms(t.Pause), "total_ms", ms(time.Since(start)), "bytes", c.SizeBytes)
	out := m.apiCheckpoint(c, v.Name)
	out.Timings = &api.Timings{TotalMs: ms(time.Since(start)), PauseMs: ms(t.Pause), CopyMs: ms(t.Copy)}
	return out, nil
}

// ListCheckpoints lists a VM's checkpoints (vmName as Owner resolves it).
func (m *Manager) ListCheckpoints(ctx context.Context, u *store.User, vmName string) ([]*api.Checkpoint, error) {
	u, vmName, err := m.Owner(ctx, u, vmName)
	if err != nil {
		return nil, err
	}
	v, err := m.store.GetVM(ctx, u.ID, vmName)
	if err != nil {
		return nil, err
	}
	cps, err := m.store.ListCheckpoints(ctx, u.ID, v.ID)
	if err != nil {
		return nil, err
	}
	out := make([]*api.Checkpoint, 0, len(cps))
	for _, c := range cps {
		out = append(out, m.apiCheckpoint(c, v.Name))
	}
	return out, nil
}

// DeleteCheckpoint removes a checkpoint's row and files (vmName as Owner
// resolves it).
func (m *Manager) DeleteCheckpoint(ctx context.Context, u *store.User, vmName, cpName string) error {
	u, vmName, err := m.Owner(ctx, u, vmName)
	if err != nil {
		return err
	}
	v, err := m.store.GetVM(ctx, u.ID, vmName)
	if err != nil {
		return err
	}
	rt, v, err := m.lockVM(ctx, v)
	if err != nil {
		return err
	}
	defer rt.op.Unlock()
	c, err := m.store.GetCheckpoint(ctx, u.ID, v.ID, cpName)
	if err != nil {
		return err
	}
	// Row first: a crash after it leaves an unlisted dir that start-up sweeps.
	if err := m.store.DeleteCheckpoint(ctx, c.ID); err != nil {
		return err
	}
	m.pool.drain(m.checkpointDir(c))
	if err := os.RemoveAll(m.checkpointDir(c)); err != nil {
		return fmt.Errorf("removing checkpoint files: %w", err)
	}
	rt.log.Info("checkpoint deleted", "user", u.Name, "checkpoint", c.Name)
	return nil
}

// checkpointName checks a checkpoint request and returns the checkpoint's
// name: req.Name, or id when none is given.
func checkpointName(req api.CheckpointRequest, id string) (string, error) {
	name := req.Name
	if name == "" {
		name = id
	} else if err := api.ValidateCheckpointName(name); err != nil {
		return "", err
	}
	if len(req.Label) > 1024 {
		return "", fmt.Errorf("%w: label is longer than 1024 bytes", errdefs.ErrInvalidArgument)
	}
	return name, nil
}

// checkRestoreRequest checks a restore request: a checkpoint, and a valid
// name for the clone if one is asked for.
func checkRestoreRequest(req api.RestoreRequest) error {
	if req.Checkpoint == "" {
		return fmt.Errorf("%w: no checkpoint given", errdefs.ErrInvalidArgument)
	}
	if req.As != "" {
		return api.ValidateVMName(req.As)
	}
	return nil
}

// Restore rewinds the VM (vmName as Owner resolves it) to a checkpoint, or
// with req.As clones the checkpoint into a new VM of the same owner.
func (m *Manager) Restore(ctx context.Context, u *store.User, vmName string, req api.RestoreRequest) (*api.VM, error) {
	u, vmName, err := m.Owner(ctx, u, vmName)
	if err != nil {
		return nil, err
	}
	v, err := m.store.GetVM(ctx, u.ID, vmName)
	if err != nil {
		return nil, err
	}
	if err := checkRestoreRequest(req); err != nil {
		return nil, err
	}
	c, err := m.store.GetCheckpoint(ctx, u.ID, v.ID, req.Checkpoint)
	if errors.Is(err, errdefs.ErrNotFound) {
		// A checkpoint id of another of the user's VMs is accepted too.
		if c2, err2 := m.store.GetCheckpointByID(ctx, u.ID, req.Checkpoint); err2 == nil {
			c, err = c2, nil
		}
	}
	if err != nil {
		return nil, err
	}
	if req.As != "" {
		return m.clone(ctx, u, v, c, req.As)
	}
	return m.rewind(ctx, u, v, c)
}

// checkSnapshotFits refuses a snapshot (its metadata meta) that cannot run
// as v: another backend, shape or device set.
func (m *Manager) checkSnapshotFits(meta *vmm.SnapshotMeta, v *store.VM) error {
	if meta.Backend != m.backend.Name() {
		return fmt.Errorf("%w: the checkpoint was taken by the %s backend; this server runs %s", errdefs.ErrInvalidArgument, meta.Backend, m.backend.Name())
	}
	if meta.VCPUs != v.VCPUs || meta.MemoryMiB != v.MemoryMiB {
		return errdefs.WithHint(fmt.Errorf("%w: the checkpoint needs %d vCPUs and %d MiB, but vm %q has %d vCPUs and %d MiB",
			errdefs.ErrInvalidArgument, meta.VCPUs, meta.MemoryMiB, v.Name, v.VCPUs, v.MemoryMiB), "clone it into a new VM with --as")
	}
	if meta.HasNet != (v.Tap != "") {
		return fmt.Errorf("%w: the checkpoint was taken with network=%s, vm %q has network=%s", errdefs.ErrInvalidArgument, netName(meta.HasNet), v.Name, v.Network)
	}
	return nil
}

func netName(has bool) string {
	if has {
		return "default"
	}
	return "none"
}

func (m *Manager) rewind(ctx context.Context, u *store.User, v *store.VM, c *store.Checkpoint) (*api.VM, error) {
	start := time.Now()
	rt, v, err := m.lockVM(ctx, v)
	if err != nil {
		return nil, err
	}
	defer rt.op.Unlock()
	if v.State == store.StateDestroying || v.State == store.StateCreating {
		return nil, fmt.Errorf("%w: vm %q is %s", errdefs.ErrConflict, v.Name, v.State)
	}
	// Nothing touches the VM before the checkpoint fits it and proved whole.
	dir := m.checkpointDir(c)
	what := "checkpoint " + c.Name
	meta, err := m.readSnapshotMeta(dir, what)
	if err != nil {
		return nil, err
	}
	if err := m.checkSnapshotFits(meta, v); err != nil {
		return nil, err
	}
	if err := m.verifySnapshotFiles(ctx, dir, what, meta); err != nil {
		m.metrics.op("restore", start, err)
		return nil, err
	}
	if _, ok := m.backend.(vmm.Preparer); ok {
		// The rewind loads the checkpoint into a spare (prepared now when
		// none waits) before it stops the VM.
		defer m.pool.refillCheckpoint(dir, shapeOf(v))
		sp, err := m.takeOrMakeSpare(ctx, dir, shapeOf(v))
		if err != nil {
			m.metrics.op("restore", start, err)
			return nil, classifyIOErr("preparing a VMM for the rewind of "+v.Name, err)
		}
		return m.rewindIntoSpare(ctx, u, v, c, sp, start)
	}
	// Backends that cannot prepare a VMM (Firecracker) restore in place:
	// the old VMM is stopped first.
	if err := m.store.SetVMState(ctx, v.ID, store.StateRestoring, "", v.PID); err != nil {
		return nil, err
	}
	kctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	err = rt.kill(kctx)
	cancel()
	if err != nil {
		return nil, err
	}
	crashpoint("restore.cold-after-kill")
	// A dead VM may have lost its TAP; make sure it exists.
	if err := m.attachNetwork(ctx, v); err != nil {
		m.store.SetVMState(ctx, v.ID, store.StateDead, "restore failed: "+err.Error(), 0)
		return nil, err
	}
	inst, t, err := m.backend.Restore(ctx, m.spec(v), dir, m.copier)
	if err != nil {
		m.store.SetVMState(ctx, v.ID, store.StateDead, "restore failed: "+err.Error(), 0)
		m.metrics.op("restore", start, err)
		return nil, classifyIOErr("restoring "+v.Name, err)
	}
	rt.setInstance(inst)
	crashpoint("restore.cold-after-spawn")
	v.PID = inst.Pid()
	return m.finishRewind(ctx, u, v, c, start, "vm rewound", api.Timings{CopyMs: ms(t.Copy), SpawnMs: ms(t.Spawn), LoadMs: ms(t.Load)})
}

// finishRewind records a rewound VM as running, waits for its agent and
// reports the rewind; t has the VMM-side timings.
func (m *Manager) finishRewind(ctx context.Context, u *store.User, v *store.VM, c *store.Checkpoint, start time.Time, msg string, t api.Timings) (*api.VM, error) {
	rt := m.rt(v.ID)
	v.State, v.StateReason, v.StartedAt, v.Source = store.StateRunning, "", time.Now().UTC(), c.Name
	if err := m.store.UpdateVM(ctx, v); err != nil {
		return nil, err
	}
	agentStart := time.Now()
	if _, err := rt.agentClient(ctx, v); err != nil {
		m.metrics.op("restore", start, err)
		return nil, fmt.Errorf("%w: vm %q restored but its agent did not answer: %v", errdefs.ErrUnavailable, v.Name, err)
	}
	m.metrics.op("restore", start, nil)
	rt.log.Info(msg, "user", u.Name, "checkpoint", c.Name, "runtime_id", v.Runtime(), "ms", ms(time.Since(start)))
	out := m.apiVM(ctx, v)
	t.TotalMs, t.AgentMs = ms(time.Since(start)), ms(time.Since(agentStart))
	out.Timings = &t
	return out, nil
}

func (m *Manager) clone(ctx context.Context, u *store.User, src *store.VM, c *store.Checkpoint, newName string) (*api.VM, error) {
	start := time.Now()
	if err := api.ValidateVMName(newName); err != nil {
		return nil, err
	}
	dir := m.checkpointDir(c)
	// The clone takes its spec from the checkpoint's own VM, which may be
	// another of the user's VMs when the checkpoint was given by id.
	if c.VMID != src.ID {
		owner, err := m.store.GetVMByID(ctx, c.VMID)
		if err != nil {
			return nil, err
		}
		src = owner
	}
	return m.cloneFrom(ctx, u, src, dir, "checkpoint "+c.Name, src.Name+"/"+c.Name, newName, start)
}

// cloneFrom starts newName from the snapshot in dir (what names it in
// errors, source in the VM's record), with src's spec: a VM of the
// snapshot's shape, whose boot files the clone uses.
func (m *Manager) cloneFrom(ctx context.Context, u *store.User, src *store.VM, dir, what, source, newName string, start time.Time) (*api.VM, error) {
	meta, err := m.readSnapshotMeta(dir, what)
	if err != nil {
		return nil, err
	}
	if err := m.checkSnapshotFits(meta, src); err != nil {
		return nil, err
	}
	if err := m.verifySnapshotFiles(ctx, dir, what, meta); err != nil {
		return nil, err
	}
	v := &store.VM{
		ID: newID(6), UserID: u.ID, Name: newName, State: store.StateCreating, VCPUs: src.VCPUs, MemoryMiB: src.MemoryMiB,
		DiskBytes: src.DiskBytes, VMM: m.backend.Name(), Accel: src.Accel, BootPath: "clone", Kernel: src.Kernel, Initrd: src.Initrd,
		Network: src.Network, AllowPeers: src.AllowPeers, Source: source,
	}
	if _, ok := m.backend.(vmm.Preparer); !ok {
		return m.startFromSnapshot(ctx, u, v, dir, start)
	}
	if err := m.checkHostMemory(v.MemoryMiB); err != nil {
		return nil, err
	}
	defer m.pool.refillCheckpoint(dir, shapeOf(src))
	sp, err := m.takeOrMakeSpare(ctx, dir, shapeOf(src))
	if err != nil {
		return nil, classifyIOErr("preparing a VMM for clone "+newName, err)
	}
	v.ID, v.BootReason = sp.id, "warm spare"
	if sp.fresh > 0 {
		v.BootReason = "prepared now"
	}
	return m.startFromSpare(ctx, u, v, sp, start)
}

// startFromSnapshot inserts v and starts it from the snapshot in dir
// (clones and golden creates). On any failure everything is removed.
func (m *Manager) startFromSnapshot(ctx context.Context, u *store.User, v *store.VM, dir string, start time.Time) (*api.VM, error) {
	if err := m.checkHostMemory(v.MemoryMiB); err != nil {
		return nil, err
	}
	rt, err := m.insertVM(ctx, u, v, "clone.after-insert")
	if err != nil {
		return nil, err
	}
	defer rt.op.Unlock()
	log := rt.log
	fail := func(err error) (*api.VM, error) {
		log.Warn("start from snapshot failed; cleaning up", "err", err)
		cctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		m.destroyVM(cctx, v)
		m.metrics.op(v.BootPath, start, err)
		return nil, classifyIOErr("starting "+v.Name, err)
	}
	if err := os.MkdirAll(m.vmDir(v), 0o700); err != nil {
		return fail(err)
	}
	netStart := time.Now()
	if err := m.attachNetwork(ctx, v); err != nil {
		return fail(err)
	}
	netDur := time.Since(netStart)
	inst, t, err := m.backend.Restore(ctx, m.spec(v), dir, m.copier)
	if err != nil {
		return fail(err)
	}
	rt.setInstance(inst)
	v.PID = inst.Pid()
	v.StartedAt = time.Now().UTC()
	if err := m.store.UpdateVM(ctx, v); err != nil {
		return fail(err)
	}
	crashpoint("clone.after-spawn")
	agentStart := time.Now()
	if _, err := rt.agentClient(ctx, v); err != nil {
		return fail(fmt.Errorf("%w: the agent did not answer after restore: %v", errdefs.ErrUnavailable, err))
	}
	v.State = store.StateRunning
	if err := m.store.UpdateVM(ctx, v); err != nil {
		return fail(err)
	}
	m.metrics.op(v.BootPath, start, nil)
	log.Info("vm started from snapshot", "path", v.BootPath, "source", v.Source, "ms", ms(time.Since(start)))
	out := m.apiVM(ctx, v)
	out.Timings = &api.Timings{TotalMs: ms(time.Since(start)), CopyMs: ms(t.Copy), SpawnMs: ms(t.Spawn), LoadMs: ms(t.Load),
		AgentMs: ms(time.Since(agentStart)), NetMs: ms(netDur)}
	return out, nil
}
