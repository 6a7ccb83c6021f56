package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/noid-vm/noid/internal/storage"
	"github.com/noid-vm/noid/internal/vmm"
)

// How a checkpoint works (Checkpoint):
//
//  1. A live (precopy) migration starts with the guest running: QEMU sends
//     its RAM, then again the pages dirtied meanwhile, into a pipe that
//     splitStream turns into the snapshot's memory file and state stream.
//  2. When little is left, QEMU stops the vCPUs and, with the capability
//     pause-before-switchover, waits before it sends the last pages and the
//     device state. In that pause the disk's writable top is frozen: a new
//     empty qcow2 overlay, created by noid and passed in as an fd, goes on
//     top of it (blockdev-snapshot), and the VM writes there from now on.
//  3. The migration completes (the last pages, the device state), and the
//     vCPUs resume.
//
// The pause holds the final migration pass, the device state and the
// overlay switch, and nothing whose cost grows with the guest's memory or
// disk. The snapshot's disk is the chain as it was at the pause, linked.

// Checkpoint tuning.
const (
	// downtimeStart is the migration downtime limit a checkpoint starts
	// with: QEMU stops the vCPUs once what is left would take that long.
	downtimeStart = 10 * time.Millisecond
	// downtimeMax is where the limit ends when a guest dirties its memory
	// faster than the pipe drains: once the migration has made
	// convergePasses passes over RAM without switching over, the limit
	// doubles every downtimeStep.
	downtimeMax    = 2 * time.Second
	downtimeStep   = 300 * time.Millisecond
	convergePasses = 4
)

// migrationStatus is the part of query-migrate a checkpoint reads.
type migrationStatus struct {
	Status    string `json:"status"`
	ErrorDesc string `json:"error-desc"`
	Downtime  int64  `json:"downtime"`
	RAM       struct {
		Transferred int64 `json:"transferred"`
		DirtySync   int64 `json:"dirty-sync-count"`
	} `json:"ram"`
}

// topNode returns the node name of the block device's writable top.
func (i *Instance) topNode(ctx context.Context) (string, error) {
	var blocks []struct {
		Inserted *struct {
			NodeName string `json:"node-name"`
		} `json:"inserted"`
	}
	if err := i.qmp.Execute(ctx, "query-block", nil, &blocks); err != nil {
		return "", err
	}
	for _, b := range blocks {
		if b.Inserted != nil && b.Inserted.NodeName != "" {
			return b.Inserted.NodeName, nil
		}
	}
	return "", errors.New("the vm has no disk")
}

