package guest

import (
	"bufio"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// ModulesFile lists the kernel modules init loads, in order, one per line:
// a path relative to /lib/modules/<release>/ or absolute, optionally
// followed by module parameters. Blank lines and # comments are ignored.
const ModulesFile = "/etc/noid/modules"

// InitResult reports what SetupPID1 did.
type InitResult struct {
	// RootSwitched says the root disk was mounted and made the root.
	RootSwitched bool
	// Root is the root device that was (or was to be) mounted.
	Root string
	// Modules is the number of modules loaded (or already present).
	Modules int
	// Took is the time SetupPID1 spent.
	Took time.Duration
	// Cmdline is the kernel command line, read once /proc is mounted.
	Cmdline Cmdline
}

// SetupPID1 performs init's early duties: mount /proc, /sys, /dev,
// /dev/pts, /run and /tmp; load the modules of ModulesFile; wait (bounded,
// by polling) for the root device (cmdline root=, default /dev/vda; wait
// noid.root_wait= milliseconds, default 5000), mount it (rootfstype=,
// default ext4; rootflags=; ro) and switch root to it, deleting the
// initramfs contents; bring up lo; set the hostname from noid.hostname=.
// Without a root disk it keeps running from the initramfs. Errors of single
// steps are logged; only a failed switch after the root was mounted is
// returned (the system is then in an unknown state). If level is not nil,
// noid.log= on the command line (debug, info, warn, error) sets it.
func SetupPID1(log *slog.Logger, level *slog.LevelVar) (InitResult, error) {
	start := time.Now()
	var res InitResult
	step := func(name string, t time.Time) {
		log.Debug("init step", "step", name, "took", time.Since(t).Round(time.Microsecond))
	}

	t := time.Now()
	mountEarly(log)
	ensureConsole()
	cmd := ReadCmdline()
	res.Cmdline = cmd
	if v := cmd.Get("noid.log", ""); v != "" && level != nil {
		_ = level.UnmarshalText([]byte(v))
	}
	step("mounts", t)

	t = time.Now()
	res.Modules = loadModules(log)
	step("modules", t)

	res.Root = cmd.Get("root", "/dev/vda")
	wait := 5 * time.Second
	if v := cmd.Get("noid.root_wait", ""); v != "" {
		var ms int
		if _, err := fmt.Sscan(v, &ms); err == nil && ms >= 0 {
			wait = time.Duration(ms) * time.Millisecond
		}
	}
	t = time.Now()
	found := waitBlockDevice(res.Root, wait)
	step("root wait", t)
	if found {
		t = time.Now()
		if err := switchRoot(log, res.Root, cmd); err != nil {
			if errors.Is(err, errNotMounted) {
				log.Error("cannot mount the root disk; running from the initramfs", "root", res.Root, "err", err)
			} else {
				return res, err
			}
		} else {
			res.RootSwitched = true
		}
		step("switch root", t)
	} else {
		log.Warn("root disk absent; running from the initramfs", "root", res.Root, "waited", wait)
	}

	mountLate(log)
	if res.RootSwitched {
		BindEtcFiles(log, "/etc", "/run/noid/etc")
	}
	if lo, err := netlink.LinkByName("lo"); err == nil {
		if err := netlink.LinkSetUp(lo); err != nil {
			log.Warn("cannot bring up lo", "err", err)
		}
	} else {
		log.Warn("no lo interface", "err", err)
	}
	if h := cmd.Get("noid.hostname", ""); h != "" {
		if err := unix.Sethostname([]byte(h)); err != nil {
			log.Warn("cannot set hostname", "err", err)
		}
	}
	res.Took = time.Since(start)
	log.Info("init done", "root_switched", res.RootSwitched, "root", res.Root, "modules", res.Modules,
		"took", res.Took.Round(time.Millisecond))
	return res, nil
}

// etcInMemory are the files of /etc that the agent's sync writes (see
// BindEtcFiles).
var etcInMemory = []string{"hostname", "hosts", "resolv.conf"}

// BindEtcFiles keeps the files of etcInMemory in memory: each one that is a
// regular file in etc is copied to the tmpfs directory mem and bind-mounted
// over itself, as container runtimes do with /etc/hosts. The sync after a
// clone then neither writes nor reads a file on the guest's disk; on a
// fresh QEMU that first disk access is slow (ext4 and its journal run on a
// cold translation cache under TCG). The copies live in the VM's memory, so checkpoints,
// rewinds and clones keep edits to them; a cold boot starts again from the
// disk's files. A file already mounted over, a symlink or a missing file
// is left alone.
func BindEtcFiles(log *slog.Logger, etc, mem string) {
	if err := os.MkdirAll(mem, 0o755); err != nil {
		log.Warn("cannot keep /etc files in memory", "dir", mem, "err", err)
		return
	}
	for _, name := range etcInMemory {
		disk := filepath.Join(etc, name)
		fi, err := os.Lstat(disk)
		if err != nil || !fi.Mode().IsRegular() || mountedFile(disk) {
			continue
		}
		b, err := os.ReadFile(disk)
		if err != nil {
			log.Warn("cannot keep an /etc file in memory", "path", disk, "err", err)
			continue
		}
		copyPath := filepath.Join(mem, name)
		if err := os.WriteFile(copyPath, b, fi.Mode().Perm()); err != nil {
			log.Warn("cannot keep an /etc file in memory", "path", disk, "err", err)
			continue
		}
		if err := unix.Mount(copyPath, disk, "", unix.MS_BIND, ""); err != nil {
			log.Warn("cannot keep an /etc file in memory", "path", disk, "err", err)
		}
	}
}

type mnt struct {
	src, dst, fstype string
	flags            uintptr
	data             string
}

func mountAll(log *slog.Logger, ms []mnt) {
	for _, m := range ms {
		if err := os.MkdirAll(m.dst, 0o755); err != nil {
			log.Warn("cannot create mount point", "path", m.dst, "err", err)
			continue
		}
		if err := unix.Mount(m.src, m.dst, m.fstype, m.flags, m.data); err != nil && !errors.Is(err, unix.EBUSY) {
			log.Warn("mount failed", "path", m.dst, "type", m.fstype, "err", err)
		}
	}
}

func mountEarly(log *slog.Logger) {
	const nosuid, nodev, noexec = unix.MS_NOSUID, unix.MS_NODEV, unix.MS_NOEXEC
	mountAll(log, []mnt{
		{"proc", "/proc", "proc", nosuid | nodev | noexec, ""},
		{"sysfs", "/sys", "sysfs", nosuid | nodev | noexec, ""},
		{"devtmpfs", "/dev", "devtmpfs", nosuid, "mode=0755"},
		{"devpts", "/dev/pts", "devpts", nosuid | noexec, "mode=0620,ptmxmode=0666,gid=5"},
		{"tmpfs", "/run", "tmpfs", nosuid | nodev, "mode=0755"},
		{"tmpfs", "/tmp", "tmpfs", nosuid | nodev, "mode=1777"},
	})
}

// mountLate mounts what lives below the moved mounts, on the final root.
func mountLate(log *slog.Logger) {
	mountAll(log, []mnt{
		{"tmpfs", "/dev/shm", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=1777"},
		{"cgroup2", "/sys/fs/cgroup", "cgroup2", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, ""},
	})
	for link, target := range map[string]string{
		"/dev/fd": "/proc/self/fd", "/dev/stdin": "/proc/self/fd/0",
		"/dev/stdout": "/proc/self/fd/1", "/dev/stderr": "/proc/self/fd/2",
	} {
		_ = os.Symlink(target, link)
	}
}

// ensureConsole opens /dev/console on fds 0-2 if the kernel could not
// (an initramfs without /dev/console).
func ensureConsole() {
	for fd := 0; fd < 3; fd++ {
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err == nil {
			continue
		}
		cfd, err := unix.Open("/dev/console", unix.O_RDWR|unix.O_NOCTTY, 0)
		if err != nil {
			return
		}
		if cfd != fd {
			_ = unix.Dup3(cfd, fd, 0)
			_ = unix.Close(cfd)
		}
	}
}

// loadModules loads the modules listed in ModulesFile in order.
func loadModules(log *slog.Logger) int {
	f, err := os.Open(ModulesFile)
	if err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			log.Warn("cannot read module list", "err", err)
		}
		return 0
	}
	defer f.Close()
	var u unix.Utsname
	_ = unix.Uname(&u)
	base := filepath.Join("/lib/modules", unix.ByteSliceToString(u.Release[:]))
	n := 0
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		path, params, _ := strings.Cut(line, " ")
		if !filepath.IsAbs(path) {
			path = filepath.Join(base, path)
		}
		t := time.Now()
		if err := loadModule(path, strings.TrimSpace(params)); err != nil {
			log.Warn("cannot load module", "module", path, "err", err)
			continue
		}
		n++
		log.Debug("module loaded", "module", filepath.Base(path), "took", time.Since(t).Round(time.Microsecond))
	}
	return n
}

