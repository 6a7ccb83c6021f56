package sandbox

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Limits are the limits of one VMM's cgroup. Zero means no limit.
type Limits struct {
	// MemoryBytes is the memory limit (memory.limit_in_bytes on v1,
	// memory.max on v2). It counts anonymous memory and the page cache the
	// VMM faults in, which includes a file-backed guest RAM.
	MemoryBytes int64
	// Pids limits processes and threads (pids.max).
	Pids int64
}

// fsys is the file-system interface the manager uses, so that the path
// logic can be tested against a fake tree that behaves like cgroupfs.
type fsys interface {
	Mkdir(path string) error
	Rmdir(path string) error
	ReadFile(path string) ([]byte, error)
	// WriteFile writes data with one write(2) to an existing file.
	WriteFile(path string, data []byte) error
	ReadDir(path string) ([]os.DirEntry, error)
}

// osFS is the real cgroup file system.
type osFS struct{}

func (osFS) Mkdir(path string) error              { return os.Mkdir(path, 0o755) }
func (osFS) Rmdir(path string) error              { return syscall.Rmdir(path) }
func (osFS) ReadFile(path string) ([]byte, error) { return os.ReadFile(path) }
func (osFS) ReadDir(path string) ([]os.DirEntry, error) {
	return os.ReadDir(path)
}
func (osFS) WriteFile(path string, data []byte) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	_, err = f.Write(data)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// Manager creates and removes VMM cgroups under one parent cgroup. It is
// safe for concurrent use.
type Manager struct {
	layout *Layout
	parent string
	fs     fsys
}

// DefaultParent is the parent cgroup of VMM cgroups when none is configured.
const DefaultParent = "noid"

// NewManager prepares parent (a relative cgroup path such as "noid",
// taken from each hierarchy's mounted root) in every hierarchy of l: it
// creates it and, on v2, enables the limited controllers in
// cgroup.subtree_control from the root down to it.
func NewManager(l *Layout, parent string) (*Manager, error) {
	return newManager(l, parent, osFS{})
}

