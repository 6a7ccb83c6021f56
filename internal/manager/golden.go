package manager

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/noid-vm/noid/internal/api"
	"github.com/noid-vm/noid/internal/errdefs"
	"github.com/noid-vm/noid/internal/storage"
	"github.com/noid-vm/noid/internal/store"
	"github.com/noid-vm/noid/internal/vmm"
)

// Golden snapshots let `noid create` restore a pre-booted VM instead of
// booting one. Each is a self-contained directory holding rootfs.ext4,
// memory.snap, vmstate.snap and config.json, one per (vCPUs, memory):
//
//	<data_dir>/golden/<vcpus>x<memory_mib>/             system goldens (promoted by an admin), used by every user
//	<data_dir>/users/<uid>/golden/<vcpus>x<memory_mib>/ a user's own goldens, preferred over the system ones
//
// (<data_dir> here is the storage root: data_dir itself, or <data_dir>/reflink
// when [storage] reflink_image_size is set.)
//
// Nothing in a golden refers to the VM or checkpoint it came from, so
// destroying those breaks nothing.

// goldenConfig is config.json: the snapshot metadata plus the fingerprints
// that decide staleness.
type goldenConfig struct {
	vmm.SnapshotMeta
	// RootfsFingerprint identifies the base rootfs new VMs were built from:
	// its storage.ContentID ("sha256-64k:…"). Older noids wrote a weaker
	// fingerprint ("meta:…", or a plain SHA-256 for a rootfs up to 64 MiB);
	// such a golden counts as stale until it is promoted again.
	RootfsFingerprint string `json:"rootfs_fingerprint"`
	// Source names the VM and checkpoint it was promoted from (informational).
	Source string `json:"source"`
	// PromotedAt is when it was promoted (or pulled).
	PromotedAt time.Time `json:"promoted_at"`
	// Remote names the remote golden it was pulled from and the digest
	// of that manifest ("system/golden/1x256@<sha256>"), so a pull of the
	// same one again moves nothing.
	Remote string `json:"remote,omitempty"`
}

const goldenBackups = 3

func (m *Manager) systemGoldenRoot() string { return filepath.Join(m.cfg.StorageDir(), "golden") }

// goldenRoot is where u's promotions go: admins publish system goldens.
func (m *Manager) goldenRoot(u *store.User) string {
	if u.IsAdmin {
		return m.systemGoldenRoot()
	}
	return filepath.Join(m.userDir(u.ID), "golden")
}

func specDirName(vcpus, mem int) string { return fmt.Sprintf("%dx%d", vcpus, mem) }

// goldenLock returns the lock guarding one golden directory: creates read
// it, promotion and removal replace it.
func (m *Manager) goldenLock(dir string) *sync.RWMutex {
	m.goldenMu.Lock()
	defer m.goldenMu.Unlock()
	if m.goldenLocks == nil {
		m.goldenLocks = map[string]*sync.RWMutex{}
	}
	l := m.goldenLocks[dir]
	if l == nil {
		l = &sync.RWMutex{}
		m.goldenLocks[dir] = l
	}
	return l
}

func readGoldenConfig(dir string) (*goldenConfig, error) {
	b, err := os.ReadFile(filepath.Join(dir, vmm.GoldenConfig))
	if err != nil {
		return nil, err
	}
	var c goldenConfig
	if err := json.Unmarshal(b, &c); err != nil {
		return nil, fmt.Errorf("golden %s: corrupt config.json: %w", dir, err)
	}
	if c.Backend == "" || c.VCPUs <= 0 || c.MemoryMiB <= 0 {
		return nil, fmt.Errorf("golden %s: incomplete config.json (no backend, vCPUs or memory)", dir)
	}
	return &c, nil
}

// legacyFingerprint starts what older noids recorded for a boot file over
// 64 MiB (a root filesystem): a hash of its size, mtime and first and last
// MiB, blind to a change anywhere else.
const legacyFingerprint = "meta:"

// goldenInputs is what a golden must have been made from to serve a create
// now: the backend, acceleration and VMM version, and the content
// identities of the boot files (see storage.ContentIDs).
type goldenInputs struct {
	Backend    string
	Accel      vmm.Accel
	VMMVersion string
	// Kernel and Initrd are plain SHA-256s (storage.IDSHA256), the form
	// snapshot metadata records; Rootfs is a storage.ContentID.
	Kernel, Initrd, Rootfs bootFileID
}

