package storage

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestContentIDFollowsContent: a sparse file and a copy with its holes
// written out have one identity; one byte changed in the middle (a block
// neither the first nor the last MiB) changes it.
func TestContentIDFollowsContent(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	const size = 8 << 20
	src := filepath.Join(dir, "src")
	writeSparse(t, src, size, []extent{{off: 0, len: 64 << 10}, {off: 4 << 20, len: 300 << 10}, {off: size - 64<<10, len: 64 << 10}}, 0o600)
	want, err := ContentID(ctx, src)
	if err != nil || !strings.HasPrefix(want, ContentIDPrefix) || len(want) != len(ContentIDPrefix)+64 {
		t.Fatalf("content id %q (%v)", want, err)
	}
	b, _ := os.ReadFile(src)
	dense := filepath.Join(dir, "dense")
	os.WriteFile(dense, b, 0o600)
	if got, err := ContentID(ctx, dense); err != nil || got != want {
		t.Errorf("the dense copy: %s (%v), want %s", got, err, want)
	}
	writeAt(t, dense, 4<<20+1000, []byte{b[4<<20+1000] ^ 0xff})
	if got, err := ContentID(ctx, dense); err != nil || got == want {
		t.Errorf("a byte changed in the middle left the id %s (%v)", got, err)
	}
}

// TestContentIDsRemember: an unchanged file is hashed once, across
// restarts too (the record in Dir); a byte changed in the middle with the
// size and mtime put back is noticed (ctime moved) and hashed again; the
// sha256 algorithm is the plain SHA-256 of the file.
func TestContentIDsRemember(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	p := filepath.Join(dir, "rootfs.ext4")
	const size = 4 << 20
	writeSparse(t, p, size, []extent{{off: 1 << 20, len: 2 << 20}}, 0o644)
	ids := &ContentIDs{Dir: filepath.Join(dir, "ids")}
	first, err := ids.Get(ctx, p, IDSparseSHA256)
	if err != nil {
		t.Fatal(err)
	}
	if again, err := ids.Get(ctx, p, IDSparseSHA256); err != nil || again != first || ids.Hashed() != 1 {
		t.Errorf("second get: %s (%v), %d hashes, want %s from 1", again, err, ids.Hashed(), first)
	}
	restarted := &ContentIDs{Dir: ids.Dir}
	if got, err := restarted.Get(ctx, p, IDSparseSHA256); err != nil || got != first || restarted.Hashed() != 0 {
		t.Errorf("after a restart: %s (%v), %d hashes, want %s from the record", got, err, restarted.Hashed(), first)
	}

	fi, _ := os.Stat(p)
	time.Sleep(10 * time.Millisecond) // file timestamps tick coarsely (jiffies): let ctime move
	b, _ := os.ReadFile(p)
	writeAt(t, p, 2<<20, []byte{b[2<<20] ^ 1})
	if err := os.Chtimes(p, fi.ModTime(), fi.ModTime()); err != nil {
		t.Fatal(err)
	}
	if fi2, _ := os.Stat(p); fi2.Size() != fi.Size() || !fi2.ModTime().Equal(fi.ModTime()) {
		t.Fatalf("size or mtime not put back: %v %v", fi2.Size(), fi2.ModTime())
	}
	changed, err := restarted.Get(ctx, p, IDSparseSHA256)
	if err != nil || changed == first || restarted.Hashed() != 1 {
		t.Errorf("after a change in the middle: %s (%v), %d hashes; it was %s", changed, err, restarted.Hashed(), first)
	}

	b, _ = os.ReadFile(p)
	sum := sha256.Sum256(b)
	if got, err := restarted.Get(ctx, p, IDSHA256); err != nil || got != hex.EncodeToString(sum[:]) {
		t.Errorf("sha256 id %s (%v), want %x", got, err, sum)
	}
	if _, err := restarted.Get(ctx, filepath.Join(dir, "missing"), IDSHA256); err == nil {
		t.Error("a missing file has an id")
	}
}