// Checkpoint writes a snapshot of the running VM into dir (which exists
// and is empty): memory.snap, vmstate.snap, the disk chain as hard links
// and meta.json. The vCPUs are stopped only for the last migration pass
// and the switch to a new disk top, and always resume, even on error.
func (i *Instance) Checkpoint(ctx context.Context, dir string, cp vmm.Copier) (t vmm.Timings, err error) {
	i.mu.Lock()
	defer i.mu.Unlock()
	if err := i.alive(); err != nil {
		return t, err
	}
	start := time.Now()
	memSize := int64(i.spec.MemoryMiB) << 20
	c, err := chain(i.spec.Dir)
	if err != nil {
		return t, err
	}
	oldTop, err := i.topNode(ctx)
	if err != nil {
		return t, fmt.Errorf("finding the disk's top: %w", err)
	}
	vs, err := virtualSize(c[len(c)-1])
	if err != nil {
		return t, err
	}
	newTopPath := filepath.Join(i.spec.Dir, nextLayer(c))
	if err := storage.CreateQcow2(newTopPath, vs); err != nil {
		return t, err
	}
	attached := false
	defer func() {
		if !attached {
			os.Remove(newTopPath)
		}
	}()
	// The new top goes to QEMU as fds (read-write, and read-only for when
	// the next checkpoint freezes it), never by name.
	set := -1
	for _, flag := range []int{os.O_RDWR, os.O_RDONLY} {
		f, err := os.OpenFile(newTopPath, flag, 0)
		if err != nil {
			return t, err
		}
		opaque := filepath.Base(newTopPath)
		if flag == os.O_RDWR {
			opaque = writableOpaque
		}
		set, err = i.qmp.AddFD(ctx, f, set, opaque)
		f.Close()
		if err != nil {
			return t, fmt.Errorf("passing the new disk top to qemu: %w", err)
		}
	}
	topPath := "/dev/fdset/" + strconv.Itoa(set)
	newNode := topNodePrefix + strings.TrimSuffix(strings.TrimPrefix(filepath.Base(newTopPath), "disk-"), ".qcow2")

	mem, err := os.OpenFile(filepath.Join(dir, vmm.SnapMemory), os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return t, fmt.Errorf("creating the memory file: %w", err)
	}
	defer mem.Close()
	if err := mem.Truncate(memSize); err != nil {
		return t, fmt.Errorf("sizing the memory file: %w", err)
	}
	state, err := os.OpenFile(filepath.Join(dir, vmm.SnapState), os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return t, fmt.Errorf("creating the state file: %w", err)
	}
	defer state.Close()

	live := i.b == nil || i.b.liveCheckpoints(ctx, i.spec.Accel)
	if err := i.setMigrationCaps(ctx, map[string]bool{"x-ignore-shared": false, "pause-before-switchover": live, "events": true}); err != nil {
		return t, fmt.Errorf("preparing the migration: %w", err)
	}
	if err := i.qmp.Execute(ctx, "migrate-set-parameters", map[string]any{"downtime-limit": downtimeStart.Milliseconds()}, nil); err != nil {
		return t, fmt.Errorf("preparing the migration: %w", err)
	}
	pr, pw, err := os.Pipe()
	if err != nil {
		return t, err
	}
	defer pr.Close()
	if err := i.qmp.SendFD(ctx, "noid-checkpoint", pw); err != nil {
		pw.Close()
		return t, err
	}
	pw.Close()
	// The stream is read while QEMU writes it; a failure here makes
	// QEMU's write fail, which fails the migration and resumes the VM.
	splitCtx, cancelSplit := context.WithCancel(ctx)
	defer cancelSplit()
	splitDone := make(chan splitResult, 1)
	go func() {
		st, err := splitStream(splitCtx, pr, mem, memSize, state)
		if err != nil {
			pr.Close()
		}
		splitDone <- splitResult{st, err}
	}()

	var pauseStart time.Time
	defer func() {
		if err == nil {
			return
		}
		// Leave no migration behind and never a paused VM.
		rctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		i.qmp.Execute(rctx, "migrate_cancel", nil, nil)
		var st struct {
			Status string `json:"status"`
		}
		if i.qmp.Execute(rctx, "query-status", nil, &st) == nil && st.Status != "running" && st.Status != "finish-migrate" {
			i.qmp.Execute(rctx, "cont", nil, nil)
		}
	}()

	// freeze puts a new top over the disk's, with the vCPUs stopped.
	freeze := func() error {
		err := i.qmp.Execute(ctx, "blockdev-add", map[string]any{
			"driver": "qcow2", "node-name": newNode, "backing": nil, "discard": "unmap",
			"file": map[string]any{"driver": "file", "filename": topPath, "aio": "threads", "locking": "off"},
		}, nil)
		if err == nil {
			err = i.qmp.Execute(ctx, "blockdev-snapshot", map[string]any{"node": oldTop, "overlay": newNode}, nil)
			if err != nil {
				i.qmp.Execute(ctx, "blockdev-del", map[string]any{"node-name": newNode}, nil)
			}
		}
		if err != nil {
			return fmt.Errorf("switching the disk to a new top: %w", err)
		}
		attached = true
		return nil
	}
	completed := i.qmp.WaitEvent(func(ev Event) bool { return migrationEvent(ev, "completed", "failed", "cancelled") })
	if !live {
		// Stop and copy: the vCPUs stay stopped while the whole RAM goes
		// through the stream (see liveCheckpoints).
		if err := i.qmp.Execute(ctx, "stop", nil, nil); err != nil {
			return t, fmt.Errorf("pausing the vm: %w", err)
		}
		pauseStart = time.Now()
		if err := freeze(); err != nil {
			return t, err
		}
		if err := i.qmp.Execute(ctx, "migrate", map[string]any{"uri": "fd:noid-checkpoint"}, nil); err != nil {
			return t, fmt.Errorf("starting the migration: %w", err)
		}
	} else if err := i.liveUntilSwitchover(ctx, splitDone, freeze, &pauseStart); err != nil {
		return t, err
	}
	ev, err := completed(ctx)
	if err != nil {
		return t, fmt.Errorf("finishing the migration: %w", err)
	}
	if eventStatus(ev) != "completed" {
		return t, i.migrationFailure(ctx, splitDone)
	}
	if err := i.contAfterMigration(ctx); err != nil {
		return t, fmt.Errorf("resuming the vm after the checkpoint: %w", err)
	}
	t.Pause = time.Since(pauseStart)
	var ms migrationStatus
	if live && i.qmp.Execute(ctx, "query-migrate", nil, &ms) == nil && time.Duration(ms.Downtime)*time.Millisecond > t.Pause {
		// QEMU counts from the moment it stopped the vCPUs, a little
		// before noid heard of it.
		t.Pause = time.Duration(ms.Downtime) * time.Millisecond
	}

	r := <-splitDone
	if r.err != nil {
		return t, fmt.Errorf("reading the migration stream: %w", r.err)
	}
	t.Copy = time.Since(start) - t.Pause
	// The old top is frozen: QEMU keeps only read-only fds of it, and it
	// goes back to root (a confined VMM's uid owned it while it was the
	// top). It is shared with the checkpoint from here on.
	if err := i.removeWritableFDs(ctx, set); err != nil {
		return t, fmt.Errorf("closing qemu's writable fd of the frozen disk layer: %w", err)
	}
	if old := c[len(c)-1]; os.Geteuid() == 0 {
		if err := os.Chown(old, 0, 0); err != nil {
			return t, fmt.Errorf("giving the frozen disk layer %s to root: %w", old, err)
		}
	}
	// The disk as it was in the pause: the chain, its old top frozen.
	for _, l := range c {
		name := filepath.Base(l)
		if name == legacyDisk {
			name = diskName(0, false)
		}
		if err := os.Link(l, filepath.Join(dir, name)); err != nil {
			return t, fmt.Errorf("linking disk layer %s into the checkpoint: %w", name, err)
		}
	}
	meta := &vmm.SnapshotMeta{Backend: Name, VCPUs: i.spec.VCPUs, MemoryMiB: i.spec.MemoryMiB, Accel: i.spec.Accel,
		HasNet: i.spec.Net != nil, CreatedAt: time.Now().UTC(), Format: snapshotFormat}
	if i.b != nil {
		meta.VMMVersion, _ = i.b.Version(ctx)
	}
	if err := vmm.WriteMeta(dir, meta); err != nil {
		return t, err
	}
	t.Total = time.Since(start)
	return t, nil
}

