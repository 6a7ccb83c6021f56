package storage

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"testing"

	"golang.org/x/sys/unix"
)

// requireLoopRoot skips tests that mount loop devices unless they can run.
func requireLoopRoot(tb testing.TB, mkfs string) {
	tb.Helper()
	if os.Geteuid() != 0 {
		tb.Skip("skipping: needs root to attach loop devices and mount filesystems")
	}
	if _, err := os.Stat("/dev/loop-control"); err != nil {
		tb.Skipf("skipping: no /dev/loop-control (loop module not loaded?): %v", err)
	}
	if _, err := exec.LookPath(mkfs); err != nil {
		tb.Skipf("skipping: %s not installed", mkfs)
	}
}

// mountXFS creates a reflink XFS image of size bytes in a temporary
// directory, mounts it with SetupReflinkLoop and tears it down at cleanup,
// even if the test fails. It returns the mount point.
func mountXFS(tb testing.TB, size int64) string {
	tb.Helper()
	requireLoopRoot(tb, "mkfs.xfs")
	dir := tb.TempDir()
	img, mnt := filepath.Join(dir, "store.img"), filepath.Join(dir, "mnt")
	if err := SetupReflinkLoop(context.Background(), img, mnt, size); err != nil {
		tb.Fatalf("SetupReflinkLoop: %v", err)
	}
	tb.Cleanup(func() { forceUnmount(tb, mnt) })
	return mnt
}

// mountExt4 creates and mounts a small ext4 image (for full-filesystem
// tests) through the package's own loop attach code.
func mountExt4(tb testing.TB, size int64) string {
	return mountFS(tb, size, "ext4", "mkfs.ext4", "-q", "-F", "-m", "0")
}

// mountFS makes a filesystem of the given type with mkfs and args on a new
// image, and mounts it through the package's own loop attach code.
func mountFS(tb testing.TB, size int64, fstype, mkfs string, args ...string) string {
	tb.Helper()
	requireLoopRoot(tb, mkfs)
	dir := tb.TempDir()
	img, mnt := filepath.Join(dir, "small.img"), filepath.Join(dir, "mnt")
	f, err := os.Create(img)
	if err != nil {
		tb.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		tb.Fatal(err)
	}
	f.Close()
	if out, err := exec.Command(mkfs, append(args, img)...).CombinedOutput(); err != nil {
		tb.Fatalf("%s: %v: %s", mkfs, err, out)
	}
	if err := os.Mkdir(mnt, 0o755); err != nil {
		tb.Fatal(err)
	}
	dev, devFile, err := attachLoop(context.Background(), img, false)
	if err != nil {
		tb.Fatalf("attachLoop: %v", err)
	}
	defer devFile.Close()
	if err := unix.Mount(dev, mnt, fstype, 0, ""); err != nil {
		tb.Fatalf("mount %s: %v", dev, err)
	}
	tb.Cleanup(func() { forceUnmount(tb, mnt) })
	return mnt
}

// forceUnmount tears a test mount down, lazily if it is still busy, so a
// failed test never leaks a mount or a loop device.
func forceUnmount(tb testing.TB, mnt string) {
	tb.Helper()
	m, mounted, err := findMount(mnt)
	if err != nil || !mounted {
		return
	}
	if err := TeardownReflinkLoop(context.Background(), mnt); err != nil {
		tb.Logf("teardown %s: %v; detaching lazily", mnt, err)
		unix.Unmount(mnt, unix.MNT_DETACH)
		waitDetached(context.Background(), m.source)
	}
}

// extent is one data region written into a test file.
type extent struct{ off, len int64 }

// writeSparse creates a sparse file of size bytes with pseudo-random data in
// the given extents and the given mode.
func writeSparse(tb testing.TB, path string, size int64, extents []extent, mode os.FileMode) {
	tb.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		tb.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		tb.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(uint64(size), 42))
	for _, e := range extents {
		buf := make([]byte, e.len)
		for i := 0; i+8 <= len(buf); i += 8 {
			v := rng.Uint64() | 1 // never a zero word, so data is never mistaken for a hole
			for j := 0; j < 8; j++ {
				buf[i+j] = byte(v >> (8 * j))
			}
		}
		if _, err := f.WriteAt(buf, e.off); err != nil {
			tb.Fatal(err)
		}
	}
	if err := f.Chmod(mode); err != nil {
		tb.Fatal(err)
	}
}

