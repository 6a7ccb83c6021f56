package manager

import (
	"encoding/binary"
	"fmt"
	"os"
	"syscall"
	"testing"
	"unsafe"

	"github.com/noid-vm/noid/internal/storage"
	"github.com/noid-vm/noid/internal/testutil"
)

// TestPinBaseIsDurable: the pinned copy of a base image has reached the
// disk when pinBase returns. Every VM, checkpoint and golden built on the
// image links it, so a crash must not leave them a pin whose data was
// still in the page cache; and a pin written back later made the first
// checkpoint's pause wait for it. It reads the page flags of the pin's
// cached pages (/proc/kpageflags, root): none may be dirty.
func TestPinBaseIsDurable(t *testing.T) {
	testutil.RequireRoot(t)
	e := newEnv(t, "")
	img := testutil.TinyImage(t)
	// A version of the image no other test has pinned: a copy of its own.
	src := e.dir + "/rootfs-copy.ext4"
	data, err := os.ReadFile(img.Rootfs)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(src, data, 0o644); err != nil {
		t.Fatal(err)
	}
	pinned, err := e.mgr.pinBase(tctx(t), src)
	if err != nil {
		t.Fatal(err)
	}
	cached, dirty, err := dirtyPages(pinned)
	if err != nil {
		t.Fatal(err)
	}
	if cached == 0 {
		if e.mgr.StorageMode() == storage.ModeReflink {
			t.Skipf("the pin %s is a reflink of the image: it has no pages of its own to check", pinned)
		}
		t.Fatalf("none of %s's pages is in the page cache: the check would prove nothing", pinned)
	}
	if dirty > 0 {
		t.Errorf("%d of the %d cached pages of the pinned base %s are dirty: it was not synced", dirty, cached, pinned)
	}
}

// pageSink keeps the reads that fault pages in from being optimised away.
var pageSink byte

// dirtyPages maps path and counts its pages that are in the page cache and,
// of those, the dirty ones, from /proc/self/pagemap and /proc/kpageflags.
func dirtyPages(path string) (cached, dirty int, err error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, 0, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return 0, 0, err
	}
	size := int(fi.Size())
	if size == 0 {
		return 0, 0, fmt.Errorf("%s is empty", path)
	}
	mem, err := syscall.Mmap(int(f.Fd()), 0, size, syscall.PROT_READ, syscall.MAP_SHARED)
	if err != nil {
		return 0, 0, err
	}
	defer syscall.Munmap(mem)
	page := os.Getpagesize()
	vec := make([]byte, (size+page-1)/page)
	if _, _, errno := syscall.Syscall(syscall.SYS_MINCORE, uintptr(unsafe.Pointer(&mem[0])), uintptr(size), uintptr(unsafe.Pointer(&vec[0]))); errno != 0 {
		return 0, 0, fmt.Errorf("mincore: %w", errno)
	}
	pagemap, err := os.Open("/proc/self/pagemap")
	if err != nil {
		return 0, 0, err
	}
	defer pagemap.Close()
	kflags, err := os.Open("/proc/kpageflags")
	if err != nil {
		return 0, 0, err
	}
	defer kflags.Close()
	const kpfDirty = 1 << 4
	base := uintptr(unsafe.Pointer(&mem[0]))
	var b [8]byte
	for i, in := range vec {
		if in&1 == 0 {
			continue
		}
		pageSink += mem[i*page] // fault the cached page into the mapping
		if _, err := pagemap.ReadAt(b[:], int64((base/uintptr(page)+uintptr(i))*8)); err != nil {
			return 0, 0, err
		}
		ent := binary.LittleEndian.Uint64(b[:])
		pfn := ent & (1<<55 - 1)
		if ent&(1<<63) == 0 || pfn == 0 {
			continue
		}
		if _, err := kflags.ReadAt(b[:], int64(pfn*8)); err != nil {
			return 0, 0, err
		}
		cached++
		if binary.LittleEndian.Uint64(b[:])&kpfDirty != 0 {
			dirty++
		}
	}
	return cached, dirty, nil
}
