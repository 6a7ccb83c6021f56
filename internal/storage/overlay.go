package storage

import (
	"context"
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// ErrHolesUnreliable is returned by OverlayFile when the diff file's
// filesystem reports more data than it has allocated, which means it does not
// track holes precisely enough to tell written pages from unwritten ones.
var ErrHolesUnreliable = errors.New("filesystem does not report holes precisely")

// OverlayFile writes every data extent of the sparse file diff into the
// existing file dst at the same offsets, leaving dst's bytes under diff's
// holes untouched, and grows dst to diff's size if it is shorter. This merges
// a Firecracker diff snapshot (which writes only the dirty guest pages and
// leaves holes elsewhere) onto a copy of its base memory file.
//
// The result is only right if diff's holes are exactly the bytes that were
// never written. That holds when diff was written in whole pages on a
// filesystem whose blocks are no larger than a page and that reports holes
// (ext4, XFS, btrfs and tmpfs on x86_64). OverlayFile refuses with
// ErrHolesUnreliable when the block size is larger than a page, or when the
// filesystem reports more data than it has allocated, as filesystems without
// SEEK_DATA support do. dst is fsynced when sync is true. ctx is checked
// between extents.
func OverlayFile(ctx context.Context, diff, dst string, sync bool) error {
	in, err := os.Open(diff)
	if err != nil {
		return fmt.Errorf("merging %s into %s: %w", diff, dst, err)
	}
	defer in.Close()
	var st unix.Stat_t
	if err := unix.Fstat(int(in.Fd()), &st); err != nil {
		return fmt.Errorf("merging %s into %s: %w", diff, dst, err)
	}
	size, allocated := st.Size, st.Blocks*512
	var fs unix.Statfs_t
	if err := unix.Fstatfs(int(in.Fd()), &fs); err != nil {
		return fmt.Errorf("merging %s into %s: %w", diff, dst, err)
	}
	if page := int64(unix.Getpagesize()); fs.Bsize > page {
		// A page written into a larger block allocates the whole block, and
		// the block's unwritten rest would be merged as zeros.
		return fmt.Errorf("merging %s into %s: its filesystem's block size %d is larger than a page (%d): %w",
			diff, dst, fs.Bsize, page, ErrHolesUnreliable)
	}

	// First pass: measure the data extents and check they are plausible.
	var data, extents int64
	err = forEachExtent(ctx, in, size, func(off, end int64) error {
		data += end - off
		extents++
		return nil
	})
	if err != nil {
		return fmt.Errorf("merging %s into %s: %w", diff, dst, err)
	}
	if data > allocated+extents*int64(unix.Getpagesize()) {
		return fmt.Errorf("merging %s into %s: %d bytes of data reported but only %d allocated: %w",
			diff, dst, data, allocated, ErrHolesUnreliable)
	}

	out, err := os.OpenFile(dst, os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("merging %s into %s: %w", diff, dst, err)
	}
	defer out.Close()
	ofi, err := out.Stat()
	if err != nil {
		return fmt.Errorf("merging %s into %s: %w", diff, dst, err)
	}
	if ofi.Size() < size {
		if err := out.Truncate(size); err != nil {
			return fmt.Errorf("merging %s into %s: growing: %w", diff, dst, classify(dst, err))
		}
	}
	err = forEachExtent(ctx, in, size, func(off, end int64) error {
		return copyRange(ctx, in, out, off, end)
	})
	if err != nil {
		return fmt.Errorf("merging %s into %s: %w", diff, dst, classify(dst, err))
	}
	if sync {
		if err := out.Sync(); err != nil {
			return fmt.Errorf("merging %s into %s: fsync: %w", diff, dst, classify(dst, err))
		}
	}
	if err := out.Close(); err != nil {
		return fmt.Errorf("merging %s into %s: %w", diff, dst, classify(dst, err))
	}
	return nil
}
