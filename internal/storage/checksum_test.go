package storage

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestChecksumFollowsContentNotLayout: a sparse file, its sparse copy and a
// copy with its holes written out as zeros have one checksum; changing one
// byte, the size, or a block's place changes it.
func TestChecksumFollowsContentNotLayout(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	const size = 8 << 20
	src := filepath.Join(dir, "src")
	writeSparse(t, src, size, []extent{{off: 100 << 10, len: 5000}, {off: 3 << 20, len: 200 << 10}}, 0o600)
	_, want, err := Checksum(ctx, src)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(want, sumPrefix) {
		t.Fatalf("sum %q lacks the algorithm prefix", want)
	}

	sparse := filepath.Join(dir, "sparse")
	if err := (&Copier{NoReflink: true}).CopyFile(ctx, src, sparse); err != nil {
		t.Fatal(err)
	}
	dense := filepath.Join(dir, "dense")
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dense, b, 0o600); err != nil {
		t.Fatal(err)
	}
	if a, _ := AllocatedSize(dense); a < size {
		t.Fatalf("the dense copy has holes (%d of %d bytes allocated)", a, size)
	}
	for _, p := range []string{sparse, dense} {
		n, got, err := Checksum(ctx, p)
		if err != nil || n != size || got != want {
			t.Errorf("%s: size %d sum %s (%v), want %d %s", filepath.Base(p), n, got, err, size, want)
		}
	}

	changed := map[string]func(p string){
		"one byte":  func(p string) { writeAt(t, p, 3<<20+17, []byte{1}) },
		"in a hole": func(p string) { writeAt(t, p, 6<<20, []byte{1}) },
		"size":      func(p string) { os.Truncate(p, size+4096) },
		"moved block": func(p string) {
			writeAt(t, p, 100<<10, make([]byte, 5000))
			writeAt(t, p, 164<<10, b[100<<10:100<<10+5000])
		},
	}
	for name, mutate := range changed {
		p := filepath.Join(dir, "m")
		os.Remove(p)
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		mutate(p)
		if _, got, err := Checksum(ctx, p); err != nil || got == want {
			t.Errorf("%s: sum %s (%v) did not change", name, got, err)
		}
	}
}

func writeAt(t *testing.T, p string, off int64, b []byte) {
	t.Helper()
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

// TestVerifier: Verify refuses a missing, truncated or damaged file, and
// reads a file again only when it changed since it was last found intact.
func TestVerifier(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	p := filepath.Join(dir, "f")
	writeSparse(t, p, 1<<20, []extent{{off: 4096, len: 70000}}, 0o600)
	// File times tick coarsely: date the file back, so that the write
	// below moves its mtime for sure.
	past := time.Now().Add(-time.Hour)
	if err := os.Chtimes(p, past, past); err != nil {
		t.Fatal(err)
	}
	var v Verifier
	size, sum, err := v.Sum(ctx, p)
	if err != nil {
		t.Fatal(err)
	}
	if err := v.Verify(ctx, p, size, sum); err != nil {
		t.Fatalf("intact file: %v", err)
	}
	if err := v.Verify(ctx, p, size+1, sum); err == nil || !strings.Contains(err.Error(), "bytes") {
		t.Errorf("wrong size: %v", err)
	}
	if err := v.Verify(ctx, p, size, sumPrefix+"00000000"); err == nil || !strings.Contains(err.Error(), "damaged") {
		t.Errorf("wrong sum: %v", err)
	}

	// A file known intact is not read again: the remembered sum decides
	// while inode, size and times are unchanged.
	if len(v.seen) != 1 {
		t.Fatalf("verifier remembers %d files, want 1", len(v.seen))
	}
	for id := range v.seen {
		v.seen[id] = "remembered"
	}
	if err := v.Verify(ctx, p, size, "remembered"); err != nil {
		t.Fatalf("an unchanged file was read again: %v", err)
	}
	for id := range v.seen {
		v.seen[id] = sum
	}
	v2 := &v

	// A hard link moves the file's ctime but not its content: noid links
	// snapshot files into every clone, and a link must not make the next
	// check read the whole file again.
	for id := range v.seen {
		v.seen[id] = "remembered"
	}
	if err := os.Link(p, p+".link"); err != nil {
		t.Fatal(err)
	}
	if err := v2.Verify(ctx, p, size, "remembered"); err != nil {
		t.Fatalf("a file was read again after a hard link to it: %v", err)
	}
	os.Remove(p + ".link")
	for id := range v.seen {
		v.seen[id] = sum
	}

	// A change of content with the same size moves mtime, and is caught.
	writeAt(t, p, 5000, []byte{9})
	if err := v2.Verify(ctx, p, size, sum); err == nil || !strings.Contains(err.Error(), "damaged") {
		t.Errorf("a write that kept the size was not caught: %v", err)
	}
	os.Remove(p)
	if err := v2.Verify(ctx, p, size, sum); err == nil || !strings.Contains(err.Error(), "missing") {
		t.Errorf("removed file: %v", err)
	}
}
