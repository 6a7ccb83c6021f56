package sandbox

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
)

// Version is a cgroup hierarchy's version.
type Version int

// The cgroup versions.
const (
	V1 Version = 1
	V2 Version = 2
)

// String returns "v1" or "v2".
func (v Version) String() string { return "v" + strconv.Itoa(int(v)) }

// The controllers noid puts limits on.
const (
	Memory = "memory"
	Pids   = "pids"
)

// limited lists the controllers every VMM cgroup needs.
var limited = []string{Memory, Pids}

// Hierarchy is one mounted cgroup hierarchy.
type Hierarchy struct {
	// Version is V1 for a "cgroup" mount, V2 for "cgroup2".
	Version Version
	// Mount is the mount point, e.g. /sys/fs/cgroup/memory.
	Mount string
	// Root is the cgroup mounted there (mountinfo's root field, "/" unless
	// the mount is a bind of a sub-cgroup).
	Root string
	// Controllers are the v1 controllers of the hierarchy, including a
	// "name=…" pseudo controller, or the controllers a v2 root offers in
	// its cgroup.controllers.
	Controllers []string
	// Tracking marks a hierarchy joined without limits (name=systemd, or a
	// hybrid host's unified hierarchy).
	Tracking bool
}

// Has reports whether h carries controller c.
func (h Hierarchy) Has(c string) bool {
	for _, x := range h.Controllers {
		if x == c {
			return true
		}
	}
	return false
}

// Layout is the host's cgroup setup as noid uses it: the hierarchies a VMM
// joins, the ones carrying the limited controllers first.
type Layout struct {
	// Hierarchies are the hierarchies each VMM cgroup is created in.
	Hierarchies []Hierarchy
}

// Version is the version of the hierarchy that carries the memory
// controller (the one the limits live in), V1 or V2.
func (l *Layout) Version() Version {
	if h := l.For(Memory); h != nil {
		return h.Version
	}
	return 0
}

// For returns the hierarchy that carries controller c for limits, or nil.
func (l *Layout) For(c string) *Hierarchy {
	for i := range l.Hierarchies {
		h := &l.Hierarchies[i]
		if !h.Tracking && h.Has(c) && (h.Version == V2 || len(h.Controllers) > 0) {
			return h
		}
	}
	return nil
}

// String describes the layout for logs, e.g.
// "v1 (memory: /sys/fs/cgroup/memory, pids: /sys/fs/cgroup/pids, tracking: /sys/fs/cgroup/systemd)".
func (l *Layout) String() string {
	var parts []string
	for _, c := range limited {
		if h := l.For(c); h != nil {
			parts = append(parts, c+": "+h.Mount)
		}
	}
	for _, h := range l.Hierarchies {
		if h.Tracking {
			parts = append(parts, "tracking: "+h.Mount)
		}
	}
	return l.Version().String() + " (" + strings.Join(parts, ", ") + ")"
}

// Mount is one line of /proc/self/mountinfo, reduced to what Detect needs.
type Mount struct {
	// Root is the path inside the filesystem that is mounted.
	Root string
	// Point is the mount point.
	Point string
	// FSType is the filesystem type ("cgroup", "cgroup2", …).
	FSType string
	// SuperOpts are the per-superblock options (for a v1 cgroup mount,
	// its controllers among them).
	SuperOpts []string
}

// ParseMountinfo parses the text of /proc/<pid>/mountinfo. Malformed lines
// are skipped; octal escapes (\040 for a space) are decoded.
func ParseMountinfo(data []byte) []Mount {
	var out []Mount
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 0, 4096), 1<<20)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		// id parent maj:min root point opts [optional...] - fstype source superopts
		sep := -1
		for i := 6; i < len(f); i++ {
			if f[i] == "-" {
				sep = i
				break
			}
		}
		if sep < 0 || sep+2 >= len(f) {
			continue
		}
		m := Mount{Root: unescapeOctal(f[3]), Point: unescapeOctal(f[4]), FSType: f[sep+1]}
		if sep+3 < len(f) {
			m.SuperOpts = strings.Split(f[sep+3], ",")
		}
		out = append(out, m)
	}
	return out
}

