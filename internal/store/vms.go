package store

import (
	"context"
	"database/sql"
	"fmt"
	"time"

	"github.com/noid-vm/noid/internal/errdefs"
)

// VM states as stored. The server owns every transition.
const (
	StateCreating   = "creating"
	StateRunning    = "running"
	StateRestoring  = "restoring"
	StateDead       = "dead"
	StateDestroying = "destroying"
)

// VM is one virtual machine's metadata.
type VM struct {
	ID          string
	UserID      int64
	Name        string
	State       string
	StateReason string
	PID         int
	VCPUs       int
	MemoryMiB   int
	DiskBytes   int64
	VMM         string
	Accel       string
	// BootPath is how the VM came to life: cold, golden, restore or clone.
	BootPath string
	// BootReason says why that path was taken (e.g. why golden was not used).
	BootReason string
	Kernel     string
	Initrd     string
	// Network is "default" or "none".
	Network    string
	AllowPeers bool
	MAC        string
	IP         string
	Tap        string
	// Source is the checkpoint or golden snapshot the VM came from, if any.
	Source    string
	CreatedAt time.Time
	StartedAt time.Time
	// RuntimeID names the VM's current VMM run (its process name, sockets,
	// cgroup and sandbox uid lease). Empty means ID; a rewind that took a
	// warm spare sets it to the spare's id.
	RuntimeID string
}

// Runtime is the id of the VM's current VMM run: RuntimeID, or ID.
func (v *VM) Runtime() string {
	if v.RuntimeID != "" {
		return v.RuntimeID
	}
	return v.ID
}

const vmInsertCols = `id, user_id, name, state, state_reason, pid, vcpus, memory_mib, disk_bytes, vmm, accel, boot_path, boot_reason, kernel, initrd, network, allow_peers, mac, ip, tap, source, created_at, started_at, runtime_id`

const vmCols = `id, user_id, name, state, state_reason, pid, vcpus, memory_mib, disk_bytes, vmm, accel, boot_path, boot_reason, kernel, initrd, network, allow_peers, mac, COALESCE(ip, ''), tap, source, created_at, started_at, runtime_id`

func scanVM(sc interface{ Scan(...any) error }) (*VM, error) {
	v := &VM{}
	var created, started string
	err := sc.Scan(&v.ID, &v.UserID, &v.Name, &v.State, &v.StateReason, &v.PID, &v.VCPUs, &v.MemoryMiB, &v.DiskBytes, &v.VMM, &v.Accel,
		&v.BootPath, &v.BootReason, &v.Kernel, &v.Initrd, &v.Network, &v.AllowPeers, &v.MAC, &v.IP, &v.Tap, &v.Source, &created, &started, &v.RuntimeID)
	if err != nil {
		return nil, err
	}
	v.CreatedAt, v.StartedAt = parseTime(created), parseTime(started)
	return v, nil
}

func nullIP(ip string) any {
	if ip == "" {
		return nil
	}
	return ip
}

// IPAllocator picks a free address given the set of addresses in use. It is
// called inside the insert transaction, so concurrent creates never collide.
type IPAllocator func(used map[string]bool) (string, error)

// CreateOpts are checks and allocations done atomically with a VM insert.
type CreateOpts struct {
	// AllocIP, when set, chooses v.IP.
	AllocIP IPAllocator
	// CheckQuota, when set, sees the user's usage before the insert and may refuse it.
	CheckQuota func(Usage) error
}

// CreateVM inserts v. A duplicate name gives ErrAlreadyExists. Quota and IP
// allocation run in the same transaction, so nothing is half-created.
func (s *Store) CreateVM(ctx context.Context, v *VM, opts CreateOpts) error {
	if v.CreatedAt.IsZero() {
		v.CreatedAt = time.Now().UTC()
	}
	return s.tx(ctx, func(tx *sql.Tx) error {
		var n int
		if err := tx.QueryRowContext(ctx, `SELECT COUNT(*) FROM vms WHERE user_id = ? AND name = ?`, v.UserID, v.Name).Scan(&n); err != nil {
			return err
		}
		if n > 0 {
			return errdefs.WithHint(fmt.Errorf("vm %q: %w", v.Name, errdefs.ErrAlreadyExists), "pick another name, or `noid destroy "+v.Name+"` first")
		}
		if opts.CheckQuota != nil {
			u, err := usage(ctx, tx, v.UserID)
			if err != nil {
				return err
			}
			if err := opts.CheckQuota(u); err != nil {
				return err
			}
		}
		if opts.AllocIP != nil {
			used, err := usedIPs(ctx, tx)
			if err != nil {
				return err
			}
			ip, err := opts.AllocIP(used)
			if err != nil {
				return err
			}
			v.IP = ip
		}
		_, err := tx.ExecContext(ctx, `INSERT INTO vms(`+vmInsertCols+`) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)`,
			v.ID, v.UserID, v.Name, v.State, v.StateReason, v.PID, v.VCPUs, v.MemoryMiB, v.DiskBytes, v.VMM, v.Accel,
			v.BootPath, v.BootReason, v.Kernel, v.Initrd, v.Network, v.AllowPeers, v.MAC, nullIP(v.IP), v.Tap, v.Source,
			fmtTime(v.CreatedAt), fmtTime(v.StartedAt), v.RuntimeID)
		if isUnique(err) {
			return fmt.Errorf("vm %q: %w", v.Name, errdefs.ErrAlreadyExists)
		}
		return err
	})
}

