package storage

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/noid-vm/noid/internal/errdefs"
	"github.com/noid-vm/noid/internal/vmm"
)

const (
	MiB = 1 << 20
	GiB = 1 << 30
)

// sparseGiB writes the test's standard source: a 1 GiB file with 4 MiB of
// data in five extents, including one at offset 0 and one ending at EOF.
func sparseGiB(t *testing.T, path string) []extent {
	t.Helper()
	ext := []extent{
		{0, 64 << 10},
		{3*MiB + 4096, 1 * MiB},
		{300 * MiB, 2 * MiB},
		{700*MiB + 8192, 512 << 10},
		{GiB - 448<<10, 448 << 10},
	}
	writeSparse(t, path, GiB, ext, 0o640)
	return ext
}

// checkSparseCopy asserts everything a copy of sparseGiB must satisfy.
func checkSparseCopy(t *testing.T, src, dst string) {
	t.Helper()
	assertSameContent(t, src, dst)
	si, _ := os.Stat(src)
	di, err := os.Stat(dst)
	if err != nil {
		t.Fatal(err)
	}
	if di.Size() != si.Size() {
		t.Fatalf("size %d, want %d", di.Size(), si.Size())
	}
	if di.Mode() != si.Mode() {
		t.Fatalf("mode %v, want %v", di.Mode(), si.Mode())
	}
	alloc, err := AllocatedSize(dst)
	if err != nil {
		t.Fatal(err)
	}
	// 4 MiB of data; allow for filesystem block rounding and preallocation.
	if alloc > 16*MiB {
		t.Fatalf("copy of a 1 GiB file with 4 MiB of data allocates %d bytes: holes were filled", alloc)
	}
	if !slices.Equal(dataMap(t, src), dataMap(t, dst)) {
		t.Fatalf("data extents differ:\nsrc %v\ndst %v", dataMap(t, src), dataMap(t, dst))
	}
}

func TestModeString(t *testing.T) {
	if ModeCopy.String() != "copy" || ModeReflink.String() != "reflink" {
		t.Fatalf("got %q %q", ModeCopy, ModeReflink)
	}
	if !strings.Contains(Mode(7).String(), "7") {
		t.Fatal(Mode(7).String())
	}
}