// removeWritableFDs removes from QEMU's fd sets every read-write fd of a
// disk layer (opaque writableOpaque) except those in the set keep, the
// current top's. QEMU closes a removed fd at once while the VM runs (the
// block layer already reopened the frozen layer read-only, from the set's
// read-only fd), so a compromised VMM cannot write a layer that
// checkpoints and clones share.
func (i *Instance) removeWritableFDs(ctx context.Context, keep int) error {
	var sets []struct {
		ID  int `json:"fdset-id"`
		FDs []struct {
			FD     int    `json:"fd"`
			Opaque string `json:"opaque"`
		} `json:"fds"`
	}
	if err := i.qmp.Execute(ctx, "query-fdsets", nil, &sets); err != nil {
		return err
	}
	for _, s := range sets {
		if s.ID == keep {
			continue
		}
		for _, fd := range s.FDs {
			if fd.Opaque != writableOpaque {
				continue
			}
			if err := i.qmp.Execute(ctx, "remove-fd", map[string]any{"fdset-id": s.ID, "fd": fd.FD}, nil); err != nil {
				return fmt.Errorf("removing fd %d of fd set %d: %w", fd.FD, s.ID, err)
			}
		}
	}
	return nil
}

// contAfterMigration resumes the vCPUs once a migration has completed.
// QEMU announces the completion a moment before it has cleaned the
// migration up, and refuses cont until then ("not finalized yet").
func (i *Instance) contAfterMigration(ctx context.Context) error {
	delay := 100 * time.Microsecond
	for {
		err := i.qmp.Execute(ctx, "cont", nil, nil)
		var qe *QMPError
		if err == nil || !errors.As(err, &qe) || !strings.Contains(qe.Desc, "not finalized") {
			return err
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(delay):
		}
		delay = min(2*delay, 5*time.Millisecond)
	}
}