func newManager(l *Layout, parent string, f fsys) (*Manager, error) {
	if l == nil || len(l.Hierarchies) == 0 {
		return nil, fmt.Errorf("%w: empty layout", ErrNoCgroups)
	}
	if parent == "" {
		parent = DefaultParent
	}
	p, err := cleanParent(parent)
	if err != nil {
		return nil, err
	}
	m := &Manager{layout: l, parent: p, fs: f}
	for _, h := range l.Hierarchies {
		if err := m.prepare(h); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// cleanParent validates a parent cgroup path: relative, no "..", every
// element a valid name.
func cleanParent(p string) (string, error) {
	p = strings.Trim(p, "/")
	if p == "" {
		return "", fmt.Errorf("cgroup parent must not be the root")
	}
	for _, el := range strings.Split(p, "/") {
		if err := ValidName(el); err != nil {
			return "", fmt.Errorf("cgroup parent %q: %w", p, err)
		}
	}
	return p, nil
}

// ValidName checks a cgroup directory name: 1-128 of [A-Za-z0-9_.-], not
// "." or "..", and not starting with "cgroup." (the kernel's interface
// files).
func ValidName(name string) error {
	if name == "" || len(name) > 128 || name == "." || name == ".." || strings.HasPrefix(name, "cgroup.") {
		return fmt.Errorf("invalid cgroup name %q", name)
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '-' || c == '.') {
			return fmt.Errorf("invalid cgroup name %q: character %q", name, c)
		}
	}
	return nil
}

// prepare creates the parent in h and delegates the controllers on v2.
func (m *Manager) prepare(h Hierarchy) error {
	dir := h.Mount
	var need []string
	if h.Version == V2 {
		for _, c := range limited {
			if !h.Tracking && h.Has(c) && m.layout.For(c) != nil && m.layout.For(c).Mount == h.Mount {
				need = append(need, c)
			}
		}
	}
	for _, el := range strings.Split(m.parent, "/") {
		if len(need) > 0 {
			if err := m.enable(dir, need); err != nil {
				return err
			}
		}
		dir = filepath.Join(dir, el)
		if err := m.fs.Mkdir(dir); err != nil && !errors.Is(err, fs.ErrExist) {
			return fmt.Errorf("creating cgroup %s: %w", dir, err)
		}
	}
	if len(need) > 0 {
		if err := m.enable(dir, need); err != nil {
			return err
		}
	}
	return nil
}

// enable writes "+c" to dir's cgroup.subtree_control for each controller of
// want it does not list yet.
func (m *Manager) enable(dir string, want []string) error {
	b, err := m.fs.ReadFile(filepath.Join(dir, "cgroup.subtree_control"))
	if err != nil {
		return fmt.Errorf("reading %s/cgroup.subtree_control: %w", dir, err)
	}
	have := strings.Fields(string(b))
	var add []string
	for _, c := range want {
		found := false
		for _, h := range have {
			found = found || h == c
		}
		if !found {
			add = append(add, "+"+c)
		}
	}
	if len(add) == 0 {
		return nil
	}
	if err := m.fs.WriteFile(filepath.Join(dir, "cgroup.subtree_control"), []byte(strings.Join(add, " "))); err != nil {
		hint := ""
		if errors.Is(err, syscall.EBUSY) {
			hint = " (the cgroup has processes of its own; on cgroup v2 controllers can only be delegated from a cgroup without processes: run noid-server in a delegated subtree or at the root)"
		}
		return fmt.Errorf("enabling %s in %s: %w%s", strings.Join(add, " "), dir, err, hint)
	}
	return nil
}

// Layout returns the layout the manager works on.
func (m *Manager) Layout() *Layout { return m.layout }

// Parent returns the parent cgroup path, e.g. "noid".
func (m *Manager) Parent() string { return m.parent }

// Open returns the cgroup called name without touching the file system
// (to remove it, or to inspect a running VMM's cgroup).
func (m *Manager) Open(name string) (*Cgroup, error) {
	if err := ValidName(name); err != nil {
		return nil, err
	}
	c := &Cgroup{m: m, name: name}
	for _, h := range m.layout.Hierarchies {
		c.dirs = append(c.dirs, filepath.Join(h.Mount, m.parent, name))
	}
	return c, nil
}

// Create creates (or reuses) the cgroup called name in every hierarchy and
// sets its limits. Reusing matters after a VMM died without its cgroup
// being removed: the next start of that VM takes it over.
func (m *Manager) Create(name string, lim Limits) (*Cgroup, error) {
	c, err := m.Open(name)
	if err != nil {
		return nil, err
	}
	for _, d := range c.dirs {
		if err := m.fs.Mkdir(d); err != nil && !errors.Is(err, fs.ErrExist) {
			c.Remove(context.Background())
			return nil, fmt.Errorf("creating cgroup %s: %w", d, err)
		}
	}
	if err := c.SetLimits(lim); err != nil {
		c.Remove(context.Background())
		return nil, err
	}
	return c, nil
}

// Prune removes the parent's child cgroups that hold no process and are
// older than minAge (left by VMMs that died while no server ran). The age
// keeps it off a cgroup another server on the host has just created and not
// yet started its VMM in.
func (m *Manager) Prune(ctx context.Context, minAge time.Duration) (int, error) {
	names := map[string]bool{}
	young := map[string]bool{}
	for _, h := range m.layout.Hierarchies {
		ents, err := m.fs.ReadDir(filepath.Join(h.Mount, m.parent))
		if err != nil {
			continue
		}
		for _, e := range ents {
			if !e.IsDir() || ValidName(e.Name()) != nil {
				continue
			}
			names[e.Name()] = true
			if fi, err := e.Info(); err != nil || time.Since(fi.ModTime()) < minAge {
				young[e.Name()] = true
			}
		}
	}
	n := 0
	var errs []error
	for name := range names {
		if young[name] || ctx.Err() != nil {
			continue
		}
		c, _ := m.Open(name)
		empty, err := c.empty()
		if err != nil || !empty {
			continue
		}
		if err := c.rmdirs(); err != nil {
			errs = append(errs, err)
			continue
		}
		n++
	}
	return n, errors.Join(errs...)
}

// Cgroup is one VMM's cgroup, a directory in each hierarchy of the layout.
type Cgroup struct {
	m    *Manager
	name string
	dirs []string
}

// Name returns the cgroup's name (the VM id).
func (c *Cgroup) Name() string { return c.name }

// Path returns the cgroup's path from each hierarchy's mounted root,
// e.g. "noid/abc123".
func (c *Cgroup) Path() string { return c.m.parent + "/" + c.name }

// Dirs returns the cgroup's directory in each hierarchy, in layout order.
func (c *Cgroup) Dirs() []string { return append([]string(nil), c.dirs...) }

// dir returns the directory in the hierarchy carrying controller ctrl.
func (c *Cgroup) dir(ctrl string) (string, Version, bool) {
	h := c.m.layout.For(ctrl)
	if h == nil {
		return "", 0, false
	}
	return filepath.Join(h.Mount, c.m.parent, c.name), h.Version, true
}

// SetLimits writes lim into the cgroup.
func (c *Cgroup) SetLimits(lim Limits) error {
	if lim.MemoryBytes < 0 || lim.Pids < 0 {
		return fmt.Errorf("negative cgroup limit")
	}
	if d, v, ok := c.dir(Memory); ok {
		file, val := "memory.max", "max"
		if v == V1 {
			file, val = "memory.limit_in_bytes", "-1"
		}
		if lim.MemoryBytes > 0 {
			val = strconv.FormatInt(lim.MemoryBytes, 10)
		}
		if err := c.m.fs.WriteFile(filepath.Join(d, file), []byte(val)); err != nil {
			return fmt.Errorf("setting %s of %s: %w", file, d, err)
		}
	}
	if d, _, ok := c.dir(Pids); ok {
		val := "max"
		if lim.Pids > 0 {
			val = strconv.FormatInt(lim.Pids, 10)
		}
		if err := c.m.fs.WriteFile(filepath.Join(d, "pids.max"), []byte(val)); err != nil {
			return fmt.Errorf("setting pids.max of %s: %w", d, err)
		}
	}
	return nil
}

// unlimitedV1 is the smallest value v1 reports for "no memory limit"
// (PAGE_COUNTER_MAX pages, rounded; anything this large means none).
const unlimitedV1 = int64(1) << 62

// Limits reads the limits back from the cgroup file system.
func (c *Cgroup) Limits() (Limits, error) {
	var lim Limits
	if d, v, ok := c.dir(Memory); ok {
		file := "memory.max"
		if v == V1 {
			file = "memory.limit_in_bytes"
		}
		n, err := c.readLimit(filepath.Join(d, file))
		if err != nil {
			return lim, err
		}
		if n >= unlimitedV1 {
			n = 0
		}
		lim.MemoryBytes = n
	}
	if d, _, ok := c.dir(Pids); ok {
		n, err := c.readLimit(filepath.Join(d, "pids.max"))
		if err != nil {
			return lim, err
		}
		lim.Pids = n
	}
	return lim, nil
}

func (c *Cgroup) readLimit(path string) (int64, error) {
	b, err := c.m.fs.ReadFile(path)
	if err != nil {
		return 0, err
	}
	s := strings.TrimSpace(string(b))
	if s == "max" {
		return 0, nil
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("parsing %s: %w", path, err)
	}
	return n, nil
}

// Procs returns the pids in the cgroup (in its first hierarchy).
func (c *Cgroup) Procs() ([]int, error) {
	return c.procsIn(c.dirs[0])
}

func (c *Cgroup) procsIn(dir string) ([]int, error) {
	b, err := c.m.fs.ReadFile(filepath.Join(dir, "cgroup.procs"))
	if err != nil {
		return nil, err
	}
	var out []int
	for _, f := range strings.Fields(string(b)) {
		if n, err := strconv.Atoi(f); err == nil {
			out = append(out, n)
		}
	}
	return out, nil
}

// Has reports whether pid is in the cgroup in every hierarchy.
func (c *Cgroup) Has(pid int) (bool, error) {
	for _, d := range c.dirs {
		ps, err := c.procsIn(d)
		if err != nil {
			return false, err
		}
		found := false
		for _, p := range ps {
			found = found || p == pid
		}
		if !found {
			return false, nil
		}
	}
	return true, nil
}

// Add moves a running process (all its threads) into the cgroup in every
// hierarchy. Prefer Start, which has no window in which the process runs
// outside; Add is for processes that already run.
func (c *Cgroup) Add(pid int) error {
	for _, d := range c.dirs {
		if err := c.m.fs.WriteFile(filepath.Join(d, "cgroup.procs"), []byte(strconv.Itoa(pid))); err != nil {
			return fmt.Errorf("adding pid %d to cgroup %s: %w", pid, d, err)
		}
	}
	return nil
}

// empty reports whether no hierarchy's directory holds a process.
func (c *Cgroup) empty() (bool, error) {
	for _, d := range c.dirs {
		ps, err := c.procsIn(d)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return false, err
		}
		if len(ps) > 0 {
			return false, nil
		}
	}
	return true, nil
}

