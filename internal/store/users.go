package store

import (
	"context"
	"database/sql"
	"fmt"
	"time"

	"github.com/noid-vm/noid/internal/auth"
	"github.com/noid-vm/noid/internal/errdefs"
)

// User is a tenant of the server.
type User struct {
	ID          int64
	Name        string
	TokenPrefix string
	IsAdmin     bool
	// UnixUID is set for users mapped from a local unix uid (-1 otherwise).
	UnixUID   int64
	CreatedAt time.Time
	// Quota overrides; nil means the server default.
	MaxVMs             *int64
	MaxVCPUs           *int64
	MaxMemoryMiB       *int64
	MaxCheckpointBytes *int64
}

const userCols = `id, name, token_prefix, is_admin, COALESCE(unix_uid, -1), created_at, max_vms, max_vcpus, max_memory_mib, max_checkpoint_bytes`

func scanUser(sc interface{ Scan(...any) error }) (*User, error) {
	u := &User{}
	var created string
	var a, b, c, d sql.NullInt64
	if err := sc.Scan(&u.ID, &u.Name, &u.TokenPrefix, &u.IsAdmin, &u.UnixUID, &created, &a, &b, &c, &d); err != nil {
		return nil, err
	}
	u.CreatedAt = parseTime(created)
	ptr := func(n sql.NullInt64) *int64 {
		if !n.Valid {
			return nil
		}
		v := n.Int64
		return &v
	}
	u.MaxVMs, u.MaxVCPUs, u.MaxMemoryMiB, u.MaxCheckpointBytes = ptr(a), ptr(b), ptr(c), ptr(d)
	return u, nil
}

// CreateUser adds a token user and returns it with its new token. The token
// is shown once; only its hash is stored.
func (s *Store) CreateUser(ctx context.Context, name string, admin bool) (*User, string, error) {
	tok := auth.NewToken()
	_, err := s.db.ExecContext(ctx, `INSERT INTO users(name, token_hash, token_prefix, is_admin, created_at) VALUES (?, ?, ?, ?, ?)`,
		name, auth.HashToken(tok), auth.ShortPrefix(tok), admin, now())
	if isUnique(err) {
		return nil, "", fmt.Errorf("user %q: %w", name, errdefs.ErrAlreadyExists)
	}
	if err != nil {
		return nil, "", fmt.Errorf("creating user %q: %w", name, err)
	}
	u, err := s.UserByName(ctx, name)
	return u, tok, err
}

// EnsureUnixUser returns the user mapped to a local unix uid, creating it on
// first use. uid 0 is the admin.
func (s *Store) EnsureUnixUser(ctx context.Context, uid int64, name string) (*User, error) {
	u, err := scanUser(s.db.QueryRowContext(ctx, `SELECT `+userCols+` FROM users WHERE unix_uid = ?`, uid))
	if err == nil {
		return u, nil
	}
	if err != sql.ErrNoRows {
		return nil, err
	}
	// A token user may already have this name; local users then get a suffix.
	candidate := name
	for i := 0; ; i++ {
		if i > 0 {
			candidate = fmt.Sprintf("%s-%d", name, uid)
			if i > 1 {
				candidate = fmt.Sprintf("%s-%d-%d", name, uid, i)
			}
		}
		_, err = s.db.ExecContext(ctx, `INSERT INTO users(name, is_admin, unix_uid, created_at) VALUES (?, ?, ?, ?)`,
			candidate, uid == 0, uid, now())
		if err == nil || !isUnique(err) || i > 5 {
			break
		}
		// The uid itself may have been inserted concurrently.
		if u, err2 := scanUser(s.db.QueryRowContext(ctx, `SELECT `+userCols+` FROM users WHERE unix_uid = ?`, uid)); err2 == nil {
			return u, nil
		}
	}
	if err != nil {
		return nil, fmt.Errorf("creating local user for uid %d: %w", uid, err)
	}
	return scanUser(s.db.QueryRowContext(ctx, `SELECT `+userCols+` FROM users WHERE unix_uid = ?`, uid))
}

// UserByName returns the named user.
func (s *Store) UserByName(ctx context.Context, name string) (*User, error) {
	u, err := scanUser(s.rd.QueryRowContext(ctx, `SELECT `+userCols+` FROM users WHERE name = ?`, name))
	return u, wrapNoRows(err, "user", name)
}

// UserByID returns the user with that id.
func (s *Store) UserByID(ctx context.Context, id int64) (*User, error) {
	u, err := scanUser(s.rd.QueryRowContext(ctx, `SELECT `+userCols+` FROM users WHERE id = ?`, id))
	return u, wrapNoRows(err, "user", fmt.Sprint(id))
}

