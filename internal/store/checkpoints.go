package store

import (
	"context"
	"database/sql"
	"fmt"
	"time"

	"github.com/noid-vm/noid/internal/errdefs"
)

// Checkpoint is one complete snapshot of a VM. A row exists only once its
// directory is complete on disk.
type Checkpoint struct {
	ID        string
	VMID      string
	UserID    int64
	Name      string
	Label     string
	Backend   string
	VCPUs     int
	MemoryMiB int
	SizeBytes int64
	PauseNs   int64
	CreatedAt time.Time
}

const cpCols = `id, vm_id, user_id, name, label, backend, vcpus, memory_mib, size_bytes, pause_ns, created_at`

func scanCP(sc interface{ Scan(...any) error }) (*Checkpoint, error) {
	c := &Checkpoint{}
	var created string
	if err := sc.Scan(&c.ID, &c.VMID, &c.UserID, &c.Name, &c.Label, &c.Backend, &c.VCPUs, &c.MemoryMiB, &c.SizeBytes, &c.PauseNs, &created); err != nil {
		return nil, err
	}
	c.CreatedAt = parseTime(created)
	return c, nil
}

// CheckpointNameFree reports ErrAlreadyExists when the VM already has a
// checkpoint with that name.
func (s *Store) CheckpointNameFree(ctx context.Context, vmID, name string) error {
	var n int
	if err := s.rd.QueryRowContext(ctx, `SELECT COUNT(*) FROM checkpoints WHERE vm_id = ? AND name = ?`, vmID, name).Scan(&n); err != nil {
		return err
	}
	if n > 0 {
		return fmt.Errorf("checkpoint %q: %w", name, errdefs.ErrAlreadyExists)
	}
	return nil
}

// CreateCheckpoint records a complete checkpoint. checkQuota, when set, sees
// the user's usage in the same transaction and may refuse.
func (s *Store) CreateCheckpoint(ctx context.Context, c *Checkpoint, checkQuota func(Usage) error) error {
	if c.CreatedAt.IsZero() {
		c.CreatedAt = time.Now().UTC()
	}
	return s.tx(ctx, func(tx *sql.Tx) error {
		if checkQuota != nil {
			u, err := usage(ctx, tx, c.UserID)
			if err != nil {
				return err
			}
			if err := checkQuota(u); err != nil {
				return err
			}
		}
		_, err := tx.ExecContext(ctx, `INSERT INTO checkpoints(`+cpCols+`) VALUES (?,?,?,?,?,?,?,?,?,?,?)`,
			c.ID, c.VMID, c.UserID, c.Name, c.Label, c.Backend, c.VCPUs, c.MemoryMiB, c.SizeBytes, c.PauseNs, fmtTime(c.CreatedAt))
		if isUnique(err) {
			return fmt.Errorf("checkpoint %q: %w", c.Name, errdefs.ErrAlreadyExists)
		}
		return err
	})
}

// GetCheckpoint finds a VM's checkpoint by name or id.
func (s *Store) GetCheckpoint(ctx context.Context, userID int64, vmID, nameOrID string) (*Checkpoint, error) {
	c, err := scanCP(s.rd.QueryRowContext(ctx, `SELECT `+cpCols+` FROM checkpoints WHERE user_id = ? AND vm_id = ? AND (name = ? OR id = ?) ORDER BY name = ? DESC LIMIT 1`,
		userID, vmID, nameOrID, nameOrID, nameOrID))
	if err == sql.ErrNoRows {
		return nil, errdefs.WithHint(notFound("checkpoint", nameOrID), "noid checkpoints <vm>")
	}
	return c, err
}

// GetCheckpointByID finds any of the user's checkpoints by id.
func (s *Store) GetCheckpointByID(ctx context.Context, userID int64, id string) (*Checkpoint, error) {
	c, err := scanCP(s.rd.QueryRowContext(ctx, `SELECT `+cpCols+` FROM checkpoints WHERE user_id = ? AND id = ?`, userID, id))
	return c, wrapNoRows(err, "checkpoint", id)
}

