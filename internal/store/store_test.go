package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/noid-vm/noid/internal/errdefs"
)

func open(t *testing.T) *Store {
	t.Helper()
	s, err := Open(context.Background(), filepath.Join(t.TempDir(), "noid.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func TestMigrationsIdempotent(t *testing.T) {
	path := filepath.Join(t.TempDir(), "noid.db")
	ctx := context.Background()
	for i := 0; i < 2; i++ {
		s, err := Open(ctx, path)
		if err != nil {
			t.Fatal(err)
		}
		v, err := s.SchemaVersion(ctx)
		if err != nil || v != len(migrations) {
			t.Fatalf("schema version %d %v, want %d", v, err, len(migrations))
		}
		s.Close()
	}
}

func TestUsersAndTokens(t *testing.T) {
	s, ctx := open(t), context.Background()
	u, tok, err := s.CreateUser(ctx, "alice", false)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := s.CreateUser(ctx, "alice", false); !errors.Is(err, errdefs.ErrAlreadyExists) {
		t.Fatalf("duplicate user: %v", err)
	}
	got, err := s.UserByToken(ctx, tok)
	if err != nil || got.ID != u.ID {
		t.Fatalf("by token: %+v %v", got, err)
	}
	for _, bad := range []string{"", "noid_tok_", tok[:len(tok)-1] + "x", "noid_tok_" + fmt.Sprintf("%064d", 0)} {
		if _, err := s.UserByToken(ctx, bad); !errors.Is(err, errdefs.ErrUnauthenticated) {
			t.Errorf("token %q: %v", bad, err)
		}
	}
	tok2, err := s.RotateToken(ctx, "alice")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.UserByToken(ctx, tok); !errors.Is(err, errdefs.ErrUnauthenticated) {
		t.Errorf("old token still works after rotation: %v", err)
	}
	if _, err := s.UserByToken(ctx, tok2); err != nil {
		t.Errorf("new token: %v", err)
	}
	if _, err := s.RotateToken(ctx, "bob"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("rotate unknown: %v", err)
	}
	// Local users map by uid and are stable.
	r1, err := s.EnsureUnixUser(ctx, 0, "root")
	if err != nil || !r1.IsAdmin {
		t.Fatalf("root: %+v %v", r1, err)
	}
	r2, _ := s.EnsureUnixUser(ctx, 0, "root")
	if r2.ID != r1.ID {
		t.Errorf("uid 0 mapped to two users")
	}
	// A local user whose name collides with a token user gets another name.
	a, err := s.EnsureUnixUser(ctx, 1000, "alice")
	if err != nil || a.Name == "alice" || a.IsAdmin {
		t.Fatalf("colliding local user: %+v %v", a, err)
	}
}

func TestVMsScopedAndIPAllocation(t *testing.T) {
	s, ctx := open(t), context.Background()
	alice, _, _ := s.CreateUser(ctx, "alice", false)
	bob, _, _ := s.CreateUser(ctx, "bob", false)
	alloc := func(used map[string]bool) (string, error) {
		for i := 2; i < 10; i++ {
			ip := fmt.Sprintf("10.0.0.%d", i)
			if !used[ip] {
				return ip, nil
			}
		}
		return "", errdefs.ErrResourceExhausted
	}
	// Concurrent creates never collide on an IP.
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			errs <- s.CreateVM(ctx, &VM{ID: fmt.Sprintf("id%d", i), UserID: alice.ID, Name: fmt.Sprintf("vm%d", i), State: StateRunning, VCPUs: 1, MemoryMiB: 256, VMM: "qemu"}, CreateOpts{AllocIP: alloc})
		}(i)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	vms, _ := s.ListVMs(ctx, alice.ID)
	seen := map[string]bool{}
	for _, v := range vms {
		if seen[v.IP] {
			t.Fatalf("ip %s given twice", v.IP)
		}
		seen[v.IP] = true
	}
	// The pool is exhausted now: a clear error and nothing inserted.
	err := s.CreateVM(ctx, &VM{ID: "id-x", UserID: alice.ID, Name: "extra", State: StateRunning, VCPUs: 1, MemoryMiB: 1, VMM: "qemu"}, CreateOpts{AllocIP: alloc})
	if !errors.Is(err, errdefs.ErrResourceExhausted) {
		t.Fatalf("exhausted pool: %v", err)
	}
	if _, err := s.GetVM(ctx, alice.ID, "extra"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("half-created vm: %v", err)
	}
	// Names are per user; another user sees nothing of alice's.
	if err := s.CreateVM(ctx, &VM{ID: "b0", UserID: bob.ID, Name: "vm0", State: StateRunning, VCPUs: 1, MemoryMiB: 1, VMM: "qemu"}, CreateOpts{}); err != nil {
		t.Fatal(err)
	}
	if err := s.CreateVM(ctx, &VM{ID: "a-dup", UserID: alice.ID, Name: "vm0", State: StateRunning, VCPUs: 1, MemoryMiB: 1, VMM: "qemu"}, CreateOpts{}); !errors.Is(err, errdefs.ErrAlreadyExists) {
		t.Fatalf("duplicate name: %v", err)
	}
	bv, _ := s.ListVMs(ctx, bob.ID)
	if len(bv) != 1 || bv[0].ID != "b0" {
		t.Fatalf("bob sees %+v", bv)
	}
	// Quota check sees usage inside the transaction.
	err = s.CreateVM(ctx, &VM{ID: "q", UserID: bob.ID, Name: "q", State: StateRunning, VCPUs: 1, MemoryMiB: 1, VMM: "qemu"}, CreateOpts{CheckQuota: func(u Usage) error {
		if u.VMs >= 1 {
			return errdefs.ErrQuotaExceeded
		}
		return nil
	}})
	if !errors.Is(err, errdefs.ErrQuotaExceeded) {
		t.Fatalf("quota: %v", err)
	}
}

func TestCheckpointsAndCascade(t *testing.T) {
	s, ctx := open(t), context.Background()
	u, _, _ := s.CreateUser(ctx, "u", false)
	other, _, _ := s.CreateUser(ctx, "o", false)
	s.CreateVM(ctx, &VM{ID: "v", UserID: u.ID, Name: "v", State: StateRunning, VCPUs: 1, MemoryMiB: 1, VMM: "qemu"}, CreateOpts{})
	if err := s.CreateCheckpoint(ctx, &Checkpoint{ID: "c1", VMID: "v", UserID: u.ID, Name: "one", Backend: "qemu", VCPUs: 1, MemoryMiB: 1, SizeBytes: 100}, nil); err != nil {
		t.Fatal(err)
	}
	if err := s.CreateCheckpoint(ctx, &Checkpoint{ID: "c2", VMID: "v", UserID: u.ID, Name: "one", Backend: "qemu", VCPUs: 1, MemoryMiB: 1}, nil); !errors.Is(err, errdefs.ErrAlreadyExists) {
		t.Fatalf("duplicate checkpoint: %v", err)
	}
	if c, err := s.GetCheckpoint(ctx, u.ID, "v", "c1"); err != nil || c.Name != "one" {
		t.Fatalf("by id: %+v %v", c, err)
	}
	if _, err := s.GetCheckpoint(ctx, other.ID, "v", "one"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("other user reached the checkpoint: %v", err)
	}
	use, _ := s.UserUsage(ctx, u.ID)
	if use.CheckpointBytes != 100 || use.VMs != 1 {
		t.Fatalf("usage %+v", use)
	}
	if err := s.DeleteVM(ctx, "v"); err != nil {
		t.Fatal(err)
	}
	if cps, _ := s.ListCheckpoints(ctx, u.ID, ""); len(cps) != 0 {
		t.Fatalf("checkpoints survived their vm: %+v", cps)
	}
	if err := s.Audit(ctx, AuditEntry{User: "u", Action: "DELETE /v1/vms/{name}", Target: "v", Result: "ok"}); err != nil {
		t.Fatal(err)
	}
	log, _ := s.AuditLog(ctx, 10)
	if len(log) != 1 || log[0].Target != "v" {
		t.Fatalf("audit %+v", log)
	}
}

func TestRuntimeIDRoundTrip(t *testing.T) {
	st := open(t)
	ctx := context.Background()
	u, _, err := st.CreateUser(ctx, "rt", false)
	if err != nil {
		t.Fatal(err)
	}
	v := &VM{ID: "vm1", UserID: u.ID, Name: "a", State: StateRunning, VCPUs: 1, MemoryMiB: 64, CreatedAt: time.Now()}
	if err := st.CreateVM(ctx, v, CreateOpts{}); err != nil {
		t.Fatal(err)
	}
	got, _ := st.GetVMByID(ctx, "vm1")
	if got.RuntimeID != "" || got.Runtime() != "vm1" {
		t.Fatalf("a new VM's runtime is %q/%q, want its id", got.RuntimeID, got.Runtime())
	}
	got.RuntimeID = "spare7"
	if err := st.UpdateVM(ctx, got); err != nil {
		t.Fatal(err)
	}
	if again, _ := st.GetVMByID(ctx, "vm1"); again.Runtime() != "spare7" {
		t.Fatalf("runtime after update: %q", again.Runtime())
	}
}

// TestCheckpointCounts: the counts are per VM and scoped to the user, a
// VM without checkpoints is absent, and a vmID narrows the count to it.
func TestCheckpointCounts(t *testing.T) {
	s, ctx := open(t), context.Background()
	u, _, _ := s.CreateUser(ctx, "u", false)
	o, _, _ := s.CreateUser(ctx, "o", false)
	for _, v := range []struct {
		id   string
		user int64
		cps  int
	}{{"a", u.ID, 3}, {"b", u.ID, 1}, {"c", u.ID, 0}, {"d", o.ID, 2}} {
		if err := s.CreateVM(ctx, &VM{ID: v.id, UserID: v.user, Name: v.id, State: StateRunning, VCPUs: 1, MemoryMiB: 1, VMM: "qemu"}, CreateOpts{}); err != nil {
			t.Fatal(err)
		}
		for i := 0; i < v.cps; i++ {
			cp := &Checkpoint{ID: fmt.Sprintf("%s%d", v.id, i), VMID: v.id, UserID: v.user, Name: fmt.Sprint(i), Backend: "qemu", VCPUs: 1, MemoryMiB: 1}
			if err := s.CreateCheckpoint(ctx, cp, nil); err != nil {
				t.Fatal(err)
			}
		}
	}
	check := func(what string, got map[string]int, err error, want map[string]int) {
		t.Helper()
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		if fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("%s: %v, want %v", what, got, want)
		}
	}
	got, err := s.CheckpointCounts(ctx, u.ID, "")
	check("u's VMs", got, err, map[string]int{"a": 3, "b": 1})
	got, err = s.CheckpointCounts(ctx, -1, "")
	check("every user's", got, err, map[string]int{"a": 3, "b": 1, "d": 2})
	got, err = s.CheckpointCounts(ctx, u.ID, "a")
	check("vm a", got, err, map[string]int{"a": 3})
	got, err = s.CheckpointCounts(ctx, u.ID, "d")
	check("o's vm d asked by u", got, err, map[string]int{})
}