// TestCopyModeOnTempDir runs on the test's temporary directory, which is
// ext4 on the development machines (no reflink).
func TestCopyModeOnTempDir(t *testing.T) {
	dir := t.TempDir()
	mode, err := Probe(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("Probe(%s) = %s", dir, mode)
	var fs unix.Statfs_t
	if err := unix.Statfs(dir, &fs); err != nil {
		t.Fatal(err)
	}
	if fs.Type == unix.EXT4_SUPER_MAGIC && mode != ModeCopy {
		t.Fatalf("Probe on ext4 = %s, want copy", mode)
	}
	src, dst := filepath.Join(dir, "src"), filepath.Join(dir, "dst")
	sparseGiB(t, src)
	c := &Copier{Sync: true}
	if err := c.CopyFile(context.Background(), src, dst); err != nil {
		t.Fatal(err)
	}
	checkSparseCopy(t, src, dst)
	// And once with a full read of both files, holes included.
	small, smallCopy := filepath.Join(dir, "small"), filepath.Join(dir, "small-copy")
	writeSparse(t, small, 128*MiB, spreadExtents(128*MiB, 7, 300<<10), 0o600)
	if err := c.CopyFile(context.Background(), small, smallCopy); err != nil {
		t.Fatal(err)
	}
	assertSameBytes(t, small, smallCopy)
	os.Remove(small)
	os.Remove(smallCopy)
	if ents, _ := os.ReadDir(dir); len(ents) != 2 {
		t.Fatalf("probe or copy left files behind: %v", ents)
	}
}

// TestReflinkModeOnLoopXFS runs on a loop-mounted XFS made by
// SetupReflinkLoop.
func TestReflinkModeOnLoopXFS(t *testing.T) {
	mnt := mountXFS(t, 2*GiB)
	mode, err := Probe(mnt)
	if err != nil {
		t.Fatal(err)
	}
	if mode != ModeReflink {
		t.Fatalf("Probe on XFS reflink=1 = %s, want reflink", mode)
	}
	src := filepath.Join(mnt, "src")
	sparseGiB(t, src)
	unix.Sync() // settle delayed allocation before measuring

	before := fsUsed(t, mnt)
	dst := filepath.Join(mnt, "reflinked")
	if err := (&Copier{Sync: true}).CopyFile(context.Background(), src, dst); err != nil {
		t.Fatal(err)
	}
	checkSparseCopy(t, src, dst)
	unix.Sync()
	if grew := fsUsed(t, mnt) - before; grew > 1*MiB {
		t.Fatalf("reflink copy used %d more bytes; want shared extents", grew)
	}

	small, smallCopy := filepath.Join(mnt, "small"), filepath.Join(mnt, "small-copy")
	writeSparse(t, small, 128*MiB, spreadExtents(128*MiB, 7, 300<<10), 0o600)
	if err := (&Copier{}).CopyFile(context.Background(), small, smallCopy); err != nil {
		t.Fatal(err)
	}
	assertSameBytes(t, small, smallCopy)

	// The same filesystem with FICLONE disabled takes the extent-by-extent
	// path; XFS may still share the extents inside copy_file_range.
	before = fsUsed(t, mnt)
	dst2 := filepath.Join(mnt, "copied")
	if err := (&Copier{NoReflink: true}).CopyFile(context.Background(), src, dst2); err != nil {
		t.Fatal(err)
	}
	checkSparseCopy(t, src, dst2)
	unix.Sync()
	t.Logf("extent-by-extent copy on XFS used %d more bytes (copy_file_range may remap)", fsUsed(t, mnt)-before)

	// A copy from another filesystem into the XFS cannot reflink; it falls
	// back to the sparse copy.
	outside := filepath.Join(t.TempDir(), "outside")
	sparseGiB(t, outside)
	dst3 := filepath.Join(mnt, "cross-fs")
	if err := (&Copier{}).CopyFile(context.Background(), outside, dst3); err != nil {
		t.Fatal(err)
	}
	checkSparseCopy(t, outside, dst3)
}

func TestSetupReflinkLoopIdempotentAndTeardown(t *testing.T) {
	requireLoopRoot(t, "mkfs.xfs")
	ctx := context.Background()
	dir := t.TempDir()
	img, mnt := filepath.Join(dir, "store.img"), filepath.Join(dir, "mnt")
	if err := SetupReflinkLoop(ctx, img, mnt, 2*GiB); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { forceUnmount(t, mnt) })
	m, mounted, err := findMount(mnt)
	if err != nil || !mounted {
		t.Fatalf("not mounted after setup: %v", err)
	}
	if m.fstype != "xfs" || !isLoopDevice(m.source) {
		t.Fatalf("mount is %s on %s, want xfs on a loop device", m.fstype, m.source)
	}
	dio, _ := os.ReadFile(filepath.Join("/sys/block", filepath.Base(m.source), "loop", "dio"))
	t.Logf("%s: direct I/O %s", m.source, strings.TrimSpace(string(dio)))
	if fi, _ := os.Stat(img); fi.Size() != 2*GiB {
		t.Fatalf("image size %d", fi.Size())
	}
	// mkfs.xfs writes its 64 MiB log and the metadata; the rest stays a hole.
	if alloc, _ := AllocatedSize(img); alloc > 128*MiB {
		t.Fatalf("image allocates %d bytes; want a sparse image", alloc)
	}
	if err := os.WriteFile(filepath.Join(mnt, "keep"), []byte("data"), 0o644); err != nil {
		t.Fatal(err)
	}

	// Again: no error, same device, nothing new attached.
	if err := SetupReflinkLoop(ctx, img, mnt, 2*GiB); err != nil {
		t.Fatalf("second setup: %v", err)
	}
	m2, _, _ := findMount(mnt)
	if m2.source != m.source {
		t.Fatalf("second setup mounted %s over %s", m2.source, m.source)
	}

	// Teardown unmounts and detaches the loop device, twice without error.
	if err := TeardownReflinkLoop(ctx, mnt); err != nil {
		t.Fatal(err)
	}
	if _, mounted, _ := findMount(mnt); mounted {
		t.Fatal("still mounted after teardown")
	}
	if bound, _ := loopBound(m.source); bound {
		t.Fatalf("%s still attached after teardown", m.source)
	}
	if err := TeardownReflinkLoop(ctx, mnt); err != nil {
		t.Fatalf("second teardown: %v", err)
	}

	// Setting up the existing image again keeps its data.
	if err := SetupReflinkLoop(ctx, img, mnt, 0); err != nil {
		t.Fatalf("re-setup of existing image: %v", err)
	}
	if b, err := os.ReadFile(filepath.Join(mnt, "keep")); err != nil || string(b) != "data" {
		t.Fatalf("data lost across teardown and setup: %q %v", b, err)
	}
	if err := TeardownReflinkLoop(ctx, mnt); err != nil {
		t.Fatal(err)
	}
}

