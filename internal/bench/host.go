package bench

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"time"
	"unsafe"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// HostInfo describes the machine a run measured.
type HostInfo struct {
	Time      time.Time  `json:"time"`
	CPU       string     `json:"cpu"`
	Cores     int        `json:"cores"`
	MemMiB    int        `json:"mem_mib"`
	Kernel    string     `json:"kernel"`
	QEMU      string     `json:"qemu"`
	QEMUPath  string     `json:"qemu_path,omitempty"`
	Accel     string     `json:"accel"`
	Go        string     `json:"go"`
	TmpFS     string     `json:"tmp_fs"`
	Load      [3]float64 `json:"loadavg"`
	OtherQEMU int        `json:"other_qemu_processes"`
}

func hostInfo(accel, qemuBin string) *HostInfo {
	h := &HostInfo{Time: time.Now(), Cores: runtime.NumCPU(), Accel: accel, Go: runtime.Version(), Load: loadAvg(), OtherQEMU: otherQEMU()}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(l, "model name") {
				if i := strings.IndexByte(l, ':'); i > 0 {
					h.CPU = strings.TrimSpace(l[i+1:])
				}
				break
			}
		}
	}
	h.MemMiB = meminfo("MemTotal") / 1024
	var u unix.Utsname
	if unix.Uname(&u) == nil {
		h.Kernel = unix.ByteSliceToString(u.Release[:])
	}
	if out, err := exec.Command(qemuBin, "--version").Output(); err == nil {
		h.QEMU = strings.TrimSpace(strings.SplitN(string(out), "\n", 2)[0])
	}
	if p, err := exec.LookPath(qemuBin); err == nil {
		h.QEMUPath = p
	}
	var st unix.Statfs_t
	if unix.Statfs(os.TempDir(), &st) == nil {
		h.TmpFS = fsName(st.Type)
	}
	return h
}

func fsName(t int64) string {
	switch t {
	case unix.EXT4_SUPER_MAGIC:
		return "ext4"
	case unix.XFS_SUPER_MAGIC:
		return "xfs"
	case unix.BTRFS_SUPER_MAGIC:
		return "btrfs"
	case unix.TMPFS_MAGIC:
		return "tmpfs"
	}
	return fmt.Sprintf("fs 0x%x", t)
}

func meminfo(key string) int {
	b, _ := os.ReadFile("/proc/meminfo")
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, key+":") {
			f := strings.Fields(l[len(key)+1:])
			if len(f) > 0 {
				n, _ := strconv.Atoi(f[0])
				return n
			}
		}
	}
	return 0
}

func loadAvg() [3]float64 {
	var l [3]float64
	b, _ := os.ReadFile("/proc/loadavg")
	f := strings.Fields(string(b))
	for i := 0; i < 3 && i < len(f); i++ {
		l[i], _ = strconv.ParseFloat(f[i], 64)
	}
	return l
}

// otherQEMU counts QEMU processes on the host that no benchmark server of
// this run started (other engineers' tests): they compete for the CPUs.
func otherQEMU() int {
	ents, _ := os.ReadDir("/proc")
	n := 0
	for _, e := range ents {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		if err != nil || !bytes.HasPrefix(b, []byte("qemu-system")) && !bytes.Contains(bytes.SplitN(b, []byte{0}, 2)[0], []byte("/qemu-system")) {
			continue
		}
		if bytes.Contains(b, []byte("/noid-bench-")) {
			continue
		}
		n++
	}
	return n
}

// Smaps is /proc/<pid>/smaps_rollup in KiB.
type Smaps struct {
	Rss, Pss, PssAnon, PssFile, PssShmem                 int
	SharedClean, SharedDirty, PrivateClean, PrivateDirty int
}

// Shared is shared clean + dirty.
func (s Smaps) Shared() int { return s.SharedClean + s.SharedDirty }

// Private is private clean + dirty.
func (s Smaps) Private() int { return s.PrivateClean + s.PrivateDirty }

