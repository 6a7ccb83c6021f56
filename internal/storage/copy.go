package storage

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"github.com/noid-vm/noid/internal/errdefs"
)

// chunkSize bounds one copy_file_range call so that a cancelled context is
// noticed within one chunk even inside a huge data extent.
const chunkSize = 64 << 20

// Copier copies a file into a new file: with a FICLONE reflink when the
// filesystem supports it, otherwise with a sparse-aware copy that keeps holes
// as holes. The zero value is ready to use; a Copier is safe for concurrent
// use. It implements vmm.Copier.
type Copier struct {
	// Sync makes CopyFile fsync the new file before returning, so its data
	// survives a crash. The caller still has to fsync the directory that
	// holds it (FsyncDir) before relying on the name.
	Sync bool
	// NoReflink disables the whole-file FICLONE attempt, so the copy goes
	// extent by extent even where reflinks work (for benchmarks and tests).
	// Note that on XFS and btrfs copy_file_range may still share extents.
	NoReflink bool

	// reflinked is set once a FICLONE has worked.
	reflinked atomic.Bool
}

// FlushFirst reports whether copies are reflinks here: a reflink must
// write the source's dirty pages back first, so a caller about to pause a
// VM for a copy does better to flush them while the VM still runs. It
// implements vmm.FlushFirster.
func (c *Copier) FlushFirst() bool { return c.reflinked.Load() }

// CopyInto copies src into dst, an existing file of the same size that holds
// no data yet (a fresh sparse file that another process may already have
// open or mapped, like a warm spare's RAM file): with FICLONE where the
// filesystem has it, extent by extent otherwise. dst keeps its inode.
func (c *Copier) CopyInto(ctx context.Context, src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return fmt.Errorf("copying %s into %s: %w", src, dst, err)
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("copying %s into %s: %w", src, dst, err)
	}
	defer out.Close()
	si, err := in.Stat()
	if err != nil {
		return err
	}
	di, err := out.Stat()
	if err != nil {
		return err
	}
	if si.Size() != di.Size() {
		return fmt.Errorf("copying %s into %s: sizes differ (%d and %d bytes): %w", src, dst, si.Size(), di.Size(), errdefs.ErrInvalidArgument)
	}
	if err := c.copyData(ctx, in, out, si.Size(), dst); err != nil {
		return fmt.Errorf("copying %s into %s: %w", src, dst, err)
	}
	return nil
}

// copyData gives out (the file at dst) the size bytes of in: with FICLONE
// unless NoReflink or the filesystem cannot, extent by extent otherwise.
// A full filesystem is classified as such.
func (c *Copier) copyData(ctx context.Context, in, out *os.File, size int64, dst string) error {
	if !c.NoReflink && size > 0 {
		cerr := unix.IoctlFileClone(int(out.Fd()), int(in.Fd()))
		if cerr == nil {
			c.reflinked.Store(true)
			return nil
		}
		if !reflinkUnsupported(cerr) {
			return fmt.Errorf("reflink: %w", classify(dst, cerr))
		}
	}
	return classify(dst, sparseCopy(ctx, in, out, size))
}

// CopyFile copies src to dst, which must not exist yet: it is created with
// O_EXCL and gets src's size and permission bits. On any error, including a
// cancelled ctx, dst is removed, so a failed copy never leaves a partial
// file. A full filesystem gives an error that wraps both
// errdefs.ErrResourceExhausted and unix.ENOSPC (or EDQUOT).
//
// ctx is checked between data extents (and every 64 MiB inside one); a
// reflink is a single ioctl and is not interruptible.
func (c *Copier) CopyFile(ctx context.Context, src, dst string) (err error) {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("copying %s to %s: %w", src, dst, err)
	}
	in, err := os.Open(src)
	if err != nil {
		return fmt.Errorf("copying %s to %s: %w", src, dst, err)
	}
	defer in.Close()
	fi, err := in.Stat()
	if err != nil {
		return fmt.Errorf("copying %s to %s: %w", src, dst, err)
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("copying %s to %s: source is not a regular file (%s): %w",
			src, dst, fi.Mode().Type(), errdefs.ErrInvalidArgument)
	}
	perm := fi.Mode().Perm() | (fi.Mode() & (os.ModeSetuid | os.ModeSetgid | os.ModeSticky))
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("copying %s to %s: %w", src, dst, err)
	}
	defer func() {
		if cerr := out.Close(); cerr != nil && err == nil {
			err = fmt.Errorf("copying %s to %s: closing destination: %w", src, dst, classify(dst, cerr))
		}
		if err != nil {
			os.Remove(dst)
		}
	}()

	if err := c.copyData(ctx, in, out, fi.Size(), dst); err != nil {
		return fmt.Errorf("copying %s to %s: %w", src, dst, err)
	}
	if err := out.Chmod(perm); err != nil {
		return fmt.Errorf("copying %s to %s: setting mode: %w", src, dst, err)
	}
	if c.Sync {
		if err := out.Sync(); err != nil {
			return fmt.Errorf("copying %s to %s: fsync: %w", src, dst, classify(dst, err))
		}
	}
	return nil
}