func loadModule(path, params string) error {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	flags := 0
	for _, ext := range []string{".xz", ".zst", ".gz"} {
		if strings.HasSuffix(path, ext) {
			flags |= unix.MODULE_INIT_COMPRESSED_FILE
		}
	}
	err = unix.FinitModule(fd, params, flags)
	if errors.Is(err, unix.EEXIST) {
		return nil
	}
	return err
}

// waitBlockDevice polls until dev is a block device, up to wait.
func waitBlockDevice(dev string, wait time.Duration) bool {
	deadline := time.Now().Add(wait)
	delay := 500 * time.Microsecond
	for {
		var st unix.Stat_t
		if unix.Stat(dev, &st) == nil && st.Mode&unix.S_IFMT == unix.S_IFBLK {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(delay)
		delay = min(2*delay, 20*time.Millisecond)
	}
}

var errNotMounted = errors.New("root not mounted")

const newRoot = "/newroot"

// switchRoot mounts dev on /newroot, moves the API file systems into it,
// empties the initramfs and makes /newroot the root (switch_root).
func switchRoot(log *slog.Logger, dev string, cmd Cmdline) error {
	if err := os.MkdirAll(newRoot, 0o755); err != nil {
		return fmt.Errorf("%w: %w", errNotMounted, err)
	}
	var flags uintptr
	if cmd.Has("ro") {
		flags |= unix.MS_RDONLY
	}
	fstype := cmd.Get("rootfstype", "ext4")
	if err := unix.Mount(dev, newRoot, fstype, flags, cmd.Get("rootflags", "")); err != nil {
		return fmt.Errorf("%w: mounting %s (%s) on %s: %w", errNotMounted, dev, fstype, newRoot, err)
	}
	for _, m := range []string{"/dev", "/proc", "/sys", "/run", "/tmp"} {
		dst := newRoot + m
		if err := os.MkdirAll(dst, 0o755); err != nil {
			log.Warn("cannot create mount point on the root disk", "path", dst, "err", err)
		}
		if err := unix.Mount(m, dst, "", unix.MS_MOVE, ""); err != nil {
			log.Warn("cannot move mount", "path", m, "err", err)
		}
	}
	var rootSt unix.Stat_t
	if err := unix.Lstat("/", &rootSt); err == nil {
		entries, _ := os.ReadDir("/")
		for _, e := range entries {
			if "/"+e.Name() == newRoot {
				continue
			}
			removeSameDev("/"+e.Name(), rootSt.Dev)
		}
	}
	if err := unix.Chdir(newRoot); err != nil {
		return fmt.Errorf("switching root: chdir: %w", err)
	}
	if err := unix.Mount(".", "/", "", unix.MS_MOVE, ""); err != nil {
		return fmt.Errorf("switching root: moving %s to /: %w", newRoot, err)
	}
	if err := unix.Chroot("."); err != nil {
		return fmt.Errorf("switching root: chroot: %w", err)
	}
	if err := unix.Chdir("/"); err != nil {
		return fmt.Errorf("switching root: chdir /: %w", err)
	}
	return nil
}

// removeSameDev deletes path recursively without crossing into other file
// systems (the initramfs is deleted, mounts below it are left alone).
func removeSameDev(path string, dev uint64) {
	var st unix.Stat_t
	if unix.Lstat(path, &st) != nil || st.Dev != dev {
		return
	}
	if st.Mode&unix.S_IFMT == unix.S_IFDIR {
		entries, _ := os.ReadDir(path)
		for _, e := range entries {
			removeSameDev(filepath.Join(path, e.Name()), dev)
		}
		_ = unix.Rmdir(path)
		return
	}
	_ = unix.Unlink(path)
}

// Shutdown ends the system as init: it signals every process with SIGTERM,
// waits up to two seconds for them to exit, kills the rest, syncs and
// remounts the root read-only, then halts, powers off or reboots according
// to how (unix.LINUX_REBOOT_CMD_*). It returns only on failure.
func Shutdown(log *slog.Logger, how int) error {
	log.Info("shutting down")
	_ = unix.Kill(-1, syscall.SIGTERM)
	deadline := time.Now().Add(2 * time.Second)
	for time.Now().Before(deadline) && otherProcesses() {
		time.Sleep(20 * time.Millisecond)
	}
	_ = unix.Kill(-1, syscall.SIGKILL)
	unix.Sync()
	_ = unix.Mount("", "/", "", unix.MS_REMOUNT|unix.MS_RDONLY, "")
	unix.Sync()
	return unix.Reboot(how)
}

// otherProcesses reports whether user processes other than this one exist.
func otherProcesses() bool {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return false
	}
	self := fmt.Sprint(os.Getpid())
	for _, e := range entries {
		name := e.Name()
		if name == self || name[0] < '0' || name[0] > '9' {
			continue
		}
		b, err := os.ReadFile("/proc/" + name + "/cmdline")
		if err == nil && len(b) > 0 {
			return true
		}
	}
	return false
}