// bootFileID is a boot file's content identity, or why it has none.
type bootFileID struct {
	ID  string
	Err error
}

// bootFileIDs returns the content identities of bf's files. Each is a stat
// when the file is unchanged since it was last hashed (ids remembers it,
// across restarts too); a file that changed is read whole once.
func bootFileIDs(ctx context.Context, ids *storage.ContentIDs, bf bootFiles) (kernel, initrd, rootfs bootFileID) {
	get := func(path string, algo storage.IDAlgo) bootFileID {
		id, err := ids.Get(ctx, path, algo)
		return bootFileID{id, err}
	}
	return get(bf.Kernel, storage.IDSHA256), get(bf.Initrd, storage.IDSHA256), get(bf.Rootfs, storage.IDSparseSHA256)
}

// goldenInputs returns what a golden made now would record.
func (m *Manager) goldenInputs(ctx context.Context, bf bootFiles) goldenInputs {
	in := goldenInputs{Backend: m.backend.Name(), Accel: m.accel}
	in.VMMVersion, _ = m.backend.Version(ctx)
	in.Kernel, in.Initrd, in.Rootfs = bootFileIDs(ctx, &m.ids, bf)
	return in
}

// staleReason says why a golden cannot be used with the current boot files
// and VMM, or "" when it is fresh.
func (m *Manager) staleReason(ctx context.Context, c *goldenConfig, bf bootFiles) string {
	return staleWhy(c, m.goldenInputs(ctx, bf))
}

// staleWhy compares what golden c was made from with now: every
// difference, or "" when c may serve a create.
func staleWhy(c *goldenConfig, now goldenInputs) string {
	var why []string
	if c.Backend != now.Backend {
		why = append(why, "it was made by the "+c.Backend+" backend")
	}
	if c.Accel != now.Accel {
		why = append(why, fmt.Sprintf("it was made under %s, this host uses %s", c.Accel, now.Accel))
	}
	if now.VMMVersion != "" && c.VMMVersion != now.VMMVersion {
		why = append(why, fmt.Sprintf("the VMM changed (%s → %s)", c.VMMVersion, now.VMMVersion))
	}
	for _, f := range []struct {
		what, was string
		now       bootFileID
	}{{"kernel", c.KernelSHA256, now.Kernel}, {"initramfs (agent)", c.InitrdSHA256, now.Initrd}, {"base rootfs", c.RootfsFingerprint, now.Rootfs}} {
		switch {
		case f.now.Err != nil:
			why = append(why, fmt.Sprintf("the %s cannot be read (%v)", f.what, f.now.Err))
		case strings.HasPrefix(f.was, legacyFingerprint) || (f.what == "base rootfs" && !strings.HasPrefix(f.was, storage.ContentIDPrefix)):
			why = append(why, fmt.Sprintf("it was promoted by an older noid whose %s fingerprint (size, mtime, first and last MiB) cannot show the %s is unchanged; promote it again", f.what, f.what))
		case f.was != f.now.ID:
			why = append(why, "the "+f.what+" changed")
		}
	}
	return strings.Join(why, ", ")
}

// primeBootFileIDs hashes the boot files in the background at start-up, so
// that the first create after an image changed while no server ran does
// not wait for it (when nothing changed, each is a stat).
func (m *Manager) primeBootFileIDs() {
	defer m.bg.Done()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		select {
		case <-m.closed:
			cancel()
		case <-ctx.Done():
		}
	}()
	bf, err := m.resolveBootFiles()
	if err != nil {
		return
	}
	start, before := time.Now(), m.ids.Hashed()
	k, i, r := bootFileIDs(ctx, &m.ids, bf)
	for _, f := range []struct {
		path string
		id   bootFileID
	}{{bf.Kernel, k}, {bf.Initrd, i}, {bf.Rootfs, r}} {
		if f.id.Err != nil && ctx.Err() == nil {
			m.log.Warn("cannot hash a boot file; goldens count as stale", "file", f.path, "err", f.id.Err)
		}
	}
	if n := m.ids.Hashed() - before; n > 0 {
		m.log.Info("boot files hashed (once per version of each)", "files", n, "took", time.Since(start).Round(time.Millisecond))
	}
}

