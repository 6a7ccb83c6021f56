package image

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// sha256File returns the hex SHA-256 of a file's content. Holes of sparse
// files are hashed as the zeros they read as, without reading them.
func sha256File(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("hash %s: %w", path, err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return "", fmt.Errorf("hash %s: %w", path, err)
	}
	h := sha256.New()
	buf := make([]byte, 1<<20)
	size := st.Size()
	var off int64
	for off < size {
		data, err := unix.Seek(int(f.Fd()), off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) { // the rest is a hole
			data = size
		} else if err != nil { // no SEEK_DATA: read everything
			data = off
		}
		if err := hashZeros(h, data-off); err != nil {
			return "", err
		}
		if data >= size {
			break
		}
		hole, err := unix.Seek(int(f.Fd()), data, unix.SEEK_HOLE)
		if err != nil {
			hole = size
		}
		if _, err := io.CopyBuffer(h, io.NewSectionReader(f, data, hole-data), buf); err != nil {
			return "", fmt.Errorf("hash %s: %w", path, err)
		}
		off = hole
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

var zeroBlock = make([]byte, 1<<20)

func hashZeros(h io.Writer, n int64) error {
	for n > 0 {
		k := min(n, int64(len(zeroBlock)))
		if _, err := h.Write(zeroBlock[:k]); err != nil {
			return err
		}
		n -= k
	}
	return nil
}

// hashStrings returns a hex SHA-256 over the parts, unambiguously separated.
func hashStrings(parts ...string) string {
	h := sha256.New()
	for _, p := range parts {
		fmt.Fprintf(h, "%d:%s\n", len(p), p)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// writeFileSync writes data to path and fsyncs it.
func writeFileSync(path string, data []byte, perm fs.FileMode) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, perm)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("sync %s: %w", path, err)
	}
	return f.Close()
}

// writeFileAtomic writes data to a temporary file next to path, fsyncs it and
// renames it into place.
func writeFileAtomic(path string, data []byte, perm fs.FileMode) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), ".tmp-"+filepath.Base(path)+"-*")
	if err != nil {
		return err
	}
	name := tmp.Name()
	tmp.Close()
	if err := writeFileSync(name, data, perm); err != nil {
		os.Remove(name)
		return err
	}
	if err := os.Chmod(name, perm); err != nil {
		os.Remove(name)
		return err
	}
	if err := os.Rename(name, path); err != nil {
		os.Remove(name)
		return err
	}
	return syncDir(filepath.Dir(path))
}

// syncDir fsyncs a directory so that renames inside it are durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Sync(); err != nil && !errors.Is(err, unix.EINVAL) {
		return fmt.Errorf("sync dir %s: %w", dir, err)
	}
	return nil
}

// syncFile fsyncs an existing file.
func syncFile(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", path, err)
	}
	return nil
}

// replaceDir atomically puts the complete directory tmp at final. If final
// exists, the two are exchanged with renameat2(RENAME_EXCHANGE) and the old
// one is removed; where that is not supported, final is first renamed aside
// (a crash in between leaves no directory at final, never a half one).
func replaceDir(tmp, final string) error {
	if err := syncDir(tmp); err != nil {
		return err
	}
	parent := filepath.Dir(final)
	err := os.Rename(tmp, final)
	if err == nil {
		return syncDir(parent)
	}
	if _, statErr := os.Lstat(final); statErr != nil {
		return fmt.Errorf("rename %s: %w", tmp, err)
	}
	err = unix.Renameat2(unix.AT_FDCWD, tmp, unix.AT_FDCWD, final, unix.RENAME_EXCHANGE)
	if err == nil {
		if err := syncDir(parent); err != nil {
			return err
		}
		return removeAllSafe(tmp) // tmp now holds the old directory
	}
	old := filepath.Join(parent, fmt.Sprintf(".old-%s-%d", filepath.Base(final), time.Now().UnixNano()))
	if err := os.Rename(final, old); err != nil {
		return fmt.Errorf("move old %s aside: %w", final, err)
	}
	if err := os.Rename(tmp, final); err != nil {
		return fmt.Errorf("rename %s: %w", tmp, err)
	}
	if err := syncDir(parent); err != nil {
		return err
	}
	return removeAllSafe(old)
}