// rmdirs removes the cgroup's directories; missing ones are fine.
func (c *Cgroup) rmdirs() error {
	var errs []error
	for _, d := range c.dirs {
		if err := c.m.fs.Rmdir(d); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, fmt.Errorf("removing cgroup %s: %w", d, err))
		}
	}
	return errors.Join(errs...)
}

// Remove kills whatever is left in the cgroup and removes its directories.
// It is meant for after the VMM has exited; a process still inside is
// killed with SIGKILL (the VMM cannot fork, so there is nothing else). A
// process that exited a moment ago can still be counted for a short while;
// Remove retries until ctx ends or two seconds have passed.
func (c *Cgroup) Remove(ctx context.Context) error {
	deadline := time.Now().Add(2 * time.Second)
	delay := 500 * time.Microsecond
	for {
		err := c.rmdirs()
		if err == nil || !errors.Is(err, syscall.EBUSY) || time.Now().After(deadline) {
			return err
		}
		c.killAll()
		select {
		case <-ctx.Done():
			return err
		case <-time.After(delay):
		}
		if delay < 50*time.Millisecond {
			delay *= 2
		}
	}
}

// killAll sends SIGKILL to every process left in the cgroup (cgroup.kill
// on v2 where the kernel has it).
func (c *Cgroup) killAll() {
	for i, h := range c.m.layout.Hierarchies {
		if h.Version == V2 && c.m.fs.WriteFile(filepath.Join(c.dirs[i], "cgroup.kill"), []byte("1")) == nil {
			return
		}
	}
	for _, d := range c.dirs {
		ps, _ := c.procsIn(d)
		for _, p := range ps {
			if p > 0 {
				syscall.Kill(p, syscall.SIGKILL)
			}
		}
	}
}
