package image

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// sparseFile writes a file with data at a few offsets and holes between.
func sparseFile(t *testing.T, path string, size int64) []byte {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	full := make([]byte, size)
	for _, off := range []int64{0, 5 << 20, 9<<20 + 123, size - 100} {
		chunk := bytes.Repeat([]byte{byte(off), 0xab}, 3000)
		if off+int64(len(chunk)) > size {
			chunk = chunk[:size-off]
		}
		f.WriteAt(chunk, off)
		copy(full[off:], chunk)
	}
	return full
}

func TestSHA256FileSparse(t *testing.T) {
	dir := t.TempDir()
	for _, size := range []int64{0, 1, 16 << 20} {
		p := filepath.Join(dir, "f")
		os.Remove(p)
		var want []byte
		if size < 100 {
			want = bytes.Repeat([]byte{7}, int(size))
			os.WriteFile(p, want, 0o644)
		} else {
			want = sparseFile(t, p, size)
		}
		sum := sha256.Sum256(want)
		got, err := sha256File(p)
		if err != nil || got != hex.EncodeToString(sum[:]) {
			t.Errorf("size %d: sha256File = %s, %v; want %x", size, got, err, sum)
		}
	}
}

func TestCopyFileSparse(t *testing.T) {
	dir := t.TempDir()
	src, dst := filepath.Join(dir, "src"), filepath.Join(dir, "dst")
	want := sparseFile(t, src, 32<<20)
	if err := copyFileSparse(src, dst); err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(dst)
	if !bytes.Equal(got, want) {
		t.Fatal("copy differs")
	}
	var st syscall.Stat_t
	syscall.Stat(dst, &st)
	if st.Blocks*512 > 4<<20 {
		t.Errorf("copy allocates %d bytes; holes not preserved", st.Blocks*512)
	}
	// Never over an existing file, and linkOrCopy does not fall back to a
	// copy when the target exists (it could be a link to the source).
	if err := copyFileSparse(src, dst); !errors.Is(err, fs.ErrExist) {
		t.Errorf("copy over existing file: %v", err)
	}
	if err := os.Link(src, filepath.Join(dir, "link")); err != nil {
		t.Fatal(err)
	}
	if err := linkOrCopy(src, filepath.Join(dir, "link")); !errors.Is(err, fs.ErrExist) {
		t.Errorf("linkOrCopy onto a link of itself: %v", err)
	}
	if got, _ := os.ReadFile(src); !bytes.Equal(got, want) {
		t.Fatal("source damaged")
	}
}

func TestReplaceDir(t *testing.T) {
	root := t.TempDir()
	final := filepath.Join(root, "img")
	mk := func(content string) string {
		d, _ := os.MkdirTemp(root, ".tmp-")
		os.WriteFile(filepath.Join(d, "f"), []byte(content), 0o644)
		return d
	}
	if err := replaceDir(mk("one"), final); err != nil {
		t.Fatal(err)
	}
	if err := replaceDir(mk("two"), final); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(filepath.Join(final, "f")); string(b) != "two" {
		t.Errorf("content %q", b)
	}
	ents, _ := os.ReadDir(root)
	if len(ents) != 1 {
		t.Errorf("leftovers: %v", ents)
	}
}

// TestRemoveAllSafe checks that a mount left inside a build directory (as a
// killed debootstrap leaves /proc) is detached, not descended into.
func TestRemoveAllSafe(t *testing.T) {
	requireRoot(t)
	dir := t.TempDir()
	mp := filepath.Join(dir, "target", "proc")
	os.MkdirAll(mp, 0o755)
	if err := unix.Mount("tmpfs", mp, "tmpfs", 0, "size=1m"); err != nil {
		t.Skipf("cannot mount tmpfs: %v", err)
	}
	os.WriteFile(filepath.Join(mp, "precious"), []byte("x"), 0o644)
	if mps, _ := mountsUnder(dir); len(mps) != 1 || mps[0] != mp {
		t.Errorf("mountsUnder = %v", mps)
	}
	if err := removeAllSafe(filepath.Join(dir, "target")); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "target")); !os.IsNotExist(err) {
		t.Errorf("target still there: %v", err)
	}
	if mps, _ := mountsUnder(dir); len(mps) != 0 {
		t.Errorf("still mounted: %v", mps)
	}
}