// pickGolden finds a usable golden for a create, or explains why none is.
func (m *Manager) pickGolden(ctx context.Context, u *store.User, p *createParams, bf bootFiles) (dir string, reason string) {
	if p.coldBoot {
		return "", "cold boot requested"
	}
	name := specDirName(p.vcpus, p.memMiB)
	var candidates []string
	if !u.IsAdmin {
		candidates = append(candidates, filepath.Join(m.goldenRoot(u), name))
	}
	candidates = append(candidates, filepath.Join(m.systemGoldenRoot(), name))
	var stale []string
	for _, d := range candidates {
		c, err := readGoldenConfig(d)
		if err != nil {
			continue
		}
		if c.HasNet != (p.network != "none") {
			stale = append(stale, fmt.Sprintf("golden %s was made with network=%s", name, netName(c.HasNet)))
			continue
		}
		if why := m.staleReason(ctx, c, bf); why != "" {
			stale = append(stale, fmt.Sprintf("golden snapshot for %d vCPU/%d MiB is stale: %s", p.vcpus, p.memMiB, why))
			m.pool.drain(d)
			continue
		}
		return d, ""
	}
	if len(stale) > 0 {
		return "", strings.Join(stale, "; ")
	}
	return "", fmt.Sprintf("no golden snapshot for %d vCPU/%d MiB", p.vcpus, p.memMiB)
}

// createFromGolden starts a new VM from a golden directory.
func (m *Manager) createFromGolden(ctx context.Context, u *store.User, p *createParams, bf bootFiles, dir string, start time.Time) (*api.VM, error) {
	// The golden is in use: keep spares ready for the next create.
	defer m.pool.refill(dir)
	if gc, err := readGoldenConfig(dir); err == nil {
		sp := m.pool.take(dir, gc.PromotedAt)
		if _, ok := m.backend.(vmm.Preparer); ok && sp == nil {
			// None waits: prepare one now (it loads in the create).
			k := spareShape{VCPUs: gc.VCPUs, MemoryMiB: gc.MemoryMiB, HasNet: gc.HasNet, Kernel: bf.Kernel, Initrd: bf.Initrd}
			prepStart := time.Now()
			if sp, err = m.makeSpare(ctx, dir, k); err != nil {
				return nil, classifyIOErr("preparing a VMM for "+p.name, err)
			}
			sp.promoted, sp.fresh = gc.PromotedAt, time.Since(prepStart)
		}
		if sp != nil {
			vm, err := m.createFromSpare(ctx, u, p, bf, dir, sp, start)
			if !errors.Is(err, errStaleSpare) {
				return vm, err
			}
		}
	}
	l := m.goldenLock(dir)
	l.RLock()
	defer l.RUnlock()
	// Re-check under the lock: it may have been removed meanwhile.
	if _, err := readGoldenConfig(dir); err != nil {
		return nil, fmt.Errorf("%w: golden snapshot disappeared", errdefs.ErrConflict)
	}
	if _, err := m.verifySnapshot(ctx, dir, "golden snapshot "+filepath.Base(dir)); err != nil {
		return nil, err
	}
	src := "system"
	if strings.HasPrefix(dir, m.userDir(u.ID)) {
		src = "user"
	}
	v := &store.VM{
		ID: newID(6), UserID: u.ID, Name: p.name, State: store.StateCreating, VCPUs: p.vcpus, MemoryMiB: p.memMiB,
		VMM: m.backend.Name(), Accel: string(m.accel), BootPath: "golden", Kernel: bf.Kernel, Initrd: bf.Initrd,
		Network: p.network, AllowPeers: p.allowPeer, Source: "golden:" + src + ":" + filepath.Base(dir),
	}
	if fi, err := os.Stat(filepath.Join(dir, vmm.SnapDisk)); err == nil {
		v.DiskBytes = fi.Size()
	}
	return m.startFromSnapshot(ctx, u, v, dir, start)
}

// checkPromoteRequest checks a promotion request: a vm and checkpoint
// name, or a checkpoint id.
func checkPromoteRequest(req api.GoldenPromoteRequest) error {
	if req.VM == "" && req.Checkpoint == "" {
		return fmt.Errorf("%w: give a vm and checkpoint, or a checkpoint id", errdefs.ErrInvalidArgument)
	}
	return nil
}