func TestSetupReflinkLoopRefusals(t *testing.T) {
	requireLoopRoot(t, "mkfs.xfs")
	ctx := context.Background()
	dir := t.TempDir()

	// Too small for XFS: refused before anything is created.
	err := SetupReflinkLoop(ctx, filepath.Join(dir, "tiny.img"), filepath.Join(dir, "m1"), 100*MiB)
	if !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Fatalf("tiny image: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "tiny.img")); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("tiny image left behind")
	}

	// An existing file that is not XFS is never formatted or mounted.
	notXFS := filepath.Join(dir, "not-xfs.img")
	os.WriteFile(notXFS, []byte("precious user data"), 0o600)
	err = SetupReflinkLoop(ctx, notXFS, filepath.Join(dir, "m2"), 512*MiB)
	if !errors.Is(err, errdefs.ErrConflict) {
		t.Fatalf("non-XFS image: %v", err)
	}
	if b, _ := os.ReadFile(notXFS); string(b) != "precious user data" {
		t.Fatal("non-XFS image was modified")
	}

	// A non-empty mount point is not hidden under a mount.
	busy := filepath.Join(dir, "busy")
	os.MkdirAll(busy, 0o755)
	os.WriteFile(filepath.Join(busy, "file"), nil, 0o644)
	err = SetupReflinkLoop(ctx, filepath.Join(dir, "ok.img"), busy, 512*MiB)
	if !errors.Is(err, errdefs.ErrConflict) {
		t.Fatalf("non-empty mount point: %v", err)
	}
	if _, mounted, _ := findMount(busy); mounted {
		forceUnmount(t, busy)
		t.Fatal("mounted over a non-empty directory")
	}
}

// TestCopyIntoFullFilesystem copies into nearly full loop-mounted
// filesystems: the copy fails with a clear ENOSPC error and no partial file.
func TestCopyIntoFullFilesystem(t *testing.T) {
	check := func(t *testing.T, src, dst string) {
		t.Helper()
		err := (&Copier{Sync: true}).CopyFile(context.Background(), src, dst)
		if err == nil {
			t.Fatal("copy into a full filesystem succeeded")
		}
		t.Logf("error: %v", err)
		if !errors.Is(err, unix.ENOSPC) || !errors.Is(err, errdefs.ErrResourceExhausted) {
			t.Fatalf("error does not wrap ENOSPC and ErrResourceExhausted: %v", err)
		}
		if !strings.Contains(err.Error(), "no space left") || !strings.Contains(err.Error(), dst) {
			t.Fatalf("error does not say what happened where: %v", err)
		}
		if _, serr := os.Lstat(dst); !errors.Is(serr, os.ErrNotExist) {
			t.Fatalf("partial destination left behind: %v", serr)
		}
	}

	t.Run("ext4", func(t *testing.T) {
		mnt := mountExt4(t, 16*MiB)
		src := filepath.Join(t.TempDir(), "src")
		writeSparse(t, src, 256*MiB, spreadExtents(256*MiB, 32, 1*MiB), 0o644) // 32 MiB of data
		check(t, src, filepath.Join(mnt, "dst"))
	})
	t.Run("xfs", func(t *testing.T) {
		mnt := mountXFS(t, MinReflinkImageSize)
		var st unix.Statfs_t
		unix.Statfs(mnt, &st)
		filler, err := os.Create(filepath.Join(mnt, "filler"))
		if err != nil {
			t.Fatal(err)
		}
		// Leave about 2 MiB free.
		if err := unix.Fallocate(int(filler.Fd()), 0, 0, int64(st.Bavail)*st.Bsize-2*MiB); err != nil {
			t.Fatal(err)
		}
		filler.Close()
		src := filepath.Join(t.TempDir(), "src")
		writeSparse(t, src, 64*MiB, spreadExtents(64*MiB, 8, 1*MiB), 0o644) // 8 MiB of data
		check(t, src, filepath.Join(mnt, "dst"))
	})
}

