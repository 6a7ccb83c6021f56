package sandbox

import (
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// fakeV2 is a FAKE cgroup v2 file system: a directory tree in a temp dir
// that imitates the kernel's rules closely enough to test the v2 path logic
// on a host that mounts cgroup v1 (a controller can be bound to one
// hierarchy only, and this machine's memory and pids are bound to v1
// mounts, so no real cgroup2 root here can offer them).
//
// It imitates: mkdir creating the interface files; cgroup.controllers of a
// child being its parent's cgroup.subtree_control; controller files
// (memory.max, pids.max) existing only where the controller is enabled;
// "+c" in cgroup.subtree_control failing with EINVAL when c is not in
// cgroup.controllers, and with EBUSY in a non-root cgroup that has
// processes (the no-internal-processes rule); rmdir failing with EBUSY
// when the cgroup has processes or children.
type fakeV2 struct {
	t    *testing.T
	root string
	mu   sync.Mutex
}

func newFakeV2(t *testing.T, controllers string) *fakeV2 {
	f := &fakeV2{t: t, root: t.TempDir()}
	f.put(f.root, "cgroup.controllers", controllers)
	f.put(f.root, "cgroup.subtree_control", "")
	f.put(f.root, "cgroup.procs", "1 2 3")
	return f
}

func (f *fakeV2) put(dir, name, content string) {
	if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
		f.t.Fatal(err)
	}
}

func (f *fakeV2) get(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		f.t.Fatal(err)
	}
	return string(b)
}

func (f *fakeV2) Mkdir(path string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := os.Mkdir(path, 0o755); err != nil {
		return err
	}
	parentCtl := strings.Fields(f.get(filepath.Join(filepath.Dir(path), "cgroup.subtree_control")))
	f.put(path, "cgroup.controllers", strings.Join(parentCtl, " "))
	f.put(path, "cgroup.subtree_control", "")
	f.put(path, "cgroup.procs", "")
	f.put(path, "cgroup.kill", "")
	for _, c := range parentCtl {
		switch c {
		case Memory:
			f.put(path, "memory.max", "max\n")
		case Pids:
			f.put(path, "pids.max", "max\n")
		}
	}
	return nil
}

func (f *fakeV2) Rmdir(path string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, err := os.Stat(path); err != nil {
		return err
	}
	if strings.TrimSpace(f.get(filepath.Join(path, "cgroup.procs"))) != "" {
		return syscall.EBUSY
	}
	ents, _ := os.ReadDir(path)
	for _, e := range ents {
		if e.IsDir() {
			return syscall.EBUSY
		}
	}
	return os.RemoveAll(path)
}

func (f *fakeV2) ReadFile(path string) ([]byte, error) { return os.ReadFile(path) }

func (f *fakeV2) ReadDir(path string) ([]os.DirEntry, error) { return os.ReadDir(path) }

func (f *fakeV2) WriteFile(path string, data []byte) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, err := os.Stat(path); err != nil {
		return err // no O_CREAT on cgroupfs
	}
	dir, name := filepath.Split(path)
	dir = filepath.Clean(dir)
	switch name {
	case "cgroup.subtree_control":
		avail := strings.Fields(f.get(filepath.Join(dir, "cgroup.controllers")))
		have := strings.Fields(f.get(path))
		for _, w := range strings.Fields(string(data)) {
			c := strings.TrimLeft(w, "+-")
			if !contains(avail, c) {
				return syscall.EINVAL
			}
			if dir != f.root && strings.TrimSpace(f.get(filepath.Join(dir, "cgroup.procs"))) != "" {
				return syscall.EBUSY
			}
			if w[0] == '+' && !contains(have, c) {
				have = append(have, c)
			}
		}
		f.put(dir, name, strings.Join(have, " "))
		return nil
	case "cgroup.kill":
		f.put(dir, "cgroup.procs", "")
		return nil
	case "memory.max", "pids.max":
		s := strings.TrimSpace(string(data))
		if s != "max" && strings.Trim(s, "0123456789") != "" {
			return syscall.EINVAL
		}
	}
	f.put(dir, name, string(data))
	return nil
}

func contains(l []string, s string) bool {
	for _, x := range l {
		if x == s {
			return true
		}
	}
	return false
}

var _ fsys = (*fakeV2)(nil)