func readSmaps(pid int) (Smaps, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		return Smaps{}, err
	}
	defer f.Close()
	var s Smaps
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) < 2 {
			continue
		}
		n, _ := strconv.Atoi(fs[1])
		switch fs[0] {
		case "Rss:":
			s.Rss = n
		case "Pss:":
			s.Pss = n
		case "Pss_Anon:":
			s.PssAnon = n
		case "Pss_File:":
			s.PssFile = n
		case "Pss_Shmem:":
			s.PssShmem = n
		case "Shared_Clean:":
			s.SharedClean = n
		case "Shared_Dirty:":
			s.SharedDirty = n
		case "Private_Clean:":
			s.PrivateClean = n
		case "Private_Dirty:":
			s.PrivateDirty = n
		}
	}
	return s, sc.Err()
}

// pageCacheResident returns how many bytes of path are in the page cache
// (mincore over a read-only mapping), which is host memory the file costs
// whether or not a process maps it.
func pageCacheResident(path string) (int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil || fi.Size() == 0 {
		return 0, err
	}
	const chunk = 256 << 20
	page := int64(os.Getpagesize())
	var total int64
	for off := int64(0); off < fi.Size(); off += chunk {
		n := fi.Size() - off
		if n > chunk {
			n = chunk
		}
		m, err := unix.Mmap(int(f.Fd()), off, int(n), unix.PROT_READ, unix.MAP_SHARED)
		if err != nil {
			return 0, err
		}
		vec := make([]byte, (n+page-1)/page)
		_, _, errno := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&m[0])), uintptr(len(m)), uintptr(unsafe.Pointer(&vec[0])))
		unix.Munmap(m)
		if errno != 0 {
			return 0, errno
		}
		for _, v := range vec {
			if v&1 != 0 {
				total += page
			}
		}
	}
	return total, nil
}

// allocated returns the bytes a file occupies on disk.
func allocated(path string) int64 {
	var st unix.Stat_t
	if unix.Stat(path, &st) != nil {
		return 0
	}
	return st.Blocks * 512
}

// fdCount counts a process's open fds by kind (socket, pipe, file, dev, or
// the anon inode's type: pidfd, eventfd, eventpoll, …).
func fdCount(pid int) (total int, kinds map[string]int) {
	kinds = map[string]int{}
	fds := fdTable(pid)
	if fds == nil {
		return -1, kinds
	}
	for _, l := range fds {
		kinds[fdKind(l)]++
	}
	return len(fds), kinds
}

// fdTable maps a process's open fds (by number) to what they point at, the
// link text of /proc/<pid>/fd/<n>; nil when the process is gone.
func fdTable(pid int) map[string]string {
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil
	}
	fds := make(map[string]string, len(ents))
	for _, e := range ents {
		if l, err := os.Readlink(dir + "/" + e.Name()); err == nil {
			fds[e.Name()] = l
		}
	}
	return fds
}

// fdKind names the kind of an fd from its link text.
func fdKind(l string) string {
	switch {
	case strings.HasPrefix(l, "socket:"):
		return "socket"
	case strings.HasPrefix(l, "pipe:"):
		return "pipe"
	case strings.HasPrefix(l, "anon_inode:"):
		return strings.Trim(strings.TrimPrefix(l, "anon_inode:"), "[]")
	case strings.HasPrefix(l, "/dev/"):
		return "dev"
	}
	return "file"
}

// newFDs lists the fds of after that were not open, to the same target,
// in before, each as "n → target", sockets described by socketInfo.
func newFDs(pid int, before, after map[string]string) []string {
	var socks, peers map[string]string
	var out []string
	for fd, l := range after {
		if before[fd] == l {
			continue
		}
		if strings.HasPrefix(l, "socket:[") {
			if socks == nil {
				socks = socketInfo(pid)
				peers = unixPeers(pid)
			}
			ino := strings.TrimSuffix(strings.TrimPrefix(l, "socket:["), "]")
			if d, ok := socks[ino]; ok {
				l += " " + d
			}
			if p, ok := peers[ino]; ok {
				l += " peer " + p
			}
		}
		out = append(out, fd+" → "+l)
	}
	sort.Strings(out)
	return out
}