// reflinkUnsupported reports whether a FICLONE error means "this pair of
// files cannot be reflinked here" rather than a real failure.
func reflinkUnsupported(err error) bool {
	return errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOTSUP) ||
		errors.Is(err, unix.EXDEV) || errors.Is(err, unix.EINVAL) ||
		errors.Is(err, unix.ENOTTY) || errors.Is(err, unix.ENOSYS) ||
		errors.Is(err, unix.EBADF) || errors.Is(err, unix.EPERM)
}

// classify turns a full-filesystem error into one that says so plainly and
// wraps errdefs.ErrResourceExhausted; other errors pass unchanged.
func classify(dst string, err error) error {
	if errors.Is(err, unix.ENOSPC) || errors.Is(err, unix.EDQUOT) {
		return fmt.Errorf("no space left on the filesystem holding %s: %w: %w",
			filepath.Dir(dst), errdefs.ErrResourceExhausted, err)
	}
	return err
}

// sparseCopy copies the data extents of in into out at the same offsets and
// sets out's size to size, so holes in in stay holes in out.
func sparseCopy(ctx context.Context, in, out *os.File, size int64) error {
	if err := out.Truncate(size); err != nil {
		return fmt.Errorf("setting size: %w", err)
	}
	return forEachExtent(ctx, in, size, func(off, end int64) error {
		return copyRange(ctx, in, out, off, end)
	})
}

// forEachExtent calls fn for each data extent [off, end) of f, in order. On a
// filesystem without SEEK_DATA support the whole file is one extent.
func forEachExtent(ctx context.Context, f *os.File, size int64, fn func(off, end int64) error) error {
	fd := int(f.Fd())
	var off int64
	for off < size {
		if err := ctx.Err(); err != nil {
			return err
		}
		data, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			return nil // no data after off: the rest is a hole
		}
		if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.EOPNOTSUPP) {
			return fn(off, size) // no hole support: copy everything
		}
		if err != nil {
			return fmt.Errorf("seeking data at %d: %w", off, err)
		}
		hole, err := unix.Seek(fd, data, unix.SEEK_HOLE)
		if err != nil {
			return fmt.Errorf("seeking hole at %d: %w", data, err)
		}
		if hole > size {
			hole = size
		}
		if data >= hole {
			return nil
		}
		if err := fn(data, hole); err != nil {
			return err
		}
		off = hole
	}
	return nil
}

// copyRange copies [off, end) of in to the same offsets of out with
// copy_file_range, falling back to pread/pwrite where the kernel refuses.
func copyRange(ctx context.Context, in, out *os.File, off, end int64) error {
	rfd, wfd := int(in.Fd()), int(out.Fd())
	for off < end {
		if err := ctx.Err(); err != nil {
			return err
		}
		n := min(end-off, chunkSize)
		roff, woff := off, off
		w, err := unix.CopyFileRange(rfd, &roff, wfd, &woff, int(n), 0)
		if err != nil {
			if errors.Is(err, unix.EXDEV) || errors.Is(err, unix.EINVAL) ||
				errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EOPNOTSUPP) {
				return rwCopy(ctx, in, out, off, end)
			}
			return fmt.Errorf("copy_file_range at %d: %w", off, err)
		}
		if w == 0 {
			return fmt.Errorf("copy_file_range at %d: %w (source shrank during the copy)", off, io.ErrUnexpectedEOF)
		}
		off += int64(w)
	}
	return nil
}

// rwCopy is the portable fallback of copyRange.
func rwCopy(ctx context.Context, in, out *os.File, off, end int64) error {
	buf := make([]byte, 1<<20)
	for off < end {
		if err := ctx.Err(); err != nil {
			return err
		}
		n := min(end-off, int64(len(buf)))
		r, err := in.ReadAt(buf[:n], off)
		if r > 0 {
			if _, werr := out.WriteAt(buf[:r], off); werr != nil {
				return fmt.Errorf("writing at %d: %w", off, werr)
			}
			off += int64(r)
		}
		if err == io.EOF {
			if off < end {
				return fmt.Errorf("reading at %d: %w (source shrank during the copy)", off, io.ErrUnexpectedEOF)
			}
			return nil
		}
		if err != nil {
			return fmt.Errorf("reading at %d: %w", off, err)
		}
	}
	return nil
}

// ForEachExtent calls fn for each data extent [off, end) of f (of size
// bytes), in order, skipping holes (SEEK_DATA/SEEK_HOLE). On a filesystem
// without SEEK_DATA the whole file is one extent.
func ForEachExtent(ctx context.Context, f *os.File, size int64, fn func(off, end int64) error) error {
	return forEachExtent(ctx, f, size, fn)
}