// fakeLayout is a v2-only layout whose unified root is the fake tree.
func (f *fakeV2) layout(t *testing.T) *Layout {
	mi := "30 1 0:26 / " + f.root + " rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"
	l, err := Detect(DetectOptions{Mountinfo: []byte(mi), ReadFile: f.ReadFile})
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// TestFakeV2PathLogic runs the manager against the FAKE cgroup v2 tree:
// controller delegation from the root down to the parent, the VM cgroup's
// limit files, read-back, removal and pruning.
func TestFakeV2PathLogic(t *testing.T) {
	f := newFakeV2(t, "cpuset cpu io memory hugetlb pids rdma misc")
	l := f.layout(t)
	if l.Version() != V2 || len(l.Hierarchies) != 1 || l.Hierarchies[0].Mount != f.root {
		t.Fatalf("layout %+v", l)
	}
	m, err := newManager(l, "sys/noid", f)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{f.root, filepath.Join(f.root, "sys"), filepath.Join(f.root, "sys/noid")} {
		if got := f.get(filepath.Join(d, "cgroup.subtree_control")); !strings.Contains(got, "memory") || !strings.Contains(got, "pids") || strings.Contains(got, "cpu") {
			t.Errorf("%s subtree_control = %q, want memory and pids only", d, got)
		}
	}
	c, err := m.Create("vm1", Limits{MemoryBytes: 300 << 20, Pids: 77})
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(f.root, "sys/noid/vm1")
	if d := c.Dirs(); len(d) != 1 || d[0] != dir || c.Path() != "sys/noid/vm1" {
		t.Fatalf("dirs %v path %s", d, c.Path())
	}
	if got := f.get(filepath.Join(dir, "memory.max")); got != "314572800" {
		t.Errorf("memory.max = %q", got)
	}
	if got := f.get(filepath.Join(dir, "pids.max")); got != "77" {
		t.Errorf("pids.max = %q", got)
	}
	lim, err := c.Limits()
	if err != nil || lim != (Limits{MemoryBytes: 300 << 20, Pids: 77}) {
		t.Errorf("limits read back %+v, %v", lim, err)
	}
	// Re-creating reuses the directory and rewrites the limits.
	if _, err := m.Create("vm1", Limits{}); err != nil {
		t.Fatal(err)
	}
	if lim, _ := c.Limits(); lim != (Limits{}) {
		t.Errorf("limits after reset %+v", lim)
	}
	// A process inside: Has, then Remove kills it (cgroup.kill) and removes the dir.
	f.put(dir, "cgroup.procs", "4242\n")
	if ok, err := c.Has(4242); !ok || err != nil {
		t.Errorf("Has(4242) = %v, %v", ok, err)
	}
	if ok, _ := c.Has(4243); ok {
		t.Error("Has(4243) = true")
	}
	if err := c.Remove(t.Context()); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("cgroup dir still there: %v", err)
	}
	// Prune removes empty leftovers and keeps busy ones.
	m.Create("dead", Limits{})
	busy, _ := m.Create("busy", Limits{})
	f.put(filepath.Join(f.root, "sys/noid/busy"), "cgroup.procs", "99\n")
	// Too young to prune: another server may just have created it.
	if n, err := m.Prune(t.Context(), time.Hour); err != nil || n != 0 {
		t.Errorf("Prune(1h) = %d, %v; want 0", n, err)
	}
	n, err := m.Prune(t.Context(), 0)
	if err != nil || n != 1 {
		t.Errorf("Prune = %d, %v; want 1", n, err)
	}
	if _, err := os.Stat(busy.Dirs()[0]); err != nil {
		t.Errorf("busy cgroup pruned: %v", err)
	}
	if _, err := os.Stat(filepath.Join(f.root, "sys/noid/dead")); !os.IsNotExist(err) {
		t.Errorf("empty cgroup not pruned")
	}
}

// TestFakeV2NoInternalProcesses checks the error when the parent's
// ancestor has processes of its own (noid-server not in a delegated
// subtree), on the FAKE v2 tree.
func TestFakeV2NoInternalProcesses(t *testing.T) {
	f := newFakeV2(t, "memory pids")
	f.put(f.root, "cgroup.subtree_control", "memory pids")
	if err := f.Mkdir(filepath.Join(f.root, "system.slice")); err != nil {
		t.Fatal(err)
	}
	f.put(filepath.Join(f.root, "system.slice"), "cgroup.procs", "777\n")
	_, err := newManager(f.layout(t), "system.slice/noid", f)
	if err == nil || !strings.Contains(err.Error(), "processes of its own") {
		t.Fatalf("err = %v, want the no-internal-processes explanation", err)
	}
}

// TestFakeV2MissingController: a v2 root that does not offer pids is not
// usable for limits.
func TestFakeV2MissingController(t *testing.T) {
	f := newFakeV2(t, "cpu memory")
	mi := "30 1 0:26 / " + f.root + " rw - cgroup2 cgroup2 rw\n"
	_, err := Detect(DetectOptions{Mountinfo: []byte(mi), ReadFile: f.ReadFile})
	if err == nil || !strings.Contains(err.Error(), "pids") {
		t.Fatalf("err = %v", err)
	}
}

func TestValidName(t *testing.T) {
	for _, ok := range []string{"noid", "a1b2c3", "noid.slice", "vm_1-2"} {
		if err := ValidName(ok); err != nil {
			t.Errorf("ValidName(%q) = %v", ok, err)
		}
	}
	for _, bad := range []string{"", ".", "..", "a/b", "cgroup.procs", "x y", strings.Repeat("a", 129)} {
		if ValidName(bad) == nil {
			t.Errorf("ValidName(%q) = nil", bad)
		}
	}
	if _, err := cleanParent("../etc"); err == nil {
		t.Error("cleanParent(../etc) = nil")
	}
	if p, err := cleanParent("/a/b/"); err != nil || p != "a/b" {
		t.Errorf("cleanParent(/a/b/) = %q, %v", p, err)
	}
}