// UserByToken returns the user owning tok, or ErrUnauthenticated.
func (s *Store) UserByToken(ctx context.Context, tok string) (*User, error) {
	if !auth.WellFormed(tok) {
		return nil, fmt.Errorf("malformed token: %w", errdefs.ErrUnauthenticated)
	}
	h := auth.HashToken(tok)
	var stored string
	row := s.rd.QueryRowContext(ctx, `SELECT token_hash, `+userCols+` FROM users WHERE token_hash = ?`, h)
	u := &User{}
	var created string
	var a, b, c, d sql.NullInt64
	err := row.Scan(&stored, &u.ID, &u.Name, &u.TokenPrefix, &u.IsAdmin, &u.UnixUID, &created, &a, &b, &c, &d)
	if err == sql.ErrNoRows || (err == nil && !auth.HashesEqual(stored, h)) {
		return nil, fmt.Errorf("invalid token: %w", errdefs.ErrUnauthenticated)
	}
	if err != nil {
		return nil, err
	}
	return s.UserByID(ctx, u.ID)
}

// ListUsers returns every user, by name.
func (s *Store) ListUsers(ctx context.Context) ([]*User, error) {
	rows, err := s.rd.QueryContext(ctx, `SELECT `+userCols+` FROM users ORDER BY name`)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []*User
	for rows.Next() {
		u, err := scanUser(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, u)
	}
	return out, rows.Err()
}

// RotateToken replaces a user's token; the old one stops working at once.
func (s *Store) RotateToken(ctx context.Context, name string) (string, error) {
	tok := auth.NewToken()
	res, err := s.db.ExecContext(ctx, `UPDATE users SET token_hash = ?, token_prefix = ? WHERE name = ?`, auth.HashToken(tok), auth.ShortPrefix(tok), name)
	if err != nil {
		return "", fmt.Errorf("rotating token of %q: %w", name, err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return "", notFound("user", name)
	}
	return tok, nil
}

// SetQuota sets (or with nil clears) a user's quota overrides.
func (s *Store) SetQuota(ctx context.Context, name string, vms, vcpus, memMiB, cpBytes *int64) error {
	res, err := s.db.ExecContext(ctx, `UPDATE users SET max_vms = ?, max_vcpus = ?, max_memory_mib = ?, max_checkpoint_bytes = ? WHERE name = ?`,
		vms, vcpus, memMiB, cpBytes, name)
	if err != nil {
		return err
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return notFound("user", name)
	}
	return nil
}

// DeleteUser removes a user row. The caller must have removed the user's VMs
// and checkpoints first; the foreign keys refuse otherwise.
func (s *Store) DeleteUser(ctx context.Context, id int64) error {
	_, err := s.db.ExecContext(ctx, `DELETE FROM users WHERE id = ?`, id)
	if err != nil {
		return fmt.Errorf("deleting user %d: %w", id, err)
	}
	return nil
}

// ImportedUser says what ImportUser did with one user.
type ImportedUser int

// The outcomes of ImportUser.
const (
	// UserImported: the user was added with the token hash.
	UserImported ImportedUser = iota
	// UserAlreadyImported: the user exists here with that token hash
	// already (an earlier import).
	UserAlreadyImported
	// UserNameTaken: a user of that name exists here with another token;
	// it was left as it is.
	UserNameTaken
	// UserTokenTaken: another user here has that token hash; nothing
	// was added.
	UserTokenTaken
)

// ImportUser adds a token user whose token is known only by its hash
// (HashToken's form: hex SHA-256 of the whole token), as the original
// noid stored it, so that the token keeps authenticating. The token's
// short prefix is unknown and stays empty. A user of that name that exists
// already is never changed.
func (s *Store) ImportUser(ctx context.Context, name, tokenHash string, created time.Time) (ImportedUser, error) {
	var have sql.NullString
	err := s.db.QueryRowContext(ctx, `SELECT token_hash FROM users WHERE name = ?`, name).Scan(&have)
	switch {
	case err == nil && have.Valid && auth.HashesEqual(have.String, tokenHash):
		return UserAlreadyImported, nil
	case err == nil:
		return UserNameTaken, nil
	case err != sql.ErrNoRows:
		return 0, fmt.Errorf("looking up user %q: %w", name, err)
	}
	if created.IsZero() {
		created = time.Now()
	}
	_, err = s.db.ExecContext(ctx, `INSERT INTO users(name, token_hash, token_prefix, is_admin, created_at) VALUES (?, ?, '', 0, ?)`,
		name, tokenHash, fmtTime(created))
	if isUnique(err) {
		return UserTokenTaken, nil
	}
	if err != nil {
		return 0, fmt.Errorf("importing user %q: %w", name, err)
	}
	return UserImported, nil
}