// spreadExtents returns n extents of length l spread evenly over size bytes.
func spreadExtents(size int64, n int, l int64) []extent {
	var out []extent
	step := size / int64(n)
	for i := 0; i < n; i++ {
		out = append(out, extent{off: int64(i) * step, len: l})
	}
	return out
}

// assertSameContent compares two files byte for byte. When both have the
// same data extents it compares only those (holes read as zeros in both),
// which keeps 1 GiB sparse files cheap to check.
func assertSameContent(tb testing.TB, a, b string) {
	tb.Helper()
	if ma, mb := dataMap(tb, a), dataMap(tb, b); slices.Equal(ma, mb) {
		fa, _ := os.Open(a)
		defer fa.Close()
		fb, _ := os.Open(b)
		defer fb.Close()
		sa, _ := fa.Stat()
		sb, _ := fb.Stat()
		if sa.Size() != sb.Size() {
			tb.Fatalf("size: %s has %d bytes, %s has %d", a, sa.Size(), b, sb.Size())
		}
		for _, e := range ma {
			ba, bb := make([]byte, e.len), make([]byte, e.len)
			if _, err := fa.ReadAt(ba, e.off); err != nil && !errors.Is(err, io.EOF) {
				tb.Fatal(err)
			}
			if _, err := fb.ReadAt(bb, e.off); err != nil && !errors.Is(err, io.EOF) {
				tb.Fatal(err)
			}
			if !bytes.Equal(ba, bb) {
				tb.Fatalf("content of %s and %s differs in the extent at %d", a, b, e.off)
			}
		}
		return
	}
	assertSameBytes(tb, a, b)
}

// assertSameBytes compares two files byte for byte by reading all of both,
// holes included.
func assertSameBytes(tb testing.TB, a, b string) {
	tb.Helper()
	fa, err := os.Open(a)
	if err != nil {
		tb.Fatal(err)
	}
	defer fa.Close()
	fb, err := os.Open(b)
	if err != nil {
		tb.Fatal(err)
	}
	defer fb.Close()
	sa, _ := fa.Stat()
	sb, _ := fb.Stat()
	if sa.Size() != sb.Size() {
		tb.Fatalf("size: %s has %d bytes, %s has %d", a, sa.Size(), b, sb.Size())
	}
	ba, bb := make([]byte, 4<<20), make([]byte, 4<<20)
	var off int64
	for {
		na, ea := io.ReadFull(fa, ba)
		nb, eb := io.ReadFull(fb, bb)
		if na != nb || !bytes.Equal(ba[:na], bb[:nb]) {
			tb.Fatalf("content of %s and %s differs in the 4 MiB block at %d", a, b, off)
		}
		off += int64(na)
		if errors.Is(ea, io.EOF) || errors.Is(ea, io.ErrUnexpectedEOF) {
			if !(errors.Is(eb, io.EOF) || errors.Is(eb, io.ErrUnexpectedEOF)) {
				tb.Fatalf("%s ended before %s", a, b)
			}
			return
		}
		if ea != nil || eb != nil {
			tb.Fatalf("reading: %v / %v", ea, eb)
		}
	}
}

// dataMap lists a file's data extents as reported by SEEK_DATA/SEEK_HOLE.
func dataMap(tb testing.TB, path string) []extent {
	tb.Helper()
	f, err := os.Open(path)
	if err != nil {
		tb.Fatal(err)
	}
	defer f.Close()
	fi, _ := f.Stat()
	var out []extent
	err = forEachExtent(context.Background(), f, fi.Size(), func(off, end int64) error {
		out = append(out, extent{off, end - off})
		return nil
	})
	if err != nil {
		tb.Fatal(err)
	}
	return out
}

// fsUsed returns the bytes in use on the filesystem holding path.
func fsUsed(tb testing.TB, path string) int64 {
	tb.Helper()
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		tb.Fatal(err)
	}
	return int64(st.Blocks-st.Bfree) * st.Bsize
}