// cpWhere is the WHERE clause that selects the checkpoints of userID (every
// user's when negative) and of vmID (every VM's when empty).
func cpWhere(userID int64, vmID string) (string, []any) {
	q := ` WHERE 1=1`
	var args []any
	if userID >= 0 {
		q += ` AND user_id = ?`
		args = append(args, userID)
	}
	if vmID != "" {
		q += ` AND vm_id = ?`
		args = append(args, vmID)
	}
	return q, args
}

// CheckpointCounts returns how many checkpoints each VM has, by VM id, in
// one query: the user's VMs (every user's for a negative userID), or only
// vmID when it is set. VMs without checkpoints are absent from the map.
func (s *Store) CheckpointCounts(ctx context.Context, userID int64, vmID string) (map[string]int, error) {
	where, args := cpWhere(userID, vmID)
	rows, err := s.rd.QueryContext(ctx, `SELECT vm_id, COUNT(*) FROM checkpoints`+where+` GROUP BY vm_id`, args...)
	if err != nil {
		return nil, fmt.Errorf("counting checkpoints: %w", err)
	}
	defer rows.Close()
	out := map[string]int{}
	for rows.Next() {
		var id string
		var n int
		if err := rows.Scan(&id, &n); err != nil {
			return nil, fmt.Errorf("counting checkpoints: %w", err)
		}
		out[id] = n
	}
	return out, rows.Err()
}

// ListCheckpoints returns a VM's checkpoints, oldest first; vmID "" lists
// all of the user's, and userID < 0 all users'.
func (s *Store) ListCheckpoints(ctx context.Context, userID int64, vmID string) ([]*Checkpoint, error) {
	where, args := cpWhere(userID, vmID)
	rows, err := s.rd.QueryContext(ctx, `SELECT `+cpCols+` FROM checkpoints`+where+` ORDER BY created_at, name`, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []*Checkpoint
	for rows.Next() {
		c, err := scanCP(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, c)
	}
	return out, rows.Err()
}

// DeleteCheckpoint removes a checkpoint row.
func (s *Store) DeleteCheckpoint(ctx context.Context, id string) error {
	_, err := s.db.ExecContext(ctx, `DELETE FROM checkpoints WHERE id = ?`, id)
	return err
}

// AuditEntry is one line of the audit log.
type AuditEntry struct {
	At        time.Time
	User      string
	Action    string
	Target    string
	Result    string
	RequestID string
}

// Audit appends an entry to the audit log. It must never be given secrets.
// Its fields can come from the caller (the target is a decoded path value,
// the request id a header), so each is stored escaped (escapeStored): no
// newline, tab or terminal escape sequence reaches the log.
func (s *Store) Audit(ctx context.Context, e AuditEntry) error {
	if e.At.IsZero() {
		e.At = time.Now().UTC()
	}
	_, err := s.db.ExecContext(ctx, `INSERT INTO audit(at, user_name, action, target, result, request_id) VALUES (?,?,?,?,?,?)`,
		fmtTime(e.At), escapeStored(e.User), escapeStored(e.Action), escapeStored(e.Target), escapeStored(e.Result), escapeStored(e.RequestID))
	return err
}

// AuditLog returns the most recent entries, newest last.
func (s *Store) AuditLog(ctx context.Context, limit int) ([]AuditEntry, error) {
	rows, err := s.rd.QueryContext(ctx, `SELECT at, user_name, action, target, result, request_id FROM (SELECT * FROM audit ORDER BY id DESC LIMIT ?) ORDER BY id`, limit)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []AuditEntry
	for rows.Next() {
		var e AuditEntry
		var at string
		if err := rows.Scan(&at, &e.User, &e.Action, &e.Target, &e.Result, &e.RequestID); err != nil {
			return nil, err
		}
		e.At = parseTime(at)
		out = append(out, e)
	}
	return out, rows.Err()
}
