// Package store keeps noid's metadata in an embedded SQLite database
// (modernc.org/sqlite, no cgo) with versioned migrations.
//
// Every row that belongs to a user carries its user_id, and every query that
// reads or changes such rows is scoped by it, so one user can never see
// another's objects through the store.
package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	_ "modernc.org/sqlite" // registers the "sqlite" driver

	"github.com/noid-vm/noid/internal/errdefs"
)

// Store is the metadata database. It is safe for concurrent use.
type Store struct {
	// db is the single writer connection: writes and transactions go
	// through it, one at a time, so they never meet SQLITE_BUSY.
	db *sql.DB
	// rd is a pool of read-only connections for plain reads. In WAL mode
	// they read the last committed state while a write is in progress, so
	// lists, lookups and every request's token check do not queue behind
	// lifecycle writes.
	rd *sql.DB
}

// readConns is how many read-only connections the store opens at most.
const readConns = 4

// Open opens (creating if needed) the database at path and applies pending
// migrations.
func Open(ctx context.Context, path string) (*Store, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("creating database dir: %w", err)
	}
	if err := privateFiles(path); err != nil {
		return nil, err
	}
	dsn := "file:" + path + "?_pragma=busy_timeout(10000)&_pragma=journal_mode(WAL)&_pragma=foreign_keys(1)&_pragma=synchronous(NORMAL)&_txlock=immediate"
	db, err := sql.Open("sqlite", dsn)
	if err != nil {
		return nil, fmt.Errorf("opening database %s: %w", path, err)
	}
	// One connection serialises writers and avoids SQLITE_BUSY; every
	// transaction here is short.
	db.SetMaxOpenConns(1)
	s := &Store{db: db}
	if err := s.migrate(ctx); err != nil {
		db.Close()
		return nil, fmt.Errorf("migrating database %s: %w", path, err)
	}
	rd, err := sql.Open("sqlite", "file:"+path+"?_pragma=busy_timeout(10000)&_pragma=query_only(1)")
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("opening database %s for reading: %w", path, err)
	}
	rd.SetMaxOpenConns(readConns)
	rd.SetMaxIdleConns(readConns)
	s.rd = rd
	// Open every read connection now and keep them: the server's file
	// descriptors then stay the same under load, which the load
	// benchmark checks to find leaks.
	conns := make([]*sql.Conn, 0, readConns)
	defer func() {
		for _, c := range conns {
			c.Close() // back to the pool, which keeps it open
		}
	}()
	for range readConns {
		c, err := rd.Conn(ctx)
		if err == nil {
			// A read opens the connection's WAL file too.
			var n int
			err = c.QueryRowContext(ctx, `SELECT COUNT(*) FROM schema_migrations`).Scan(&n)
		}
		if err != nil {
			s.Close()
			return nil, fmt.Errorf("opening database %s for reading: %w", path, err)
		}
		conns = append(conns, c)
	}
	return s, nil
}

// privateFiles creates the database file with mode 0600 if it is missing
// and gives it, and the -wal and -shm files an older noid left, mode 0600.
// SQLite creates the -wal and -shm files with the mode of the database
// file, so they are 0600 too from then on.
func privateFiles(path string) error {
	f, err := os.OpenFile(path, os.O_RDONLY|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("creating database %s: %w", path, err)
	}
	f.Close()
	for _, p := range []string{path, path + "-wal", path + "-shm"} {
		if err := os.Chmod(p, 0o600); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("securing database file %s: %w", p, err)
		}
	}
	return nil
}

// Close closes the database.
func (s *Store) Close() error { return errors.Join(s.rd.Close(), s.db.Close()) }