func TestCopyFileCancelled(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	writeSparse(t, src, 64*MiB, spreadExtents(64*MiB, 16, 64<<10), 0o644)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	dst := filepath.Join(dir, "dst")
	err := (&Copier{NoReflink: true}).CopyFile(ctx, src, dst)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("got %v, want context.Canceled", err)
	}
	if _, err := os.Stat(dst); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("cancelled copy left a destination")
	}

	// Cancelled between extents, after the copy started.
	ctx, cancel = context.WithCancel(context.Background())
	f, _ := os.Open(src)
	defer f.Close()
	out, _ := os.Create(filepath.Join(dir, "partial"))
	defer out.Close()
	n := 0
	err = forEachExtent(ctx, f, 64*MiB, func(off, end int64) error {
		n++
		if n == 3 {
			cancel()
		}
		return copyRange(ctx, f, out, off, end)
	})
	if !errors.Is(err, context.Canceled) || n != 3 {
		t.Fatalf("extent walk did not stop at the cancellation: n=%d err=%v", n, err)
	}
}

func TestCopyFileRefusals(t *testing.T) {
	dir := t.TempDir()
	src, dst := filepath.Join(dir, "src"), filepath.Join(dir, "dst")
	os.WriteFile(src, []byte("new"), 0o644)
	os.WriteFile(dst, []byte("old"), 0o644)
	err := (&Copier{}).CopyFile(context.Background(), src, dst)
	if !errors.Is(err, os.ErrExist) {
		t.Fatalf("existing dst: %v", err)
	}
	if b, _ := os.ReadFile(dst); string(b) != "old" {
		t.Fatal("existing dst was overwritten or removed")
	}
	if err := (&Copier{}).CopyFile(context.Background(), dir, filepath.Join(dir, "x")); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Fatalf("directory source: %v", err)
	}
	if err := (&Copier{}).CopyFile(context.Background(), filepath.Join(dir, "missing"), filepath.Join(dir, "y")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("missing source: %v", err)
	}
	// Empty files copy fine.
	empty := filepath.Join(dir, "empty")
	os.WriteFile(empty, nil, 0o600)
	if err := (&Copier{}).CopyFile(context.Background(), empty, filepath.Join(dir, "empty2")); err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(filepath.Join(dir, "empty2")); fi.Size() != 0 || fi.Mode().Perm() != 0o600 {
		t.Fatalf("empty copy: %v", fi)
	}
}

func TestOverlayFile(t *testing.T) {
	dir := t.TempDir()
	base, diff := filepath.Join(dir, "base"), filepath.Join(dir, "diff")
	writeSparse(t, base, 32*MiB, spreadExtents(32*MiB, 32, 1*MiB), 0o600) // fully written
	// The diff rewrites three pages and one larger region, with holes elsewhere.
	f, _ := os.Create(diff)
	f.Truncate(32 * MiB)
	writes := map[int64][]byte{
		0:            bytesOf(0xaa, 4096),
		5*MiB + 4096: bytesOf(0xbb, 4096),
		17 * MiB:     bytesOf(0x00, 4096), // a dirty page that is all zeros must still land
		31 * MiB:     bytesOf(0xcc, 1*MiB),
	}
	for off, b := range writes {
		f.WriteAt(b, off)
	}
	f.Close()

	want, _ := os.ReadFile(base)
	for off, b := range writes {
		copy(want[off:], b)
	}
	if err := OverlayFile(context.Background(), diff, base, true); err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(base)
	if len(got) != len(want) {
		t.Fatalf("size %d want %d", len(got), len(want))
	}
	for i := range got {
		if got[i] != want[i] {
			t.Fatalf("merged file differs at byte %d", i)
		}
	}

	// A longer diff grows the base.
	long := filepath.Join(dir, "long")
	f, _ = os.Create(long)
	f.Truncate(40 * MiB)
	f.WriteAt(bytesOf(0xdd, 4096), 39*MiB)
	f.Close()
	if err := OverlayFile(context.Background(), long, base, false); err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(base); fi.Size() != 40*MiB {
		t.Fatalf("base not grown: %d", fi.Size())
	}
}

