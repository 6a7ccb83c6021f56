package storage

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/noid-vm/noid/internal/errdefs"
)

// MinReflinkImageSize is the smallest image SetupReflinkLoop accepts:
// mkfs.xfs (xfsprogs ≥ 5.19) refuses filesystems of 300 MiB or less.
const MinReflinkImageSize = 320 << 20

// loopMu serialises loop setup and teardown inside this process; a flock on
// the image serialises them between processes.
var loopMu sync.Mutex

// SetupReflinkLoop makes mountPoint a reflink-capable XFS filesystem backed
// by the image file imagePath, with no /etc/fstab entry:
//
//  1. If imagePath does not exist, it is created as a sparse file of size
//     bytes and formatted with `mkfs.xfs -m reflink=1` (package xfsprogs). An
//     existing image is reused as is (its data is kept and size is ignored),
//     after checking that it holds an XFS filesystem.
//  2. The image is attached to a free loop device (LOOP_CTL_GET_FREE, then
//     LOOP_CONFIGURE, or LOOP_SET_FD on kernels older than 5.8) with
//     LO_FLAGS_AUTOCLEAR, so the device detaches itself when unmounted, and
//     with direct I/O where the host filesystem allows it, so the image's
//     pages are not cached twice (once for the loop device, once for the
//     image file).
//  3. The device is mounted on mountPoint (created if missing; it must be
//     empty) with the discard option, so deleting files inside punches holes
//     in the image and gives the space back to the host.
//
// It is idempotent: if mountPoint already holds a loop mount of imagePath it
// returns nil. It needs root (CAP_SYS_ADMIN). The mount lasts until
// TeardownReflinkLoop or a reboot; call SetupReflinkLoop at every start-up.
func SetupReflinkLoop(ctx context.Context, imagePath, mountPoint string, size int64) error {
	loopMu.Lock()
	defer loopMu.Unlock()
	image, err := filepath.Abs(imagePath)
	if err != nil {
		return fmt.Errorf("setting up reflink storage: %w", err)
	}
	mnt, err := filepath.Abs(mountPoint)
	if err != nil {
		return fmt.Errorf("setting up reflink storage: %w", err)
	}
	wrap := func(err error) error {
		return fmt.Errorf("setting up reflink storage %s on %s: %w", image, mnt, err)
	}
	if err := os.MkdirAll(filepath.Dir(image), 0o700); err != nil {
		return wrap(err)
	}

	// Create and format the image unless it exists.
	if _, err := os.Stat(image); errors.Is(err, os.ErrNotExist) {
		if err := createXFSImage(ctx, image, size); err != nil {
			return wrap(err)
		}
	} else if err != nil {
		return wrap(err)
	}

	lock, err := os.Open(image)
	if err != nil {
		return wrap(err)
	}
	defer lock.Close()
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX); err != nil {
		return wrap(fmt.Errorf("locking image: %w", err))
	}
	if err := checkXFSMagic(lock); err != nil {
		return wrap(err)
	}

	if err := os.MkdirAll(mnt, 0o755); err != nil {
		return wrap(err)
	}
	if real, err := filepath.EvalSymlinks(mnt); err == nil {
		mnt = real
	}
	m, mounted, err := findMount(mnt)
	if err != nil {
		return wrap(err)
	}
	if mounted {
		same, err := loopBackedBy(m.source, lock)
		if err != nil {
			return wrap(err)
		}
		if !same {
			return wrap(fmt.Errorf("%s is already a mount of %s (%s), not of this image: %w",
				mnt, m.source, m.fstype, errdefs.ErrConflict))
		}
		return nil
	}
	if err := checkEmptyDir(mnt); err != nil {
		return wrap(err)
	}

	dev, devFile, err := attachLoop(ctx, image, true)
	if err != nil {
		return wrap(err)
	}
	// Until the mount holds the device, our open file is what keeps it
	// attached: closing it (on any error below) auto-detaches it.
	defer devFile.Close()
	if err := unix.Mount(dev, mnt, "xfs", 0, "discard"); err != nil {
		return wrap(fmt.Errorf("mounting %s: %w", dev, err))
	}
	mode, err := Probe(mnt)
	if err == nil && mode != ModeReflink {
		err = fmt.Errorf("the XFS filesystem in the image has no reflink support (it was not made with mkfs.xfs -m reflink=1)")
	}
	if err != nil {
		if uerr := unix.Unmount(mnt, 0); uerr != nil {
			err = errors.Join(err, fmt.Errorf("unmounting after failure: %w", uerr))
		}
		return wrap(err)
	}
	return nil
}