// migrations are applied in order; never edit one that has shipped, append.
var migrations = []string{
	// 1: users, vms, checkpoints, audit.
	`
CREATE TABLE users (
	id INTEGER PRIMARY KEY,
	name TEXT NOT NULL UNIQUE,
	token_hash TEXT UNIQUE,
	token_prefix TEXT NOT NULL DEFAULT '',
	is_admin INTEGER NOT NULL DEFAULT 0,
	unix_uid INTEGER UNIQUE,
	max_vms INTEGER,
	max_vcpus INTEGER,
	max_memory_mib INTEGER,
	max_checkpoint_bytes INTEGER,
	created_at TEXT NOT NULL
);
CREATE TABLE vms (
	id TEXT PRIMARY KEY,
	user_id INTEGER NOT NULL REFERENCES users(id),
	name TEXT NOT NULL,
	state TEXT NOT NULL,
	state_reason TEXT NOT NULL DEFAULT '',
	pid INTEGER NOT NULL DEFAULT 0,
	vcpus INTEGER NOT NULL,
	memory_mib INTEGER NOT NULL,
	disk_bytes INTEGER NOT NULL DEFAULT 0,
	vmm TEXT NOT NULL,
	accel TEXT NOT NULL DEFAULT '',
	boot_path TEXT NOT NULL DEFAULT '',
	boot_reason TEXT NOT NULL DEFAULT '',
	kernel TEXT NOT NULL DEFAULT '',
	initrd TEXT NOT NULL DEFAULT '',
	network TEXT NOT NULL DEFAULT 'default',
	allow_peers INTEGER NOT NULL DEFAULT 0,
	mac TEXT NOT NULL DEFAULT '',
	ip TEXT,
	tap TEXT NOT NULL DEFAULT '',
	source TEXT NOT NULL DEFAULT '',
	created_at TEXT NOT NULL,
	started_at TEXT NOT NULL DEFAULT '',
	UNIQUE(user_id, name),
	UNIQUE(ip)
);
CREATE TABLE checkpoints (
	id TEXT PRIMARY KEY,
	vm_id TEXT NOT NULL REFERENCES vms(id),
	user_id INTEGER NOT NULL REFERENCES users(id),
	name TEXT NOT NULL,
	label TEXT NOT NULL DEFAULT '',
	backend TEXT NOT NULL,
	vcpus INTEGER NOT NULL,
	memory_mib INTEGER NOT NULL,
	size_bytes INTEGER NOT NULL DEFAULT 0,
	pause_ns INTEGER NOT NULL DEFAULT 0,
	created_at TEXT NOT NULL,
	UNIQUE(vm_id, name)
);
CREATE TABLE audit (
	id INTEGER PRIMARY KEY,
	at TEXT NOT NULL,
	user_name TEXT NOT NULL,
	action TEXT NOT NULL,
	target TEXT NOT NULL,
	result TEXT NOT NULL,
	request_id TEXT NOT NULL DEFAULT ''
);
`,
	// 2: the id of a VM's current VMM run, when a rewind moved it to a warm spare.
	`ALTER TABLE vms ADD COLUMN runtime_id TEXT NOT NULL DEFAULT ''`,
}

func (s *Store) migrate(ctx context.Context) error {
	if _, err := s.db.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)`); err != nil {
		return err
	}
	var cur int
	if err := s.db.QueryRowContext(ctx, `SELECT COALESCE(MAX(version), 0) FROM schema_migrations`).Scan(&cur); err != nil {
		return err
	}
	if cur > len(migrations) {
		return fmt.Errorf("database schema version %d is newer than this noid-server (%d); upgrade noid-server", cur, len(migrations))
	}
	for v := cur + 1; v <= len(migrations); v++ {
		err := s.tx(ctx, func(tx *sql.Tx) error {
			if _, err := tx.ExecContext(ctx, migrations[v-1]); err != nil {
				return fmt.Errorf("migration %d: %w", v, err)
			}
			_, err := tx.ExecContext(ctx, `INSERT INTO schema_migrations(version, applied_at) VALUES (?, ?)`, v, now())
			return err
		})
		if err != nil {
			return err
		}
	}
	return nil
}

// SchemaVersion returns the applied migration version.
func (s *Store) SchemaVersion(ctx context.Context) (int, error) {
	var v int
	err := s.db.QueryRowContext(ctx, `SELECT COALESCE(MAX(version), 0) FROM schema_migrations`).Scan(&v)
	return v, err
}

func (s *Store) tx(ctx context.Context, fn func(*sql.Tx) error) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	if err := fn(tx); err != nil {
		tx.Rollback()
		return err
	}
	return tx.Commit()
}

const timeFormat = time.RFC3339Nano

func now() string { return time.Now().UTC().Format(timeFormat) }

func parseTime(s string) time.Time {
	if s == "" {
		return time.Time{}
	}
	t, _ := time.Parse(timeFormat, s)
	return t
}

func fmtTime(t time.Time) string {
	if t.IsZero() {
		return ""
	}
	return t.UTC().Format(timeFormat)
}

// isUnique reports whether err is a UNIQUE constraint violation.
func isUnique(err error) bool {
	return err != nil && strings.Contains(err.Error(), "UNIQUE constraint failed")
}

func notFound(what, name string) error {
	return fmt.Errorf("%s %q: %w", what, name, errdefs.ErrNotFound)
}

func wrapNoRows(err error, what, name string) error {
	if errors.Is(err, sql.ErrNoRows) {
		return notFound(what, name)
	}
	return err
}