// TestOverlayRefusesLargeBlocks: on a filesystem whose blocks are larger
// than a page, a written page allocates a whole block, so holes no longer
// mark the unwritten pages and a merge would write zeros over the base.
func TestOverlayRefusesLargeBlocks(t *testing.T) {
	mnt := mountFS(t, MinReflinkImageSize, "xfs", "mkfs.xfs", "-q", "-b", "size=16384")
	var st unix.Statfs_t
	unix.Statfs(mnt, &st)
	if st.Bsize <= int64(os.Getpagesize()) {
		t.Skipf("the kernel mounted XFS with %d-byte blocks", st.Bsize)
	}
	base, diff := filepath.Join(mnt, "base"), filepath.Join(mnt, "diff")
	writeSparse(t, base, 1*MiB, []extent{{0, 1 * MiB}}, 0o600)
	before, _ := os.ReadFile(base)
	f, _ := os.Create(diff)
	f.Truncate(1 * MiB)
	f.WriteAt(bytesOf(0xee, 4096), 64<<10)
	f.Close()
	err := OverlayFile(context.Background(), diff, base, false)
	if !errors.Is(err, ErrHolesUnreliable) {
		t.Fatalf("got %v", err)
	}
	t.Logf("%v", err)
	if after, _ := os.ReadFile(base); !bytes.Equal(before, after) {
		t.Fatal("the refused merge modified the base")
	}
}

func bytesOf(v byte, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = v
	}
	return b
}

func TestDirSizeAndSync(t *testing.T) {
	dir := t.TempDir()
	writeSparse(t, filepath.Join(dir, "sparse"), 256*MiB, []extent{{0, 1 * MiB}}, 0o644)
	os.Mkdir(filepath.Join(dir, "sub"), 0o755)
	writeSparse(t, filepath.Join(dir, "sub", "dense"), 2*MiB, []extent{{0, 2 * MiB}}, 0o644)
	os.Link(filepath.Join(dir, "sub", "dense"), filepath.Join(dir, "hardlink"))
	os.Symlink("/", filepath.Join(dir, "symlink-to-root"))
	size, err := DirSize(dir)
	if err != nil {
		t.Fatal(err)
	}
	// 1 MiB + 2 MiB of data (the hard link counted once), plus directory blocks.
	if size < 3*MiB || size > 3*MiB+256<<10 {
		t.Fatalf("DirSize = %d, want about 3 MiB", size)
	}
	if _, err := DirSize(filepath.Join(dir, "missing")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("missing dir: %v", err)
	}
	if err := FsyncDir(dir); err != nil {
		t.Fatal(err)
	}
	if err := FsyncDir(filepath.Join(dir, "missing")); err == nil {
		t.Fatal("FsyncDir of a missing dir succeeded")
	}
	if err := SyncFile(filepath.Join(dir, "sparse")); err != nil {
		t.Fatal(err)
	}
}