// mountsUnder returns the mount points at or below dir, deepest first.
func mountsUnder(dir string) ([]string, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, err
	}
	if real, err := filepath.EvalSymlinks(abs); err == nil {
		abs = real
	}
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 {
			continue
		}
		mp := unescapeMountinfo(fields[4])
		if mp == abs || strings.HasPrefix(mp, abs+"/") {
			out = append(out, mp)
		}
	}
	sort.Slice(out, func(i, j int) bool { return len(out[i]) > len(out[j]) })
	return out, sc.Err()
}

func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			var v int
			if _, err := fmt.Sscanf(s[i+1:i+4], "%3o", &v); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// removeAllSafe removes dir after detaching anything mounted below it (a
// killed debootstrap can leave proc or sysfs mounted in its target), so that
// RemoveAll never walks into a host filesystem.
func removeAllSafe(dir string) error {
	mps, err := mountsUnder(dir)
	if err != nil {
		return fmt.Errorf("remove %s: %w", dir, err)
	}
	for _, mp := range mps {
		if err := unix.Unmount(mp, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) {
			return fmt.Errorf("remove %s: unmount %s: %w", dir, mp, err)
		}
	}
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("remove %s: %w", dir, err)
	}
	return nil
}

// linkOrCopy hard-links src to a new file dst, or copies it (sparse-aware)
// when linking across filesystems or is otherwise not possible. dst must not
// exist: it may already be a link to src, and copying over it would truncate
// src itself.
func linkOrCopy(src, dst string) error {
	err := os.Link(src, dst)
	if err == nil {
		return nil
	}
	if errors.Is(err, fs.ErrExist) {
		return err
	}
	return copyFileSparse(src, dst)
}

// copyFileSparse copies src to a new file dst, preserving holes
// (SEEK_DATA/SEEK_HOLE) and the permission bits. It refuses to overwrite an
// existing dst.
func copyFileSparse(src, dst string) (err error) {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	st, err := in.Stat()
	if err != nil {
		return err
	}
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, st.Mode().Perm())
	if err != nil {
		return err
	}
	defer func() {
		if cerr := out.Close(); err == nil {
			err = cerr
		}
	}()
	size := st.Size()
	if err := out.Truncate(size); err != nil {
		return err
	}
	buf := make([]byte, 1<<20)
	var off int64
	for off < size {
		data, err := unix.Seek(int(in.Fd()), off, unix.SEEK_DATA)
		if err != nil {
			if errors.Is(err, unix.ENXIO) { // only a hole remains
				break
			}
			data = off // SEEK_DATA unsupported: copy everything
		}
		hole, err := unix.Seek(int(in.Fd()), data, unix.SEEK_HOLE)
		if err != nil {
			hole = size
		}
		if _, err := io.CopyBuffer(io.NewOffsetWriter(out, data), io.NewSectionReader(in, data, hole-data), buf); err != nil {
			return fmt.Errorf("copy %s: %w", src, err)
		}
		off = hole
	}
	return out.Sync()
}

// dirSize returns the apparent size of the files in a tree (for sizing the
// ext4 image); it does not follow symlinks.
func dirSize(dir string) (int64, error) {
	var total int64
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if info, err := d.Info(); err == nil && info.Mode().IsRegular() {
			total += (info.Size() + 4095) &^ 4095
		} else {
			total += 4096
		}
		return nil
	})
	return total, err
}

// fileLock is an exclusive flock(2) on a lock file.
type fileLock struct{ f *os.File }

// lockFile takes an exclusive lock on path, waiting until it is free or ctx
// ends. waiting is called once if the lock is busy.
func lockFile(ctx context.Context, path string, waiting func()) (*fileLock, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open lock %s: %w", path, err)
	}
	told := false
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return &fileLock{f: f}, nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) && !errors.Is(err, unix.EINTR) {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		if !told && waiting != nil {
			waiting()
			told = true
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func (l *fileLock) Unlock() {
	unix.Flock(int(l.f.Fd()), unix.LOCK_UN)
	l.f.Close()
}
