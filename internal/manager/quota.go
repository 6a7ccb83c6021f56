package manager

import (
	"context"
	"fmt"
	"sync"

	"github.com/noid-vm/noid/internal/errdefs"
	"github.com/noid-vm/noid/internal/store"
	"github.com/noid-vm/noid/internal/vmm"
)

// Quotas under concurrency.
//
// VM count, vCPUs and memory are checked in the transaction that inserts
// the VM's row (store.CreateVM, through insertVM), and the store has a
// single writer connection that begins every transaction IMMEDIATE: two
// creates never both see the usage from before the other's row. A VM
// counts from its insert (state creating) until its row is deleted.
//
// Checkpoint bytes cannot work that way: a checkpoint's size is known only
// once it is written, and writing it is the cost the quota bounds. So a
// checkpoint first reserves an upper bound of its size (cpEstimate),
// checked against the user's stored checkpoints plus the reservations of
// the checkpoints still being written, and only then writes anything. Its
// row is inserted with its real size and the reservation dropped in one
// step under quotaMu; a failed checkpoint drops its reservation. The
// reservations live in the manager's memory only, with the half-written
// checkpoint directories they stand for: a crashed server forgets them,
// and the next one removes those directories at start-up (recover), so a
// reservation never outlives the write it was made for.

// cpStateSlack bounds what a checkpoint holds besides the VM's memory and
// disk: the device state, metadata and checksums (a tiny VM's are well
// under 1 MiB).
const cpStateSlack = 8 << 20

// quotaState holds the checkpoint bytes reserved by checkpoints being
// written, per user id.
type quotaState struct {
	// mu makes a check and the reservation, or a row's insert and the
	// release of its reservation, one step for every other checkpoint.
	mu         sync.Mutex
	cpReserved map[int64]int64
}

// checkpointLimit is the user's checkpoint bytes quota; 0 is no limit.
func (m *Manager) checkpointLimit(u *store.User) int64 {
	if u.MaxCheckpointBytes != nil {
		return *u.MaxCheckpointBytes
	}
	return m.cfg.QuotaLimitsFor(u.IsAdmin).MaxCheckpointBytes
}

// cpEstimate is an upper bound of the size of a checkpoint of v, taken
// now: its whole memory, the disk layers the checkpoint will link (as
// snapshotSize counts them: not the base image), and cpStateSlack. With a
// backend whose checkpoints copy the disk, the disk is what the VM's
// directory holds. A guest that writes to its disk while the checkpoint is
// taken can make the real size larger; the final check catches that.
func (m *Manager) cpEstimate(v *store.VM) int64 {
	dir := m.vmDir(v)
	disk := m.snapshotSize(dir)
	if l, ok := m.backend.(vmm.Layered); ok {
		if layers, err := l.DiskLayers(dir); err == nil {
			disk = m.spaceOf(layers)
		}
	}
	return int64(v.MemoryMiB)<<20 + disk + cpStateSlack
}

// cpReservation is checkpoint space reserved for one checkpoint of a user
// while it is written.
type cpReservation struct {
	m     *Manager
	u     *store.User
	bytes int64
	done  bool
}

// reserveCheckpoint reserves n bytes of u's checkpoint quota, or fails with
// ErrQuotaExceeded when the user's checkpoints, the reservations of those
// being written and n would exceed it. The caller settles or releases it.
func (m *Manager) reserveCheckpoint(ctx context.Context, u *store.User, n int64) (*cpReservation, error) {
	q := &m.quota
	q.mu.Lock()
	defer q.mu.Unlock()
	if lim := m.checkpointLimit(u); lim > 0 {
		use, err := m.store.UserUsage(ctx, u.ID)
		if err != nil {
			return nil, fmt.Errorf("reading the checkpoint usage of user %s: %w", u.Name, err)
		}
		_, golden := m.goldenUsage(u)
		if err := cpQuotaError(u, lim, use.CheckpointBytes, golden, q.cpReserved[u.ID], n, "needs up to"); err != nil {
			return nil, err
		}
	}
	if q.cpReserved == nil {
		q.cpReserved = map[int64]int64{}
	}
	q.cpReserved[u.ID] += n
	return &cpReservation{m: m, u: u, bytes: n}, nil
}

// cpQuotaError refuses a checkpoint of n bytes (what says how n is known)
// when the stored checkpoints, the user's golden snapshots (golden bytes,
// see goldenquota.go), the reservations and n would exceed lim.
func cpQuotaError(u *store.User, lim, stored, golden, reserved, n int64, what string) error {
	if stored+golden+reserved+n <= lim {
		return nil
	}
	err := fmt.Errorf("%w: checkpoint storage of user %s would be %d bytes, the limit is %d (stored checkpoints %d, golden snapshots hold %d, being written %d, this one %s %d)",
		errdefs.ErrQuotaExceeded, u.Name, stored+golden+reserved+n, lim, stored, golden, reserved, what, n)
	return errdefs.WithHint(err, "delete old checkpoints with `noid checkpoint rm` or goldens with `noid golden rm`")
}

// settle records c, whose SizeBytes is its real size, in the store and
// drops the reservation, as one step for every other checkpoint of the
// user. The real size is checked against the quota again (the guest may
// have grown its disk past the estimate); a refused c is not recorded.
// The reservation is dropped either way.
func (r *cpReservation) settle(ctx context.Context, c *store.Checkpoint) error {
	q := &r.m.quota
	q.mu.Lock()
	defer q.mu.Unlock()
	lim := r.m.checkpointLimit(r.u)
	others := q.cpReserved[r.u.ID] - r.bytes
	var golden int64
	if lim > 0 {
		_, golden = r.m.goldenUsage(r.u)
	}
	err := r.m.store.CreateCheckpoint(ctx, c, func(use store.Usage) error {
		if lim <= 0 {
			return nil
		}
		return cpQuotaError(r.u, lim, use.CheckpointBytes, golden, others, c.SizeBytes, "takes")
	})
	r.releaseLocked()
	return err
}

// release drops the reservation of a checkpoint that failed; it is a
// no-op once settled or released.
func (r *cpReservation) release() {
	q := &r.m.quota
	q.mu.Lock()
	defer q.mu.Unlock()
	r.releaseLocked()
}

func (r *cpReservation) releaseLocked() {
	if r.done {
		return
	}
	r.done = true
	q := &r.m.quota
	if q.cpReserved[r.u.ID] -= r.bytes; q.cpReserved[r.u.ID] <= 0 {
		delete(q.cpReserved, r.u.ID)
	}
}

// checkpointReserved is the checkpoint bytes reserved by u's checkpoints
// being written (tests and metrics).
func (m *Manager) checkpointReserved(uid int64) int64 {
	m.quota.mu.Lock()
	defer m.quota.mu.Unlock()
	return m.quota.cpReserved[uid]
}