// PromoteGolden copies a checkpoint into a golden snapshot for its spec,
// replacing (and backing up) an existing one.
func (m *Manager) PromoteGolden(ctx context.Context, u *store.User, req api.GoldenPromoteRequest) (*api.Golden, error) {
	var c *store.Checkpoint
	var vmName string
	if err := checkPromoteRequest(req); err != nil {
		return nil, err
	}
	if req.VM == "" {
		cp, err := m.store.GetCheckpointByID(ctx, u.ID, req.Checkpoint)
		if err != nil {
			return nil, errdefs.WithHint(err, "noid checkpoints <vm> lists checkpoint ids")
		}
		c = cp
		if v, err := m.store.GetVMByID(ctx, cp.VMID); err == nil {
			vmName = v.Name
		}
	} else {
		// An admin may promote another user's checkpoint ("user/vm"); the
		// golden is still the caller's (for an admin, a system golden).
		owner, name, err := m.Owner(ctx, u, req.VM)
		if err != nil {
			return nil, err
		}
		v, err := m.store.GetVM(ctx, owner.ID, name)
		if err != nil {
			return nil, err
		}
		cp, err := m.store.GetCheckpoint(ctx, owner.ID, v.ID, req.Checkpoint)
		if err != nil {
			return nil, err
		}
		c, vmName = cp, v.Name
	}
	if err := m.checkFreeSpace("promoting checkpoint " + c.Name); err != nil {
		return nil, err
	}
	bf, err := m.resolveBootFiles()
	if err != nil {
		return nil, err
	}
	cpDir := m.checkpointDir(c)
	meta, err := m.verifySnapshot(ctx, cpDir, "checkpoint "+c.Name)
	if err != nil {
		return nil, err
	}
	use, err := m.store.UserUsage(ctx, u.ID)
	if err != nil {
		return nil, err
	}
	if err := m.checkGoldenQuota(u, specDirName(c.VCPUs, c.MemoryMiB), c.SizeBytes, use.CheckpointBytes); err != nil {
		return nil, err
	}
	root := m.goldenRoot(u)
	final := filepath.Join(root, specDirName(c.VCPUs, c.MemoryMiB))
	td, err := newTempDir(root, "golden dir")
	if err != nil {
		return nil, err
	}
	defer td.cleanup()
	tmp := td.path
	// Hold the checkpoint still while copying it.
	rt := m.rt(c.VMID)
	rt.op.Lock()
	err = m.linkSnapshot(ctx, cpDir, tmp, meta)
	rt.op.Unlock()
	if err != nil {
		return nil, classifyIOErr("copying the checkpoint into the golden snapshot", err)
	}
	crashpoint("golden.after-copy")
	kernel, initrd, rootfs := bootFileIDs(ctx, &m.ids, bf)
	if rootfs.Err != nil {
		return nil, classifyIOErr("hashing the base rootfs", rootfs.Err)
	}
	gc := goldenConfig{SnapshotMeta: *meta, RootfsFingerprint: rootfs.ID, Source: "checkpoint " + c.Name + " of vm " + vmName, PromotedAt: time.Now().UTC()}
	if gc.KernelSHA256 == "" {
		gc.KernelSHA256 = kernel.ID
	}
	if gc.InitrdSHA256 == "" {
		gc.InitrdSHA256 = initrd.ID
	}
	if err := m.publishGolden(root, tmp, final, &gc); err != nil {
		return nil, err
	}
	td.keep()
	// A golden is promoted to be used: prepare its spares now.
	defer m.pool.refill(final)
	m.log.Info("golden snapshot promoted", "user", u.Name, "source", gc.Source, "spec", filepath.Base(final))
	return m.apiGolden(ctx, final, &gc, u, bf), nil
}

// publishGolden writes gc as the config of the golden directory tmp
// (which holds the snapshot's files), syncs it and makes it the golden
// final of root, moving the one there to root/.backup. The caller refills
// final's spares.
func (m *Manager) publishGolden(root, tmp, final string, gc *goldenConfig) error {
	b, _ := json.MarshalIndent(gc, "", "  ")
	if err := os.WriteFile(filepath.Join(tmp, vmm.GoldenConfig), b, 0o600); err != nil {
		return classifyIOErr("writing golden config", err)
	}
	if err := syncTree(tmp); err != nil {
		return classifyIOErr("syncing golden snapshot", err)
	}
	l := m.goldenLock(final)
	l.Lock()
	defer l.Unlock()
	if _, err := os.Stat(final); err == nil {
		bdir := filepath.Join(root, ".backup")
		os.MkdirAll(bdir, 0o700)
		if err := os.Rename(final, filepath.Join(bdir, filepath.Base(final)+"-"+time.Now().UTC().Format("20060102T150405.000"))); err != nil {
			return fmt.Errorf("backing up the previous golden snapshot: %w", err)
		}
		m.pruneBackups(bdir, filepath.Base(final))
	}
	if err := os.Rename(tmp, final); err != nil {
		return fmt.Errorf("publishing golden snapshot: %w", err)
	}
	m.pool.drain(final)
	m.kickGoldenView()
	storage.FsyncDir(root)
	return nil
}

