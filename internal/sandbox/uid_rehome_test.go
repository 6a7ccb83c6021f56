package sandbox

import (
	"os"
	"path/filepath"
	"testing"
)

func TestUIDPoolRehome(t *testing.T) {
	dir := t.TempDir()
	a, b := filepath.Join(dir, "a"), filepath.Join(dir, "b")
	os.Mkdir(a, 0o700)
	p, err := OpenUIDPool(filepath.Join(dir, "uids"), 3000000000, 4)
	if err != nil {
		t.Fatal(err)
	}
	u, err := p.Acquire("vm1", a)
	if err != nil {
		t.Fatal(err)
	}
	// The files move from a to b.
	if err := os.Rename(a, b); err != nil {
		t.Fatal(err)
	}
	if err := p.Rehome("vm1", b); err != nil {
		t.Fatal(err)
	}
	// A reopened pool keeps the lease because its owner dir exists.
	p2, err := OpenUIDPool(filepath.Join(dir, "uids"), 3000000000, 4)
	if err != nil {
		t.Fatal(err)
	}
	if got, ok := p2.Lookup("vm1"); !ok || got != u {
		t.Fatalf("after rehome and reopen: %d %v, want %d", got, ok, u)
	}
	// Without the rehome it would have been dropped.
	os.Rename(b, a)
	p3, _ := OpenUIDPool(filepath.Join(dir, "uids"), 3000000000, 4)
	if _, ok := p3.Lookup("vm1"); ok {
		t.Fatal("a lease whose owner dir is gone survived")
	}
}