// liveUntilSwitchover runs the live part of a checkpoint: it starts the
// migration with the guest running and waits until QEMU has stopped the
// vCPUs before the switchover (raising the downtime limit for a guest that
// dirties memory faster than it drains), freezes the disk there and lets
// the migration finish. pauseStart is set when the vCPUs stopped.
func (i *Instance) liveUntilSwitchover(ctx context.Context, splitDone chan splitResult, freeze func() error, pauseStart *time.Time) error {
	preSwitchover := i.qmp.WaitEvent(func(ev Event) bool { return migrationEvent(ev, "pre-switchover", "failed", "cancelled") })
	if err := i.qmp.Execute(ctx, "migrate", map[string]any{"uri": "fd:noid-checkpoint"}, nil); err != nil {
		return fmt.Errorf("starting the migration: %w", err)
	}
	downtime := downtimeStart
	for {
		wctx, cancel := context.WithTimeout(ctx, downtimeStep)
		ev, werr := preSwitchover(wctx)
		cancel()
		if werr == nil {
			if st := eventStatus(ev); st != "pre-switchover" {
				return i.migrationFailure(ctx, splitDone)
			}
			break
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		select {
		case r := <-splitDone:
			splitDone <- r
			return i.migrationFailure(ctx, splitDone)
		default:
		}
		// The first passes copy what the guest touched; only a guest
		// that keeps dirtying its memory faster than it drains needs a
		// longer stop.
		var ms migrationStatus
		if downtime < downtimeMax && i.qmp.Execute(ctx, "query-migrate", nil, &ms) == nil && ms.RAM.DirtySync >= convergePasses {
			downtime *= 2
			i.qmp.Execute(ctx, "migrate-set-parameters", map[string]any{"downtime-limit": downtime.Milliseconds()}, nil)
		}
	}
	*pauseStart = time.Now()
	if err := freeze(); err != nil {
		return err
	}
	if err := i.qmp.Execute(ctx, "migrate-continue", map[string]any{"state": "pre-switchover"}, nil); err != nil {
		return fmt.Errorf("finishing the migration: %w", err)
	}
	return nil
}

// liveCheckpoints reports whether checkpoints may copy RAM while the guest
// runs (a live migration), which needs QEMU's dirty page tracking to be
// exact: with KVM it is the kernel's; with TCG, QEMU before 9.0 loses
// writes (its migration bitmap sync left TCG's TLB entries marked dirty,
// so later writes through them were never recorded: fixed upstream by
// "physmem: Fix migration dirty bitmap coherency with TCG memory access").
// There, measured here with a guest rewriting memory, restored checkpoints
// crashed in 2 of 5 runs. Such checkpoints stop the guest and copy its RAM
// in the pause instead: correct, and slower.
func (b *Backend) liveCheckpoints(ctx context.Context, accel vmm.Accel) bool {
	if accel == vmm.AccelKVM {
		return true
	}
	return b.versionAtLeast(ctx, 9, 0)
}

// versionAtLeast reports whether the QEMU binary's version is major.minor
// or later.
func (b *Backend) versionAtLeast(ctx context.Context, major, minor int) bool {
	v, err := b.Version(ctx)
	if err != nil {
		return false
	}
	return compareVersions(v, fmt.Sprintf("%d.%d", major, minor)) >= 0
}

// compareVersions compares two dotted QEMU versions ("7.2.22", "10.0.2")
// numerically, part by part, and returns -1, 0 or 1 as a is older than,
// the same as or newer than b. A part that is not a number counts as 0.
func compareVersions(a, b string) int {
	pa, pb := strings.Split(a, "."), strings.Split(b, ".")
	for i := 0; i < len(pa) || i < len(pb); i++ {
		var x, y int
		if i < len(pa) {
			x, _ = strconv.Atoi(leadingDigits(pa[i]))
		}
		if i < len(pb) {
			y, _ = strconv.Atoi(leadingDigits(pb[i]))
		}
		if x != y {
			if x < y {
				return -1
			}
			return 1
		}
	}
	return 0
}

// leadingDigits is the run of digits that s starts with.
func leadingDigits(s string) string {
	for i, r := range s {
		if r < '0' || r > '9' {
			return s[:i]
		}
	}
	return s
}

// splitResult is what splitStream returned.
type splitResult struct {
	st  streamStats
	err error
}

// migrationEvent matches a MIGRATION event with one of the statuses.
func migrationEvent(ev Event, statuses ...string) bool {
	if ev.Name != "MIGRATION" {
		return false
	}
	st := eventStatus(ev)
	for _, s := range statuses {
		if st == s {
			return true
		}
	}
	return false
}

func eventStatus(ev Event) string {
	var d struct {
		Status string `json:"status"`
	}
	json.Unmarshal(ev.Data, &d)
	return d.Status
}

// migrationFailure explains a failed checkpoint migration: QEMU's error,
// or the stream reader's.
func (i *Instance) migrationFailure(ctx context.Context, splitDone chan splitResult) error {
	var ms migrationStatus
	i.qmp.Execute(ctx, "query-migrate", nil, &ms)
	select {
	case r := <-splitDone:
		if r.err != nil {
			return fmt.Errorf("reading the migration stream: %w (qemu: %s %s)", r.err, ms.Status, ms.ErrorDesc)
		}
	case <-time.After(time.Second):
	}
	return fmt.Errorf("the checkpoint's migration %s: %s", ms.Status, ms.ErrorDesc)
}
