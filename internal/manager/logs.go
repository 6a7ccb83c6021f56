package manager

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/noid-vm/noid/internal/store"
)

// VMM logs. A guest writes its serial console, and QEMU its own stderr,
// into files of the VM's (or warm spare's) directory that the VMM holds open
// with O_APPEND (QEMU: -chardev file,append=on on a descriptor the server
// passed; Firecracker: its stdout). The guest controls how much is written,
// so the server trims them: every logTrimInterval, a log holding more than
// [limits] serial_log_size keeps its newest half. A trim must be safe while
// the VMM appends, and keep what it appends:
//
//   - FALLOC_FL_COLLAPSE_RANGE (ext4, XFS) removes the oldest blocks and
//     shifts the rest down, under the inode lock an O_APPEND write takes
//     too, so the next append lands at the new end and nothing is lost;
//   - where that is not supported (btrfs, tmpfs), FALLOC_FL_PUNCH_HOLE frees
//     the oldest blocks but keeps the file's size: the log then starts with
//     a hole, which every reader skips (SEEK_DATA).
//
// The trim needs no VMM cooperation, so it covers QEMU and Firecracker,
// VMMs started by an earlier server (a restarted server trims them at its
// first pass) and spares. While no server runs, a log grows at the rate the
// guest can write its serial port, until the next server starts.
var vmmLogs = []string{"serial.log", "qemu.log"}

// logTrimInterval is how often the logs are checked.
const logTrimInterval = time.Second

// trimLogsLoop trims the VMM logs until the manager closes.
func (m *Manager) trimLogsLoop() {
	defer m.bg.Done()
	t := time.NewTicker(logTrimInterval)
	defer t.Stop()
	warned := false
	for {
		if err := m.trimLogs(); err != nil && !warned {
			warned = true
			m.log.Warn("cannot trim VM console logs on this filesystem; they may grow beyond [limits] serial_log_size", "err", err)
		}
		select {
		case <-m.closed:
			return
		case <-t.C:
		}
	}
}

// trimLogs trims every VM's and spare's logs once; it returns the first
// error.
func (m *Manager) trimLogs() error {
	var first error
	limit := m.cfg.SerialLogBytes()
	for _, pattern := range []string{filepath.Join(m.cfg.StorageDir(), "users", "*", "vms", "*"), filepath.Join(m.poolDir(), "*")} {
		dirs, _ := filepath.Glob(pattern)
		for _, d := range dirs {
			for _, name := range vmmLogs {
				if err := trimLog(filepath.Join(d, name), limit); err != nil && first == nil && !errors.Is(err, os.ErrNotExist) {
					first = err
				}
			}
		}
	}
	return first
}

// trimLog keeps the newest half of the log at path once more than limit
// bytes of it hold data (see vmmLogs).
func trimLog(path string, limit int64) error {
	f, err := os.OpenFile(path, os.O_RDWR|syscall.O_NOFOLLOW|syscall.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	size := fi.Size()
	start := dataStart(f, 0, size)
	if size-start <= limit {
		return nil
	}
	var fs unix.Statfs_t
	if err := unix.Fstatfs(int(f.Fd()), &fs); err != nil {
		return fmt.Errorf("trimming %s: %w", path, err)
	}
	bs := max(fs.Bsize, 512)
	end := (size - limit/2) / bs * bs // block-aligned, and short of the end
	if end <= start {
		return nil
	}
	err = unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_COLLAPSE_RANGE, 0, end)
	if errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.EINVAL) {
		err = unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 0, end)
	}
	if err != nil {
		return fmt.Errorf("trimming %s: %w", path, err)
	}
	return nil
}

// dataStart is the offset of the first byte of data at or after off in f
// (of the given size), past a hole that trimming punched; size when there
// is none.
func dataStart(f *os.File, off, size int64) int64 {
	d, err := unix.Seek(int(f.Fd()), off, unix.SEEK_DATA)
	switch {
	case errors.Is(err, unix.ENXIO):
		return size
	case err != nil || d < off:
		return off
	}
	return d
}

// openLogTail opens the log at path for its newest n bytes, never more
// than limit (n <= 0: limit), skipping a hole left by trimming. The reader
// ends where the file ended when it was opened.
func openLogTail(path string, n, limit int64) (io.ReadCloser, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	if n <= 0 || n > limit {
		n = limit
	}
	size := fi.Size()
	off := dataStart(f, max(size-n, 0), size)
	return struct {
		io.Reader
		io.Closer
	}{io.NewSectionReader(f, off, size-off), f}, nil
}

// readLogTail returns the newest n bytes of the log at path.
func readLogTail(path string, n int64) ([]byte, error) {
	r, err := openLogTail(path, n, n)
	if err != nil {
		return nil, err
	}
	defer r.Close()
	return io.ReadAll(r)
}

// Logs returns a reader of up to tail bytes of the newest part of the VM's
// serial console log; tail 0 means all of it, which is never more than
// [limits] serial_log_size. The caller closes it. See Owner for name.
func (m *Manager) Logs(ctx context.Context, u *store.User, name string, tail int64) (io.ReadCloser, error) {
	u, name, err := m.Owner(ctx, u, name)
	if err != nil {
		return nil, err
	}
	v, err := m.store.GetVM(ctx, u.ID, name)
	if err != nil {
		return nil, err
	}
	r, err := openLogTail(filepath.Join(m.vmDir(v), "serial.log"), tail, m.cfg.SerialLogBytes())
	if errors.Is(err, os.ErrNotExist) {
		return io.NopCloser(eofReader{}), nil
	}
	return r, err
}

type eofReader struct{}

func (eofReader) Read([]byte) (int, error) { return 0, io.EOF }