// unescapeOctal decodes the \NNN escapes the kernel uses in mountinfo.
func unescapeOctal(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && isOctal(s, i+1) {
			n, _ := strconv.ParseUint(s[i+1:i+4], 8, 8)
			b.WriteByte(byte(n))
			i += 3
			continue
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func isOctal(s string, i int) bool {
	if i+3 > len(s) {
		return false
	}
	for _, c := range s[i : i+3] {
		if c < '0' || c > '7' {
			return false
		}
	}
	// \400 and above do not fit a byte.
	return s[i] <= '3'
}

// nonControllerOpts are v1 cgroup super options that are not controllers.
var nonControllerOpts = map[string]bool{
	"rw": true, "ro": true, "xattr": true, "noprefix": true, "clone_children": true, "cpuset_v2_mode": true,
	"none": true, "all": true, "favordynmods": true, "nofavordynmods": true, "nsdelegate": true,
	"memory_localevents": true, "memory_recursiveprot": true, "memory_hugetlb_accounting": true,
}

// v1Controllers returns the controllers (and name=… pseudo controller)
// among a v1 mount's super options, sorted.
func v1Controllers(opts []string) []string {
	var out []string
	for _, o := range opts {
		switch {
		case o == "" || nonControllerOpts[o]:
		case strings.HasPrefix(o, "name="):
			out = append(out, o)
		case strings.Contains(o, "="):
			// release_agent=…, and future key=value options.
		default:
			out = append(out, o)
		}
	}
	sort.Strings(out)
	return out
}

// DetectOptions adjust Detect.
type DetectOptions struct {
	// Mountinfo is the text of /proc/self/mountinfo; nil reads it.
	Mountinfo []byte
	// NoTracking skips the tracking-only hierarchies (name=systemd, a
	// hybrid host's unified hierarchy).
	NoTracking bool
	// Controllers are the controllers that must be limited; nil means
	// memory and pids. An empty non-nil slice needs none (tests of
	// placement on a hierarchy without controllers).
	Controllers []string
	// ReadFile reads a v2 root's cgroup.controllers; nil uses os.ReadFile.
	ReadFile func(path string) ([]byte, error)
}

// ErrNoCgroups is wrapped by Detect's error when the host has no usable
// cgroup hierarchy for a needed controller.
var ErrNoCgroups = errors.New("no usable cgroup hierarchy")

// Detect finds the cgroup hierarchies a VMM cgroup is created in, from the
// mount table: for each limited controller the v1 hierarchy that carries
// it, or else the v2 unified hierarchy if its root offers it, and the
// tracking hierarchies (see the package documentation).
func Detect(opts DetectOptions) (*Layout, error) {
	data := opts.Mountinfo
	if data == nil {
		var err error
		if data, err = os.ReadFile("/proc/self/mountinfo"); err != nil {
			return nil, fmt.Errorf("reading the mount table: %w", err)
		}
	}
	read := opts.ReadFile
	if read == nil {
		read = os.ReadFile
	}
	want := opts.Controllers
	if want == nil {
		want = limited
	}
	byKey := map[string]Hierarchy{}
	var keys []string
	var v2 *Hierarchy
	mounts := ParseMountinfo(data)
	// A later mount on the same point hides the earlier one.
	top := map[string]int{}
	for i, m := range mounts {
		top[filepath.Clean(m.Point)] = i
	}
	for i, m := range mounts {
		if !filepath.IsAbs(m.Point) || top[filepath.Clean(m.Point)] != i {
			continue
		}
		switch m.FSType {
		case "cgroup":
			h := Hierarchy{Version: V1, Mount: filepath.Clean(m.Point), Root: m.Root, Controllers: v1Controllers(m.SuperOpts)}
			if len(h.Controllers) == 0 {
				continue
			}
			key := strings.Join(h.Controllers, ",")
			if old, ok := byKey[key]; ok {
				if betterMount(h, old) {
					byKey[key] = h
				}
				continue
			}
			byKey[key] = h
			keys = append(keys, key)
		case "cgroup2":
			h := Hierarchy{Version: V2, Mount: filepath.Clean(m.Point), Root: m.Root}
			if v2 != nil && !betterMount(h, *v2) {
				continue
			}
			b, err := read(filepath.Join(h.Mount, "cgroup.controllers"))
			if err != nil {
				continue
			}
			h.Controllers = strings.Fields(string(b))
			v2 = &h
		}
	}
	v1s := make([]Hierarchy, 0, len(keys))
	for _, k := range keys {
		v1s = append(v1s, byKey[k])
	}
	l := &Layout{}
	used := map[string]bool{} // by mount point
	add := func(h Hierarchy) {
		if !used[h.Mount] {
			used[h.Mount] = true
			l.Hierarchies = append(l.Hierarchies, h)
		}
	}
	for _, c := range want {
		found := false
		for _, h := range v1s {
			if h.Has(c) {
				add(h)
				found = true
				break
			}
		}
		if !found && v2 != nil && v2.Has(c) {
			add(*v2)
			found = true
		}
		if !found {
			return nil, fmt.Errorf("%w: the %s controller is neither mounted as cgroup v1 nor offered by a cgroup v2 root", ErrNoCgroups, c)
		}
	}
	if len(want) == 0 {
		// Placement only: the v2 hierarchy if there is one, else any v1.
		if v2 != nil {
			add(*v2)
		} else if len(v1s) > 0 {
			add(v1s[0])
		} else {
			return nil, fmt.Errorf("%w: no cgroup filesystem is mounted", ErrNoCgroups)
		}
	}
	if !opts.NoTracking {
		anyV1 := false
		for _, h := range l.Hierarchies {
			anyV1 = anyV1 || h.Version == V1
		}
		for _, h := range v1s {
			if h.Has("name=systemd") && !used[h.Mount] {
				h.Tracking = true
				add(h)
			}
		}
		if anyV1 && v2 != nil && !used[v2.Mount] {
			h := *v2
			h.Tracking = true
			add(h)
		}
	}
	return l, nil
}

// betterMount reports whether h is a better mount of a hierarchy than o: a
// mount of the whole hierarchy beats a bind of a sub-cgroup, then the
// shorter mount point wins.
func betterMount(h, o Hierarchy) bool {
	if (h.Root == "/") != (o.Root == "/") {
		return h.Root == "/"
	}
	return len(h.Mount) < len(o.Mount)
}

// ProcCgroup is one line of /proc/<pid>/cgroup.
type ProcCgroup struct {
	// ID is the hierarchy id (0 for v2).
	ID int
	// Controllers are the hierarchy's controllers (empty for v2), sorted.
	Controllers []string
	// Path is the cgroup's path from the hierarchy root.
	Path string
}

// ParseProcCgroup parses the text of /proc/<pid>/cgroup. Malformed lines
// are skipped.
func ParseProcCgroup(data []byte) []ProcCgroup {
	var out []ProcCgroup
	for _, line := range strings.Split(string(data), "\n") {
		id, rest, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		ctrls, path, ok := strings.Cut(rest, ":")
		if !ok || !strings.HasPrefix(path, "/") {
			continue
		}
		n, err := strconv.Atoi(id)
		if err != nil || n < 0 {
			continue
		}
		pc := ProcCgroup{ID: n, Path: path}
		if ctrls != "" {
			pc.Controllers = strings.Split(ctrls, ",")
			sort.Strings(pc.Controllers)
		}
		out = append(out, pc)
	}
	return out
}

// pathIn returns the cgroup path of a process in hierarchy h, from its
// parsed /proc/<pid>/cgroup, and whether h appears there.
func pathIn(h Hierarchy, pcs []ProcCgroup) (string, bool) {
	for _, pc := range pcs {
		if h.Version == V2 {
			if pc.ID == 0 && len(pc.Controllers) == 0 {
				return pc.Path, true
			}
			continue
		}
		if pc.ID != 0 && strings.Join(pc.Controllers, ",") == strings.Join(h.Controllers, ",") {
			return pc.Path, true
		}
	}
	return "", false
}

// dirOf returns the directory of cgroup path p (from the hierarchy root) in
// h's mount, or false when p is outside the mounted sub-tree.
func dirOf(h Hierarchy, p string) (string, bool) {
	root := h.Root
	if root == "" {
		root = "/"
	}
	rel, err := filepath.Rel(root, p)
	if err != nil || rel == ".." || strings.HasPrefix(rel, "../") {
		return "", false
	}
	return filepath.Join(h.Mount, rel), true
}