// TestWriteFileAtomic: the file is replaced whole with the given mode,
// no temporary file stays, and a full filesystem is said to be one and
// leaves the old content.
func TestWriteFileAtomic(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "record")
	for _, content := range []string{"first\n", "second, longer\n"} {
		if err := WriteFileAtomic(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile(p)
		fi, _ := os.Stat(p)
		if err != nil || string(b) != content || fi.Mode().Perm() != 0o600 {
			t.Fatalf("after writing %q: %q %v, mode %v", content, b, err, fi.Mode())
		}
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 1 {
		t.Fatalf("temporary files left: %v", ents)
	}
	if err := WriteFileAtomic(filepath.Join(dir, "missing", "x"), nil, 0o600); err == nil {
		t.Fatal("writing into a missing directory succeeded")
	}
	mnt := mountExt4(t, 8*MiB)
	full := filepath.Join(mnt, "record")
	if err := WriteFileAtomic(full, []byte("old"), 0o600); err != nil {
		t.Fatal(err)
	}
	filler, err := os.Create(filepath.Join(mnt, "filler"))
	if err != nil {
		t.Fatal(err)
	}
	for err == nil {
		_, err = filler.Write(make([]byte, 1<<20))
	}
	filler.Sync()
	filler.Close()
	err = WriteFileAtomic(full, make([]byte, 4*MiB), 0o600)
	if !errors.Is(err, errdefs.ErrResourceExhausted) {
		t.Fatalf("writing on a full filesystem: %v", err)
	}
	if b, _ := os.ReadFile(full); string(b) != "old" {
		t.Fatalf("a failed write changed the file: %q", b)
	}
}

func TestProbeErrors(t *testing.T) {
	if _, err := Probe(filepath.Join(t.TempDir(), "missing")); err == nil {
		t.Fatal("Probe of a missing directory succeeded")
	}
}

func TestParseMountInfo(t *testing.T) {
	e, err := parseMountInfo(`36 35 98:0 /mnt1 /mnt/with\040space rw,noatime master:1 - xfs /dev/loop3 rw,errors=continue`)
	if err != nil {
		t.Fatal(err)
	}
	if e.mountPoint != "/mnt/with space" || e.fstype != "xfs" || e.source != "/dev/loop3" {
		t.Fatalf("%+v", e)
	}
	if _, err := parseMountInfo("garbage"); err == nil {
		t.Fatal("garbage parsed")
	}
	if got := unescapeMountInfo(`a\134b\011c\`); got != "a\\b\tc\\" {
		t.Fatalf("%q", got)
	}
}

// benchSource writes the benchmark's source: 512 MiB with 100 MiB of data in
// 400 extents of 256 KiB, like a guest RAM file with 100 MiB touched.
func benchSource(b *testing.B, dir string) string {
	src := filepath.Join(dir, "bench-src")
	writeSparse(b, src, 512*MiB, spreadExtents(512*MiB, 400, 256<<10), 0o600)
	unix.Sync()
	return src
}

func benchCopy(b *testing.B, dir, src string, c *Copier) {
	b.SetBytes(100 * MiB)
	b.ResetTimer()
	for i := 0; b.Loop(); i++ {
		dst := filepath.Join(dir, fmt.Sprintf("bench-dst-%d", i))
		if err := c.CopyFile(context.Background(), src, dst); err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		os.Remove(dst)
		b.StartTimer()
	}
}

// BenchmarkCopySparse512M copies a 512 MiB file with 100 MiB of data:
// "copy" on the temporary directory (ext4 here), "reflink" on a loop XFS
// (each also with Sync, "-fsync", as checkpoints use it),
// and "xfs-noreflink" on the same XFS with FICLONE disabled (extent by
// extent; XFS may still remap inside copy_file_range).
func BenchmarkCopySparse512M(b *testing.B) {
	b.Run("copy", func(b *testing.B) {
		dir := b.TempDir()
		if m, _ := Probe(dir); m != ModeCopy {
			b.Skipf("temporary directory supports %s", m)
		}
		benchCopy(b, dir, benchSource(b, dir), &Copier{})
	})
	b.Run("reflink", func(b *testing.B) {
		mnt := mountXFS(b, 2*GiB)
		benchCopy(b, mnt, benchSource(b, mnt), &Copier{})
	})
	b.Run("copy-fsync", func(b *testing.B) {
		dir := b.TempDir()
		if m, _ := Probe(dir); m != ModeCopy {
			b.Skipf("temporary directory supports %s", m)
		}
		benchCopy(b, dir, benchSource(b, dir), &Copier{Sync: true})
	})
	b.Run("reflink-fsync", func(b *testing.B) {
		mnt := mountXFS(b, 2*GiB)
		benchCopy(b, mnt, benchSource(b, mnt), &Copier{Sync: true})
	})
	b.Run("xfs-noreflink", func(b *testing.B) {
		mnt := mountXFS(b, 2*GiB)
		benchCopy(b, mnt, benchSource(b, mnt), &Copier{NoReflink: true})
	})
}

// Copier is what the VMM backends take.
var _ vmm.Copier = (*Copier)(nil)
