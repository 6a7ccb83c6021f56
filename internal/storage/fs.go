package storage

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"

	"golang.org/x/sys/unix"
)

// Mode is how a directory's files get copied.
type Mode int

// The copy modes Probe reports.
const (
	// ModeCopy is the sparse-aware byte copy (SEEK_DATA/SEEK_HOLE and
	// copy_file_range): cost grows with the data in the file.
	ModeCopy Mode = iota
	// ModeReflink is the FICLONE reflink: constant, near-zero cost.
	ModeReflink
)

// String returns "copy" or "reflink".
func (m Mode) String() string {
	switch m {
	case ModeCopy:
		return "copy"
	case ModeReflink:
		return "reflink"
	default:
		return fmt.Sprintf("Mode(%d)", int(m))
	}
}

// Probe tells whether files inside dir can be reflinked to each other, by
// creating two temporary files in dir and trying FICLONE between them. It
// removes both files before returning. An error means dir itself is not
// usable (missing, read-only, full).
func Probe(dir string) (Mode, error) {
	src, err := os.CreateTemp(dir, ".noid-probe-*")
	if err != nil {
		return ModeCopy, fmt.Errorf("probing reflink support in %s: %w", dir, err)
	}
	defer os.Remove(src.Name())
	defer src.Close()
	dst, err := os.CreateTemp(dir, ".noid-probe-*")
	if err != nil {
		return ModeCopy, fmt.Errorf("probing reflink support in %s: %w", dir, err)
	}
	defer os.Remove(dst.Name())
	defer dst.Close()
	block := make([]byte, 4096)
	for i := range block {
		block[i] = byte(i)
	}
	if _, err := src.Write(block); err != nil {
		return ModeCopy, fmt.Errorf("probing reflink support in %s: %w", dir, classify(src.Name(), err))
	}
	err = unix.IoctlFileClone(int(dst.Fd()), int(src.Fd()))
	switch {
	case err == nil:
		return ModeReflink, nil
	case reflinkUnsupported(err):
		return ModeCopy, nil
	default:
		return ModeCopy, fmt.Errorf("probing reflink support in %s: FICLONE: %w", dir, err)
	}
}

// DirSize returns the disk space allocated to the files under dir, counted
// from st_blocks (so holes in sparse files cost nothing), without following
// symlinks. A file with several hard links under dir is counted once.
// Extents shared by reflink are counted once per file that references them,
// so on a reflink filesystem this is an upper bound of the space freed by
// deleting dir.
func DirSize(dir string) (int64, error) {
	type key struct{ dev, ino uint64 }
	seen := make(map[key]bool)
	var total int64
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			if path != dir && errors.Is(err, fs.ErrNotExist) {
				return nil // removed while we walked
			}
			return err
		}
		info, err := d.Info()
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			return err
		}
		st, ok := info.Sys().(*syscall.Stat_t)
		if !ok {
			return nil
		}
		if st.Nlink > 1 && !d.IsDir() {
			k := key{uint64(st.Dev), st.Ino}
			if seen[k] {
				return nil
			}
			seen[k] = true
		}
		total += st.Blocks * 512
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("measuring %s: %w", dir, err)
	}
	return total, nil
}

// FsyncDir fsyncs the directory dir, making the creation, removal and
// renaming of its entries durable.
func FsyncDir(dir string) error {
	f, err := os.OpenFile(dir, os.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		return fmt.Errorf("syncing directory %s: %w", dir, err)
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		return fmt.Errorf("syncing directory %s: %w", dir, err)
	}
	return nil
}

// SyncFile fsyncs the file at path (data and metadata). Use it for files
// written by another process, such as a VMM's snapshot files.
func SyncFile(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("syncing %s: %w", path, err)
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		return fmt.Errorf("syncing %s: %w", path, classify(path, err))
	}
	return nil
}

// AllocatedSize returns the bytes allocated on disk to the file at path
// (st_blocks × 512), which is less than its size when it has holes.
func AllocatedSize(path string) (int64, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return 0, fmt.Errorf("stat %s: %w", path, err)
	}
	return st.Blocks * 512, nil
}

// WriteFileAtomic replaces the file at path with data, durably: it writes
// a temporary file next to it with mode perm, fsyncs it, renames it over
// path and fsyncs the directory. A crash leaves the old file or the new
// one, never a mix.
func WriteFileAtomic(path string, data []byte, perm os.FileMode) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	tmp := f.Name()
	_, err = f.Write(data)
	if err == nil {
		err = f.Chmod(perm)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("writing %s: %w", path, classify(path, err))
	}
	return FsyncDir(filepath.Dir(path))
}
