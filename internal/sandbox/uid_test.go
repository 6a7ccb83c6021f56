package sandbox

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
)

func TestUIDPoolLeases(t *testing.T) {
	dir := t.TempDir()
	vms := t.TempDir()
	owner := func(id string) string {
		d := filepath.Join(vms, id)
		os.MkdirAll(d, 0o700)
		return d
	}
	p, err := OpenUIDPool(filepath.Join(dir, "uids"), 5000, 100)
	if err != nil {
		t.Fatal(err)
	}
	a, err := p.Acquire("a", owner("a"))
	if err != nil {
		t.Fatal(err)
	}
	if a < 5000 || a >= 5100 {
		t.Fatalf("uid %d outside the range", a)
	}
	if again, _ := p.Acquire("a", owner("a")); again != a {
		t.Errorf("second Acquire gave %d, want %d", again, a)
	}
	b, _ := p.Acquire("b", owner("b"))
	if b == a {
		t.Fatalf("two VMs share uid %d", a)
	}
	if u, ok := p.Lookup("b"); !ok || u != b {
		t.Errorf("Lookup(b) = %d, %v", u, ok)
	}
	// A second pool on the same dir (a restarted server) sees the leases,
	// and drops the one whose VM directory is gone.
	os.RemoveAll(filepath.Join(vms, "b"))
	os.WriteFile(filepath.Join(dir, "uids", "5099"), []byte("garbage"), 0o600)
	os.WriteFile(filepath.Join(dir, "uids", "7"), []byte("x\n/\n"), 0o600)
	p2, err := OpenUIDPool(filepath.Join(dir, "uids"), 5000, 100)
	if err != nil {
		t.Fatal(err)
	}
	if u, ok := p2.Lookup("a"); !ok || u != a {
		t.Errorf("after reopen Lookup(a) = %d, %v; want %d", u, ok, a)
	}
	if _, ok := p2.Lookup("b"); ok {
		t.Error("lease of a destroyed VM survived reopen")
	}
	ents, _ := os.ReadDir(filepath.Join(dir, "uids"))
	if len(ents) != 1 {
		t.Errorf("lease dir holds %d files, want 1 (malformed and out-of-range leases removed)", len(ents))
	}
	if ls := p2.Leases(); len(ls) != 1 || ls[0].ID != "a" || ls[0].UID != a || ls[0].Owner != filepath.Join(vms, "a") {
		t.Errorf("Leases() = %+v", ls)
	}
	if err := p2.Release("a"); err != nil {
		t.Fatal(err)
	}
	if _, ok := p2.Lookup("a"); ok {
		t.Error("released lease still there")
	}
	if _, err := p.Acquire("bad\nid", owner("x")); err == nil {
		t.Error("an id with a newline was accepted")
	}
	if _, err := p.Acquire("x", "relative"); err == nil {
		t.Error("a relative owner was accepted")
	}
}

func TestUIDPoolExhaustedAndConcurrent(t *testing.T) {
	dir := t.TempDir()
	vm := t.TempDir()
	p1, _ := OpenUIDPool(dir, 100, 8)
	p2, _ := OpenUIDPool(dir, 100, 8) // another server on the same data dir
	var mu sync.Mutex
	got := map[uint32]string{}
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p := p1
			if i%2 == 1 {
				p = p2
			}
			id := fmt.Sprintf("vm%d", i)
			u, err := p.Acquire(id, vm)
			if err != nil {
				t.Error(err)
				return
			}
			mu.Lock()
			defer mu.Unlock()
			if other, dup := got[u]; dup {
				t.Errorf("uid %d leased to %s and %s", u, other, id)
			}
			got[u] = id
		}()
	}
	wg.Wait()
	if _, err := p1.Acquire("one-too-many", vm); !errors.Is(err, ErrUIDsExhausted) {
		t.Errorf("err = %v, want ErrUIDsExhausted", err)
	}
	p1.Release("vm0")
	if _, err := p1.Acquire("one-too-many", vm); err != nil {
		t.Errorf("after a release: %v", err)
	}
}

func TestUIDPoolRange(t *testing.T) {
	for _, r := range [][2]uint32{{0, 10}, {10, 0}, {1<<32 - 5, 10}} {
		if _, err := OpenUIDPool(t.TempDir(), r[0], r[1]); err == nil {
			t.Errorf("range %d+%d accepted", r[0], r[1])
		}
	}
}