func (m *Manager) pruneBackups(bdir, spec string) {
	ents, _ := os.ReadDir(bdir)
	var mine []string
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), spec+"-") {
			mine = append(mine, e.Name())
		}
	}
	sort.Strings(mine)
	for len(mine) > goldenBackups {
		os.RemoveAll(filepath.Join(bdir, mine[0]))
		mine = mine[1:]
	}
}

func (m *Manager) apiGolden(ctx context.Context, dir string, c *goldenConfig, u *store.User, bf bootFiles) *api.Golden {
	g := &api.Golden{VCPUs: c.VCPUs, MemoryMiB: c.MemoryMiB, CreatedAt: c.PromotedAt, Backend: c.Backend, Source: c.Source, KernelHash: c.KernelSHA256}
	g.SizeBytes = m.snapshotSize(dir)
	g.Owner = u.Name
	if strings.HasPrefix(dir, m.systemGoldenRoot()) {
		g.Owner = "system"
	}
	if why := m.staleReason(ctx, c, bf); why != "" {
		g.Stale, g.StaleWhy = true, why
	}
	g.Spares = m.pool.ready(dir)
	return g
}

// ListGolden lists the user's own goldens and the system ones.
func (m *Manager) ListGolden(ctx context.Context, u *store.User) ([]*api.Golden, error) {
	bf, _ := m.resolveBootFiles()
	roots := []string{m.goldenRoot(u)}
	if !u.IsAdmin {
		roots = append(roots, m.systemGoldenRoot())
	}
	out := []*api.Golden{}
	for _, root := range roots {
		ents, err := os.ReadDir(root)
		if err != nil {
			continue
		}
		for _, e := range ents {
			if !e.IsDir() || strings.HasPrefix(e.Name(), ".") {
				continue
			}
			d := filepath.Join(root, e.Name())
			c, err := readGoldenConfig(d)
			if err != nil {
				continue
			}
			out = append(out, m.apiGolden(ctx, d, c, u, bf))
		}
	}
	return out, nil
}

// RemoveGolden deletes the user's golden for a spec (admins: the system one).
func (m *Manager) RemoveGolden(ctx context.Context, u *store.User, vcpus, mem int) error {
	d := filepath.Join(m.goldenRoot(u), specDirName(vcpus, mem))
	l := m.goldenLock(d)
	l.Lock()
	defer l.Unlock()
	if _, err := os.Stat(filepath.Join(d, vmm.GoldenConfig)); err != nil {
		return errdefs.WithHint(fmt.Errorf("golden snapshot for %d vCPU/%d MiB: %w", vcpus, mem, errdefs.ErrNotFound), "noid golden list")
	}
	m.pool.drain(d)
	if err := os.RemoveAll(d); err != nil {
		return fmt.Errorf("removing golden snapshot: %w", err)
	}
	// Its backups go too: they count against the owner's quota, and
	// nothing else removes them.
	bdir := filepath.Join(m.goldenRoot(u), ".backup")
	bents, _ := os.ReadDir(bdir)
	backups := 0
	for _, b := range bents {
		if strings.HasPrefix(b.Name(), filepath.Base(d)+"-") {
			if err := os.RemoveAll(filepath.Join(bdir, b.Name())); err != nil {
				return fmt.Errorf("removing a backup of the golden snapshot: %w", err)
			}
			backups++
		}
	}
	m.kickGoldenView()
	m.log.Info("golden snapshot removed", "user", u.Name, "spec", filepath.Base(d), "backups_removed", backups)
	return nil
}

// removeUserGolden deletes a removed user's own goldens.
func (m *Manager) removeUserGolden(ctx context.Context, u *store.User) error {
	if u.IsAdmin {
		return nil
	}
	ents, _ := os.ReadDir(m.goldenRoot(u))
	for _, e := range ents {
		m.pool.drain(filepath.Join(m.goldenRoot(u), e.Name()))
	}
	return os.RemoveAll(m.goldenRoot(u))
}