// TeardownReflinkLoop unmounts a mount made by SetupReflinkLoop and makes
// sure its loop device is detached. The image file is kept, with its data.
// It returns nil if mountPoint is not mounted. It fails, leaving everything
// in place, while files on the mount are still in use.
func TeardownReflinkLoop(ctx context.Context, mountPoint string) error {
	loopMu.Lock()
	defer loopMu.Unlock()
	mnt, err := filepath.Abs(mountPoint)
	if err != nil {
		return fmt.Errorf("tearing down reflink storage: %w", err)
	}
	if real, err := filepath.EvalSymlinks(mnt); err == nil {
		mnt = real
	}
	wrap := func(err error) error {
		return fmt.Errorf("tearing down reflink storage on %s: %w", mnt, err)
	}
	m, mounted, err := findMount(mnt)
	if err != nil {
		return wrap(err)
	}
	if !mounted {
		return nil
	}
	if !isLoopDevice(m.source) {
		return wrap(fmt.Errorf("%s is a mount of %s, not of a loop device: %w", mnt, m.source, errdefs.ErrConflict))
	}
	if err := unix.Unmount(mnt, 0); err != nil {
		if errors.Is(err, unix.EBUSY) {
			return wrap(fmt.Errorf("files on it are still in use: %w", err))
		}
		return wrap(fmt.Errorf("unmounting: %w", err))
	}
	if err := waitDetached(ctx, m.source); err != nil {
		return wrap(err)
	}
	return nil
}