// unixPeers names, for each unix socket in pid's network namespace that
// has or had a connected peer, who holds that peer: "qemu-system-x86[1234]",
// "noid-server[99]", "(nobody)" when no process holds it any more, or
// "(closed: …)" when the other end was closed (a connection the holder
// should have closed too). It
// reads sock_diag in that namespace and the fds of every process.
func unixPeers(pid int) map[string]string {
	ns, err := netns.GetFromPid(pid)
	if err != nil {
		return nil
	}
	defer ns.Close()
	// The handle needs the sock_diag family named, or its requests go out
	// in this process's namespace instead.
	h, err := netlink.NewHandleAt(ns, unix.NETLINK_INET_DIAG)
	if err != nil {
		return nil
	}
	defer h.Close()
	socks, err := h.UnixSocketDiagInfo()
	if err != nil {
		return nil
	}
	holders := map[string]string{} // socket inode → holder
	procs, _ := os.ReadDir("/proc")
	for _, p := range procs {
		if _, err := strconv.Atoi(p.Name()); err != nil {
			continue
		}
		comm, _ := os.ReadFile("/proc/" + p.Name() + "/comm")
		who := strings.TrimSpace(string(comm)) + "[" + p.Name() + "]"
		fds, _ := os.ReadDir("/proc/" + p.Name() + "/fd")
		for _, fd := range fds {
			l, err := os.Readlink("/proc/" + p.Name() + "/fd/" + fd.Name())
			if err == nil && strings.HasPrefix(l, "socket:[") {
				holders[strings.TrimSuffix(strings.TrimPrefix(l, "socket:["), "]")] = who
			}
		}
	}
	peers := map[string]string{}
	for _, s := range socks {
		if s.DiagMsg == nil || s.Peer == nil {
			continue
		}
		who, ok := holders[strconv.FormatUint(uint64(*s.Peer), 10)]
		switch {
		case *s.Peer == 0:
			who = "(closed: the other end is gone)"
		case !ok:
			who = "(nobody)"
		}
		peers[strconv.FormatUint(uint64(s.DiagMsg.INode), 10)] = who
	}
	return peers
}

// socketInfo describes the sockets of pid's network namespace by inode, from
// /proc/<pid>/net/{unix,tcp,tcp6,udp,udp6,netlink}: "unix /path",
// "tcp 0100007F:1F90", "netlink proto 0".
func socketInfo(pid int) map[string]string {
	info := map[string]string{}
	read := func(name string, inoCol int, desc func(f []string) string) {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/net/%s", pid, name))
		if err != nil {
			return
		}
		lines := strings.Split(string(b), "\n")
		for _, line := range lines[1:] {
			f := strings.Fields(line)
			if len(f) <= inoCol {
				continue
			}
			info[f[inoCol]] = desc(f)
		}
	}
	read("unix", 6, func(f []string) string {
		path := "(unnamed)"
		if len(f) > 7 {
			path = f[7]
		}
		return "unix " + path
	})
	for _, proto := range []string{"tcp", "tcp6", "udp", "udp6"} {
		p := proto
		read(p, 9, func(f []string) string { return p + " " + f[1] + " → " + f[2] })
	}
	read("netlink", 9, func(f []string) string { return "netlink proto " + f[1] })
	return info
}

// cpuSeconds returns a process's user+system CPU time.
func cpuSeconds(pid int) float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(string(b[i+2:]))
	if len(f) < 13 {
		return 0
	}
	u, _ := strconv.ParseFloat(f[11], 64)
	s, _ := strconv.ParseFloat(f[12], 64)
	return (u + s) / 100 // USER_HZ
}

// threads returns a process's thread count.
func threads(pid int) int {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "Threads:") {
			n, _ := strconv.Atoi(strings.TrimSpace(l[8:]))
			return n
		}
	}
	return -1
}

func mib(kib int) float64 { return float64(kib) / 1024 }

// privateByMapping splits a process's private memory (KiB) into the
// mappings of files whose path ends in suffix (the guest RAM file) and
// everything else (the VMM's own: heap, TCG translation cache, libraries).
func privateByMapping(pid int, suffix string) (inFile, rest int, err error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/smaps", pid))
	if err != nil {
		return 0, 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	match := false
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) == 0 {
			continue
		}
		if !strings.HasSuffix(fs[0], ":") { // a mapping's header line
			match = len(fs) >= 6 && strings.HasSuffix(fs[len(fs)-1], suffix)
			continue
		}
		if (fs[0] == "Private_Clean:" || fs[0] == "Private_Dirty:") && len(fs) >= 2 {
			n, _ := strconv.Atoi(fs[1])
			if match {
				inFile += n
			} else {
				rest += n
			}
		}
	}
	return inFile, rest, sc.Err()
}