// TestReadsDoNotWaitForWrites: while a write transaction is open, lookups,
// lists and token checks still answer, from the last committed state, and
// once it commits they see the write. (With reads on the writer's single
// connection they would wait for the commit and time out here.)
func TestReadsDoNotWaitForWrites(t *testing.T) {
	s, ctx := open(t), context.Background()
	u, tok, err := s.CreateUser(ctx, "u", false)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.CreateVM(ctx, &VM{ID: "a", UserID: u.ID, Name: "a", State: StateRunning, VCPUs: 1, MemoryMiB: 1, VMM: "qemu"}, CreateOpts{}); err != nil {
		t.Fatal(err)
	}
	inTx, release, done := make(chan struct{}), make(chan struct{}), make(chan error, 1)
	go func() {
		done <- s.tx(ctx, func(tx *sql.Tx) error {
			_, err := tx.ExecContext(ctx, `UPDATE vms SET state = ? WHERE id = ?`, StateDead, "a")
			close(inTx)
			<-release
			return err
		})
	}()
	<-inTx
	rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if v, err := s.GetVM(rctx, u.ID, "a"); err != nil || v.State != StateRunning {
		t.Errorf("GetVM during the write: %+v %v, want the committed state %q", v, err, StateRunning)
	}
	if vms, err := s.ListVMs(rctx, u.ID); err != nil || len(vms) != 1 {
		t.Errorf("ListVMs during the write: %d %v", len(vms), err)
	}
	if who, err := s.UserByToken(rctx, tok); err != nil || who.ID != u.ID {
		t.Errorf("UserByToken during the write: %+v %v", who, err)
	}
	close(release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if v, err := s.GetVM(ctx, u.ID, "a"); err != nil || v.State != StateDead {
		t.Errorf("GetVM after the commit: %+v %v, want %q", v, err, StateDead)
	}
}

// TestReadPoolOpenAtStart: the store opens its read connections when it
// opens, so many parallel reads do not change how many files the process
// holds (the load benchmark counts the server's descriptors to find leaks).
func TestReadPoolOpenAtStart(t *testing.T) {
	s, ctx := open(t), context.Background()
	u, _, _ := s.CreateUser(ctx, "u", false)
	fds := func() int {
		ents, err := os.ReadDir("/proc/self/fd")
		if err != nil {
			t.Skipf("no /proc/self/fd: %v", err)
		}
		return len(ents)
	}
	before := fds()
	var wg sync.WaitGroup
	for i := 0; i < 4*readConns; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := s.ListVMs(ctx, u.ID); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if after := fds(); after != before {
		t.Errorf("open files: %d before the reads, %d after", before, after)
	}
}

// TestFileModes (issue 18, finding 11): the database and its -wal and
// -shm files are 0600, for a new database and for one whose files an
// older noid left readable.
func TestFileModes(t *testing.T) {
	check := func(path string) {
		t.Helper()
		for _, p := range []string{path, path + "-wal", path + "-shm"} {
			fi, err := os.Stat(p)
			if err != nil {
				t.Fatal(err)
			}
			if m := fi.Mode().Perm(); m != 0o600 {
				t.Errorf("%s has mode %04o, want 0600", filepath.Base(p), m)
			}
		}
	}
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "noid.db")
	s, err := Open(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	check(path)
	s.Close()
	// An existing database with readable files; keep the -wal and -shm
	// around (as a crashed server does) by not closing the first store.
	path = filepath.Join(t.TempDir(), "noid.db")
	s1, err := Open(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	defer s1.Close()
	for _, p := range []string{path, path + "-wal", path + "-shm"} {
		if err := os.Chmod(p, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	s2, err := Open(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	check(path)
}