// createXFSImage creates a sparse image of size bytes and formats it.
func createXFSImage(ctx context.Context, image string, size int64) error {
	if size < MinReflinkImageSize {
		return fmt.Errorf("image size %d is too small: XFS needs at least %d bytes (320 MiB): %w",
			size, MinReflinkImageSize, errdefs.ErrInvalidArgument)
	}
	mkfs, err := exec.LookPath("mkfs.xfs")
	if err != nil {
		return fmt.Errorf("mkfs.xfs not found (install the xfsprogs package: apt-get install xfsprogs): %w",
			errdefs.ErrUnavailable)
	}
	f, err := os.OpenFile(image, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("creating image: %w", err)
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		os.Remove(image)
		return fmt.Errorf("sizing image: %w", classify(image, err))
	}
	if err := f.Close(); err != nil {
		os.Remove(image)
		return fmt.Errorf("creating image: %w", err)
	}
	out, err := exec.CommandContext(ctx, mkfs, "-q", "-m", "reflink=1", image).CombinedOutput()
	if err != nil {
		os.Remove(image)
		return fmt.Errorf("mkfs.xfs -m reflink=1 %s: %w: %s", image, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// checkXFSMagic refuses an image that does not start with an XFS superblock,
// so that an unrelated file is never mounted or overwritten by mistake.
func checkXFSMagic(f *os.File) error {
	magic := make([]byte, 4)
	if _, err := f.ReadAt(magic, 0); err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("reading image: %w", err)
	}
	if !bytes.Equal(magic, []byte("XFSB")) {
		return fmt.Errorf("%s exists but does not hold an XFS filesystem; refusing to use it: %w",
			f.Name(), errdefs.ErrConflict)
	}
	return nil
}

// checkEmptyDir refuses to mount over a directory that has entries, which
// the mount would hide.
func checkEmptyDir(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	names, err := f.Readdirnames(1)
	if err != nil && !errors.Is(err, io.EOF) {
		return err
	}
	if len(names) > 0 {
		return fmt.Errorf("mount point %s is not empty (it holds %q); move its contents away first: %w",
			dir, names[0], errdefs.ErrConflict)
	}
	return nil
}

// attachLoop attaches image to a free loop device with autoclear and returns
// the device path and an open handle on it.
func attachLoop(ctx context.Context, image string, directIO bool) (string, *os.File, error) {
	ctl, err := os.OpenFile("/dev/loop-control", os.O_RDWR, 0)
	if err != nil {
		return "", nil, fmt.Errorf("opening /dev/loop-control (loop module loaded? running as root?): %w", err)
	}
	defer ctl.Close()
	for attempt := 0; attempt < 32; attempt++ {
		if err := ctx.Err(); err != nil {
			return "", nil, err
		}
		n, err := unix.IoctlRetInt(int(ctl.Fd()), unix.LOOP_CTL_GET_FREE)
		if err != nil {
			return "", nil, fmt.Errorf("LOOP_CTL_GET_FREE: %w", err)
		}
		dev := fmt.Sprintf("/dev/loop%d", n)
		devFile, err := openLoopDevice(dev, n)
		if err != nil {
			return "", nil, err
		}
		err = configureLoop(devFile, image, directIO)
		if errors.Is(err, unix.EBUSY) {
			devFile.Close() // another process took this device first
			continue
		}
		if err != nil {
			devFile.Close()
			return "", nil, fmt.Errorf("attaching %s to %s: %w", image, dev, err)
		}
		return dev, devFile, nil
	}
	return "", nil, fmt.Errorf("attaching %s: every free loop device was taken by someone else: %w", image, unix.EBUSY)
}

// openLoopDevice opens /dev/loopN, creating the node if there is no devtmpfs
// or udev to do it.
func openLoopDevice(dev string, n int) (*os.File, error) {
	f, err := os.OpenFile(dev, os.O_RDWR, 0)
	if err == nil || !errors.Is(err, os.ErrNotExist) {
		if err != nil {
			return nil, fmt.Errorf("opening %s: %w", dev, err)
		}
		return f, nil
	}
	raw, rerr := os.ReadFile(fmt.Sprintf("/sys/block/loop%d/dev", n))
	if rerr != nil {
		return nil, fmt.Errorf("opening %s: %w", dev, err)
	}
	var major, minor uint32
	if _, serr := fmt.Sscanf(strings.TrimSpace(string(raw)), "%d:%d", &major, &minor); serr != nil {
		return nil, fmt.Errorf("parsing /sys/block/loop%d/dev: %w", n, serr)
	}
	if merr := unix.Mknod(dev, unix.S_IFBLK|0o660, int(unix.Mkdev(major, minor))); merr != nil && !errors.Is(merr, unix.EEXIST) {
		return nil, fmt.Errorf("creating %s: %w", dev, merr)
	}
	f, err = os.OpenFile(dev, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("opening %s: %w", dev, err)
	}
	return f, nil
}

// configureLoop binds image to the loop device devFile. It tries
// LOOP_CONFIGURE with direct I/O, then without, then the pre-5.8
// LOOP_SET_FD + LOOP_SET_STATUS64 pair.
func configureLoop(devFile *os.File, image string, directIO bool) error {
	backing, err := os.OpenFile(image, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer backing.Close() // the loop device holds its own reference
	fd := int(devFile.Fd())

	var info unix.LoopInfo64
	copy(info.File_name[:len(info.File_name)-1], image)
	info.Flags = unix.LO_FLAGS_AUTOCLEAR

	cfg := unix.LoopConfig{Fd: uint32(backing.Fd()), Info: info}
	if directIO {
		cfg.Info.Flags |= unix.LO_FLAGS_DIRECT_IO
		err = unix.IoctlLoopConfigure(fd, &cfg)
		if err == nil || !errors.Is(err, unix.EINVAL) {
			return err
		}
		cfg.Info.Flags &^= unix.LO_FLAGS_DIRECT_IO
	}
	err = unix.IoctlLoopConfigure(fd, &cfg)
	if err == nil || !(errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOTTY)) {
		return err
	}
	// Kernels before 5.8 have no LOOP_CONFIGURE.
	if err := unix.IoctlSetInt(fd, unix.LOOP_SET_FD, int(backing.Fd())); err != nil {
		return fmt.Errorf("LOOP_SET_FD: %w", err)
	}
	if err := unix.IoctlLoopSetStatus64(fd, &info); err != nil {
		unix.IoctlSetInt(fd, unix.LOOP_CLR_FD, 0)
		return fmt.Errorf("LOOP_SET_STATUS64: %w", err)
	}
	if directIO {
		_ = unix.IoctlSetInt(fd, unix.LOOP_SET_DIRECT_IO, 1) // best effort
	}
	return nil
}

// isLoopDevice reports whether dev names a loop block device.
func isLoopDevice(dev string) bool {
	return strings.HasPrefix(dev, "/dev/loop") && len(dev) > len("/dev/loop")
}

// loopBackedBy reports whether the loop device dev is bound to the same file
// as image (compared by device and inode number).
func loopBackedBy(dev string, image *os.File) (bool, error) {
	if !isLoopDevice(dev) {
		return false, nil
	}
	f, err := os.Open(dev)
	if err != nil {
		return false, fmt.Errorf("opening %s: %w", dev, err)
	}
	defer f.Close()
	info, err := unix.IoctlLoopGetStatus64(int(f.Fd()))
	if err != nil {
		if errors.Is(err, unix.ENXIO) {
			return false, nil
		}
		return false, fmt.Errorf("LOOP_GET_STATUS64 on %s: %w", dev, err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(image.Fd()), &st); err != nil {
		return false, err
	}
	return info.Inode == st.Ino && info.Device == st.Dev, nil
}

// waitDetached waits until the loop device dev has no backing file (the
// autoclear after unmount), and detaches it explicitly if that does not
// happen within a second (a device attached without autoclear).
func waitDetached(ctx context.Context, dev string) error {
	deadline := time.Now().Add(time.Second)
	for {
		bound, err := loopBound(dev)
		if err != nil || !bound {
			return err
		}
		if time.Now().After(deadline) {
			break
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
	}
	f, err := os.Open(dev)
	if err != nil {
		return fmt.Errorf("opening %s: %w", dev, err)
	}
	defer f.Close()
	if err := unix.IoctlSetInt(int(f.Fd()), unix.LOOP_CLR_FD, 0); err != nil && !errors.Is(err, unix.ENXIO) {
		return fmt.Errorf("detaching %s: %w", dev, err)
	}
	return nil
}

// loopBound reports whether the loop device dev has a backing file. It reads
// sysfs so that it does not itself hold the device open.
func loopBound(dev string) (bool, error) {
	name := filepath.Base(dev)
	_, err := os.Stat(filepath.Join("/sys/block", name, "loop", "backing_file"))
	if err == nil {
		return true, nil
	}
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	return false, err
}

// mountEntry is one line of /proc/self/mountinfo.
type mountEntry struct {
	mountPoint string
	fstype     string
	source     string
}

// findMount returns the topmost mount whose mount point is exactly mnt.
func findMount(mnt string) (mountEntry, bool, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return mountEntry{}, false, fmt.Errorf("reading mount table: %w", err)
	}
	defer f.Close()
	var found mountEntry
	ok := false
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		e, perr := parseMountInfo(sc.Text())
		if perr != nil {
			continue
		}
		if e.mountPoint == mnt {
			found, ok = e, true // later lines are mounted on top
		}
	}
	if err := sc.Err(); err != nil {
		return mountEntry{}, false, fmt.Errorf("reading mount table: %w", err)
	}
	return found, ok, nil
}

// parseMountInfo parses one mountinfo line (proc(5)):
// id parent major:minor root mountpoint options [optional...] - fstype source superoptions
func parseMountInfo(line string) (mountEntry, error) {
	fields := strings.Fields(line)
	sep := -1
	for i, f := range fields {
		if f == "-" && i >= 6 {
			sep = i
			break
		}
	}
	if sep < 0 || len(fields) < sep+3 {
		return mountEntry{}, fmt.Errorf("malformed mountinfo line %q", line)
	}
	return mountEntry{
		mountPoint: unescapeMountInfo(fields[4]),
		fstype:     fields[sep+1],
		source:     unescapeMountInfo(fields[sep+2]),
	}, nil
}

// unescapeMountInfo decodes the \ooo octal escapes mountinfo uses for space,
// tab, newline and backslash.
func unescapeMountInfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