func usedIPs(ctx context.Context, tx *sql.Tx) (map[string]bool, error) {
	rows, err := tx.QueryContext(ctx, `SELECT ip FROM vms WHERE ip IS NOT NULL`)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	used := map[string]bool{}
	for rows.Next() {
		var ip string
		if err := rows.Scan(&ip); err != nil {
			return nil, err
		}
		used[ip] = true
	}
	return used, rows.Err()
}

// UpdateVM writes every mutable field of v.
func (s *Store) UpdateVM(ctx context.Context, v *VM) error {
	res, err := s.db.ExecContext(ctx, `UPDATE vms SET state=?, state_reason=?, pid=?, vcpus=?, memory_mib=?, disk_bytes=?, vmm=?, accel=?,
		boot_path=?, boot_reason=?, kernel=?, initrd=?, network=?, allow_peers=?, mac=?, ip=?, tap=?, source=?, started_at=?, runtime_id=? WHERE id=?`,
		v.State, v.StateReason, v.PID, v.VCPUs, v.MemoryMiB, v.DiskBytes, v.VMM, v.Accel, v.BootPath, v.BootReason, v.Kernel, v.Initrd,
		v.Network, v.AllowPeers, v.MAC, nullIP(v.IP), v.Tap, v.Source, fmtTime(v.StartedAt), v.RuntimeID, v.ID)
	if err != nil {
		return fmt.Errorf("updating vm %s: %w", v.Name, err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return notFound("vm", v.Name)
	}
	return nil
}

// SetVMState changes only the state, reason and pid of a VM.
func (s *Store) SetVMState(ctx context.Context, id, state, reason string, pid int) error {
	_, err := s.db.ExecContext(ctx, `UPDATE vms SET state=?, state_reason=?, pid=? WHERE id=?`, state, reason, pid, id)
	if err != nil {
		return fmt.Errorf("setting vm %s state: %w", id, err)
	}
	return nil
}

// GetVM returns the user's VM by name.
func (s *Store) GetVM(ctx context.Context, userID int64, name string) (*VM, error) {
	v, err := scanVM(s.rd.QueryRowContext(ctx, `SELECT `+vmCols+` FROM vms WHERE user_id = ? AND name = ?`, userID, name))
	if err == sql.ErrNoRows {
		return nil, errdefs.WithHint(notFound("vm", name), "noid list")
	}
	return v, err
}

// GetVMByID returns a VM by id, for any user (server-internal use).
func (s *Store) GetVMByID(ctx context.Context, id string) (*VM, error) {
	v, err := scanVM(s.rd.QueryRowContext(ctx, `SELECT `+vmCols+` FROM vms WHERE id = ?`, id))
	return v, wrapNoRows(err, "vm", id)
}

// GetVMByIP returns the VM holding ip, for any user (DNS scoping).
func (s *Store) GetVMByIP(ctx context.Context, ip string) (*VM, error) {
	v, err := scanVM(s.rd.QueryRowContext(ctx, `SELECT `+vmCols+` FROM vms WHERE ip = ?`, ip))
	return v, wrapNoRows(err, "vm with ip", ip)
}

// ListVMs returns the user's VMs by creation time; userID < 0 lists all users'.
func (s *Store) ListVMs(ctx context.Context, userID int64) ([]*VM, error) {
	q := `SELECT ` + vmCols + ` FROM vms WHERE user_id = ? ORDER BY created_at, name`
	args := []any{userID}
	if userID < 0 {
		q = `SELECT ` + vmCols + ` FROM vms ORDER BY created_at, name`
		args = nil
	}
	rows, err := s.rd.QueryContext(ctx, q, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []*VM
	for rows.Next() {
		v, err := scanVM(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, v)
	}
	return out, rows.Err()
}

// DeleteVM removes a VM row and its checkpoint rows in one transaction.
func (s *Store) DeleteVM(ctx context.Context, id string) error {
	return s.tx(ctx, func(tx *sql.Tx) error {
		if _, err := tx.ExecContext(ctx, `DELETE FROM checkpoints WHERE vm_id = ?`, id); err != nil {
			return err
		}
		_, err := tx.ExecContext(ctx, `DELETE FROM vms WHERE id = ?`, id)
		return err
	})
}

// Usage is what a user currently consumes, for quotas.
type Usage struct {
	VMs             int
	VCPUs           int
	MemoryMiB       int
	CheckpointBytes int64
}

// UserUsage sums a user's VMs and checkpoints.
func (s *Store) UserUsage(ctx context.Context, userID int64) (Usage, error) {
	var u Usage
	err := s.tx(ctx, func(tx *sql.Tx) error {
		var err error
		u, err = usage(ctx, tx, userID)
		return err
	})
	return u, err
}

func usage(ctx context.Context, tx *sql.Tx, userID int64) (Usage, error) {
	var u Usage
	err := tx.QueryRowContext(ctx, `SELECT COUNT(*), COALESCE(SUM(vcpus),0), COALESCE(SUM(memory_mib),0) FROM vms WHERE user_id = ?`, userID).
		Scan(&u.VMs, &u.VCPUs, &u.MemoryMiB)
	if err != nil {
		return u, err
	}
	err = tx.QueryRowContext(ctx, `SELECT COALESCE(SUM(size_bytes),0) FROM checkpoints WHERE user_id = ?`, userID).Scan(&u.CheckpointBytes)
	return u, err
}
