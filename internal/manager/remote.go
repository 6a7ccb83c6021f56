package manager

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/noid-vm/noid/internal/api"
	"github.com/noid-vm/noid/internal/errdefs"
	"github.com/noid-vm/noid/internal/remote"
	"github.com/noid-vm/noid/internal/storage"
	"github.com/noid-vm/noid/internal/store"
	"github.com/noid-vm/noid/internal/vmm"
)

// Checkpoints and golden snapshots in the remote object store ([remote],
// package remote). A push links the snapshot's files into a staging
// directory (so the checkpoint may be deleted meanwhile) and uploads them;
// the manifest goes last. A clone from the store pulls the checkpoint once
// into <storage>/remote/<manifest digest>/, a complete snapshot directory
// made under a temporary name and renamed into place, and clones from
// there: a second clone of the same pushed checkpoint reads only its
// manifest. A golden pull installs the golden like a promotion.
//
// Keys are the user's own: a user's objects live under users/<name>/ of
// the store (the same user name on every host of the fleet), and the
// goldens admins push under system/, which every user may pull.

// remoteDir holds the snapshots pulled from the store and the staging
// directories of pushes.
func (m *Manager) remoteDir() string { return filepath.Join(m.cfg.StorageDir(), "remote") }

// remoteStore is the configured store, or why there is none.
func (m *Manager) remoteStore() (remote.Store, error) {
	if m.remote != nil {
		return m.remote, nil
	}
	if m.remoteErr != nil {
		return nil, errdefs.WithHint(fmt.Errorf("%w: the remote store is not usable: %v", errdefs.ErrUnavailable, m.remoteErr), "fix [remote] in the server's config and restart noid-server")
	}
	return nil, errdefs.WithHint(fmt.Errorf("%w: this server has no remote store", errdefs.ErrUnavailable),
		"an admin sets [remote] endpoint, bucket and credentials in the server's config (docs/fleet.md)")
}

// setupRemote connects to the [remote] store, if one is configured. A
// store that is down or refuses the credentials does not stop the server:
// it is logged, and each remote operation says what is wrong.
func (m *Manager) setupRemote(override remote.Store) {
	for _, pat := range []string{".tmp-*", ".push-*"} {
		old, _ := filepath.Glob(filepath.Join(m.remoteDir(), pat))
		for _, d := range old {
			os.RemoveAll(d)
		}
	}
	mfs, _ := filepath.Glob(filepath.Join(m.remoteDir(), "*.json"))
	for _, mf := range mfs {
		if _, err := os.Stat(strings.TrimSuffix(mf, ".json")); err != nil {
			os.Remove(mf)
		}
	}
	if override != nil {
		m.remote = override
		return
	}
	rc := m.cfg.Remote
	if !rc.Enabled() {
		return
	}
	creds, err := rc.LoadRemoteCredentials()
	if err != nil {
		m.remoteErr = err
		m.log.Error("remote store: no credentials; pushes and pulls will fail", "err", err)
		return
	}
	st, err := remote.NewS3(rc, creds)
	if err != nil {
		m.remoteErr = err
		m.log.Error("remote store: cannot use it", "err", err)
		return
	}
	m.remote = st
	m.bg.Add(1)
	go func() {
		defer m.bg.Done()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := st.Check(ctx); err != nil {
			m.log.Warn("remote store: check failed; pushes and pulls will fail until it is fixed", "store", st.String(), "err", err, "hint", errdefs.HintOf(err))
			return
		}
		m.log.Info("remote store ready", "store", st.String(), "credentials", creds.String())
	}()
}

// remoteNS is the namespace of u's objects.
func remoteNS(u *store.User) string { return remote.UserNS(u.Name) }

// stageSnapshot links the files of the snapshot in dir (metadata meta,
// its file metaFile) into a new staging directory, and lists them.
func (m *Manager) stageSnapshot(ctx context.Context, dir, metaFile string, meta *vmm.SnapshotMeta) (string, []string, error) {
	if err := os.MkdirAll(m.remoteDir(), 0o700); err != nil {
		return "", nil, err
	}
	stage := filepath.Join(m.remoteDir(), ".push-"+newID(4))
	if err := os.Mkdir(stage, 0o700); err != nil {
		return "", nil, err
	}
	if err := m.linkSnapshot(ctx, dir, stage, meta); err != nil {
		os.RemoveAll(stage)
		return "", nil, err
	}
	if err := os.Link(filepath.Join(dir, metaFile), filepath.Join(stage, metaFile)); err != nil {
		os.RemoveAll(stage)
		return "", nil, fmt.Errorf("linking %s: %w", metaFile, err)
	}
	names, err := snapshotFiles(stage)
	if err != nil {
		os.RemoveAll(stage)
		return "", nil, err
	}
	sort.Strings(names)
	return stage, names, nil
}

// cpuModel is the host CPU's model name (informational in manifests).
func cpuModel() string {
	b, _ := os.ReadFile("/proc/cpuinfo")
	for _, line := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return ""
}

// baseManifest fills what every manifest of meta carries.
func (m *Manager) baseManifest(kind, key, owner string, meta *vmm.SnapshotMeta) *remote.Manifest {
	host, _ := os.Hostname()
	return &remote.Manifest{Kind: kind, Key: key, Owner: owner, Host: host, Backend: meta.Backend, VMMVersion: meta.VMMVersion,
		Accel: string(meta.Accel), CPUModel: cpuModel(), VCPUs: meta.VCPUs, MemoryMiB: meta.MemoryMiB, HasNet: meta.HasNet,
		KernelSHA256: meta.KernelSHA256, InitrdSHA256: meta.InitrdSHA256}
}

func transferOf(s *remote.Stats) *api.RemoteTransfer {
	return &api.RemoteTransfer{BytesMoved: s.BytesMoved, Chunks: s.Chunks, ChunksMoved: s.Moved, ChunksReused: s.Reused, LocalFiles: s.LocalFiles, Ms: ms(s.Took)}
}

// cachedTransfer is the transfer of a pull that found man's snapshot on
// this host already: no data moved.
func cachedTransfer(man *remote.Manifest) *api.RemoteTransfer {
	n := 0
	for _, f := range man.Files {
		n += len(f.Chunks)
	}
	return &api.RemoteTransfer{Chunks: n, ChunksReused: n, Cached: true}
}

func apiRemote(man *remote.Manifest) *api.RemoteSnapshot {
	return &api.RemoteSnapshot{Key: man.Key, Kind: man.Kind, Owner: man.Owner, Host: man.Host, Source: man.Source, PushedAt: man.PushedAt,
		Backend: man.Backend, VCPUs: man.VCPUs, MemoryMiB: man.MemoryMiB, SizeBytes: man.Size(), DataBytes: man.DataBytes(), StoredBytes: man.StoredBytes()}
}

// PushCheckpoint uploads a checkpoint of the user's VM (vmName as Owner
// resolves it) to the remote store, under req.Key in its owner's space.
func (m *Manager) PushCheckpoint(ctx context.Context, u *store.User, vmName, cpName string, req api.RemotePushRequest) (*api.RemoteSnapshot, error) {
	st, err := m.remoteStore()
	if err != nil {
		return nil, err
	}
	owner, vmName, err := m.Owner(ctx, u, vmName)
	if err != nil {
		return nil, err
	}
	v, err := m.store.GetVM(ctx, owner.ID, vmName)
	if err != nil {
		return nil, err
	}
	c, err := m.store.GetCheckpoint(ctx, owner.ID, v.ID, cpName)
	if err != nil {
		return nil, err
	}
	key := req.Key
	if key == "" {
		key = v.Name + "/" + c.Name
	}
	if err := remote.ValidateKey(key); err != nil {
		return nil, err
	}
	dir := m.checkpointDir(c)
	what := "checkpoint " + c.Name
	meta, err := m.verifySnapshot(ctx, dir, what)
	if err != nil {
		return nil, err
	}
	// Hold the checkpoint still while its files are linked.
	rt := m.rt(c.VMID)
	rt.op.Lock()
	stage, names, err := m.stageSnapshot(ctx, dir, vmm.SnapMeta, meta)
	rt.op.Unlock()
	if err != nil {
		return nil, classifyIOErr("staging "+what+" for the push", err)
	}
	defer os.RemoveAll(stage)
	man := m.baseManifest(remote.KindCheckpoint, key, owner.Name, meta)
	man.Source, man.DiskBytes, man.MetaFile = v.Name+"/"+c.Name, v.DiskBytes, vmm.SnapMeta
	if bf, err := m.resolveBootFiles(); err == nil {
		man.RootfsFingerprint, _ = m.ids.Get(ctx, bf.Rootfs, storage.IDSparseSHA256)
	}
	ns := remoteNS(owner)
	s, err := remote.Push(ctx, st, ns, remote.CheckpointKey(ns, key), stage, names, man, remote.PushOptions{Parallel: m.cfg.Remote.ParallelOrDefault(),
		BeforeManifest: func() { crashpoint("remote.push-before-manifest") }})
	if err != nil {
		m.log.Warn("checkpoint push failed", "user", u.Name, "vm", v.Name, "checkpoint", c.Name, "key", key, "err", err)
		return nil, err
	}
	m.log.Info("checkpoint pushed", "user", u.Name, "vm", v.Name, "checkpoint", c.Name, "key", key, "bytes_moved", s.BytesMoved,
		"chunks", s.Chunks, "chunks_reused", s.Reused, "ms", ms(s.Took))
	out := apiRemote(man)
	out.Pushed = transferOf(s)
	return out, nil
}

// remoteFits refuses a remote snapshot that cannot run on this host: one
// of another backend, acceleration or VMM version, made from other boot
// files (for a golden, its base rootfs too), or with a NIC on a host
// without networking.
func (m *Manager) remoteFits(ctx context.Context, man *remote.Manifest, bf bootFiles) error {
	now := m.goldenInputs(ctx, bf)
	gc := &goldenConfig{SnapshotMeta: vmm.SnapshotMeta{Backend: man.Backend, Accel: vmm.Accel(man.Accel), VMMVersion: man.VMMVersion,
		KernelSHA256: man.KernelSHA256, InitrdSHA256: man.InitrdSHA256}, RootfsFingerprint: man.RootfsFingerprint}
	if man.Kind == remote.KindCheckpoint {
		// A checkpoint carries its whole disk: the local rootfs is not used.
		now.Rootfs = bootFileID{ID: storage.ContentIDPrefix + "unused"}
		gc.RootfsFingerprint = now.Rootfs.ID
	}
	why := staleWhy(gc, now)
	if why == "" {
		why = cpuWhy(man.Accel, man.CPUModel, cpuModel())
	}
	if why == "" && man.HasNet && !m.cfg.NetworkEnabled() {
		why = "it has a NIC and this host runs without networking"
	}
	if why == "" {
		return nil
	}
	hint := "run it on a host with the same backend, QEMU and image as " + man.Host + ", or push one taken on this host"
	if man.Backend != now.Backend {
		hint = "pull it on a host whose server runs the " + man.Backend + " backend (vmm in the server's config)"
	}
	return errdefs.WithHint(fmt.Errorf("%w: remote %s %s (pushed from %s) cannot run on this host: %s", errdefs.ErrInvalidArgument, man.Kind, man.Key, man.Host, why), hint)
}

// cpuWhy says why a snapshot taken under accel on a host CPU named
// taken cannot run on a host CPU named here, or "". Under KVM the guest
// sees the host's CPU (QEMU's -cpu host), so the model must match; under
// TCG it sees QEMU's own model, the same on every host.
func cpuWhy(accel, taken, here string) string {
	if vmm.Accel(accel) != vmm.AccelKVM || taken == "" || taken == here {
		return ""
	}
	return fmt.Sprintf("it was taken under KVM on a %s CPU, this host has a %s (the guest sees the host's CPU model)", taken, here)
}

// readRemote reads a manifest and names a missing one clearly.
func readRemote(ctx context.Context, st remote.Store, key, what, hint string) (*remote.Manifest, []byte, error) {
	man, raw, err := remote.ReadManifest(ctx, st, key)
	if errors.Is(err, errdefs.ErrNotFound) {
		return nil, nil, errdefs.WithHint(fmt.Errorf("%w: no %s in the remote store", errdefs.ErrNotFound, what), hint)
	}
	return man, raw, err
}

// localFile makes dst a file of this host with f's content, when there
// is one, instead of a download: the base image a pushed disk chain starts
// from is usually the rootfs this host has too (linked from its pinned
// copy, see bases.go), and a later checkpoint of a VM shares its lower
// disk layers with an earlier one this host pulled. What it links is
// checked against f's identity after the pull like a download.
func (m *Manager) localFile(bf bootFiles) func(ctx context.Context, f remote.File, dst string) bool {
	return func(ctx context.Context, f remote.File, dst string) bool {
		if fi, err := os.Stat(bf.Rootfs); err == nil && fi.Size() == f.Size {
			if id, err := m.ids.Get(ctx, bf.Rootfs, storage.IDSparseSHA256); err == nil && id == f.SHA256 {
				if p, err := m.pinBase(ctx, bf.Rootfs); err == nil && linkOrCopyFile(ctx, m.copier, p, dst) == nil {
					return true
				}
			}
		}
		if p := m.pulledFile(f); p != "" && linkOrCopyFile(ctx, m.copier, p, dst) == nil {
			return true
		}
		return false
	}
}

// pulledFile finds a file with f's identity in the snapshots pulled
// before, by their manifests (<remote>/<digest>.json beside each).
func (m *Manager) pulledFile(f remote.File) string {
	mfs, _ := filepath.Glob(filepath.Join(m.remoteDir(), "*.json"))
	for _, mf := range mfs {
		b, err := os.ReadFile(mf)
		if err != nil {
			continue
		}
		var man remote.Manifest
		if json.Unmarshal(b, &man) != nil {
			continue
		}
		for _, g := range man.Files {
			if g.SHA256 != f.SHA256 || g.Size != f.Size {
				continue
			}
			p := filepath.Join(strings.TrimSuffix(mf, ".json"), g.Name)
			if fi, err := os.Stat(p); err == nil && fi.Size() == f.Size {
				return p
			}
		}
	}
	return ""
}

// linkOrCopyFile makes dst the file src: a hard link, or a copy across
// filesystems.
func linkOrCopyFile(ctx context.Context, cp *storage.Copier, src, dst string) error {
	if err := os.Link(src, dst); err == nil {
		return nil
	}
	return cp.CopyFile(ctx, src, dst)
}

// pullCached returns the directory of the pulled snapshot of manifest man
// (raw: its bytes), pulling it from namespace ns when this host has not
// yet. The directory appears complete or not at all.
func (m *Manager) pullCached(ctx context.Context, st remote.Store, ns string, man *remote.Manifest, raw []byte, bf bootFiles) (string, *api.RemoteTransfer, error) {
	sum := sha256.Sum256(raw)
	dir := filepath.Join(m.remoteDir(), hex.EncodeToString(sum[:16]))
	what := "remote " + man.Kind + " " + man.Key
	l := m.goldenLock(dir)
	l.Lock()
	defer l.Unlock()
	if _, err := os.Stat(filepath.Join(dir, man.MetaFile)); err == nil {
		if _, err := m.verifySnapshot(ctx, dir, what); err == nil {
			if _, err := os.Stat(dir + ".json"); err != nil {
				os.WriteFile(dir+".json", raw, 0o600)
			}
			return dir, cachedTransfer(man), nil
		}
		m.log.Warn("a pulled snapshot is damaged; pulling it again", "dir", dir)
		m.pool.drain(dir)
		os.Remove(dir + ".json")
		os.RemoveAll(dir)
	}
	if err := m.checkFreeSpace("pulling " + what); err != nil {
		return "", nil, err
	}
	td, err := newTempDir(m.remoteDir(), "the pull's directory")
	if err != nil {
		return "", nil, err
	}
	defer td.cleanup()
	tmp := td.path
	s, err := remote.Pull(ctx, st, ns, man, tmp, remote.PullOptions{Parallel: m.cfg.Remote.ParallelOrDefault(), Local: m.localFile(bf)})
	if err != nil {
		return "", nil, classifyIOErr("pulling "+what, err)
	}
	crashpoint("remote.after-pull")
	// The snapshot's own checksums, as for any checkpoint.
	if _, err := m.verifySnapshot(ctx, tmp, what); err != nil {
		return "", nil, err
	}
	if err := syncTree(tmp); err != nil {
		return "", nil, classifyIOErr("syncing "+what, err)
	}
	if err := os.Rename(tmp, dir); err != nil {
		return "", nil, classifyIOErr("publishing "+what, err)
	}
	td.keep()
	// Its manifest beside it lets later pulls find its files (localFile).
	os.WriteFile(dir+".json", raw, 0o600)
	storage.FsyncDir(m.remoteDir())
	m.log.Info("remote snapshot pulled", "kind", man.Kind, "key", man.Key, "owner", man.Owner, "bytes_moved", s.BytesMoved,
		"chunks", s.Chunks, "local_files", s.LocalFiles, "ms", ms(s.Took))
	return dir, transferOf(s), nil
}

// CloneRemote starts a new VM of u, named req.As, from a checkpoint u
// pushed to the remote store (from any host).
func (m *Manager) CloneRemote(ctx context.Context, u *store.User, req api.RemoteCloneRequest) (*api.VM, error) {
	start := time.Now()
	st, err := m.remoteStore()
	if err != nil {
		return nil, err
	}
	if err := remote.ValidateKey(req.Key); err != nil {
		return nil, err
	}
	if err := api.ValidateVMName(req.As); err != nil {
		return nil, err
	}
	if _, err := m.store.GetVM(ctx, u.ID, req.As); err == nil {
		return nil, fmt.Errorf("%w: vm %q already exists", errdefs.ErrAlreadyExists, req.As)
	}
	ns := remoteNS(u)
	man, raw, err := readRemote(ctx, st, remote.CheckpointKey(ns, req.Key), "checkpoint "+req.Key+" of user "+u.Name,
		"push it first with `noid checkpoint push <vm> <checkpoint>` (keys are per user)")
	if err != nil {
		return nil, err
	}
	if man.Kind != remote.KindCheckpoint || man.Owner != u.Name {
		return nil, fmt.Errorf("%w: remote object %s is a %s of %s, not a checkpoint of %s", errdefs.ErrConflict, req.Key, man.Kind, man.Owner, u.Name)
	}
	bf, err := m.resolveBootFiles()
	if err != nil {
		return nil, err
	}
	if err := m.remoteFits(ctx, man, bf); err != nil {
		return nil, err
	}
	dir, tr, err := m.pullCached(ctx, st, ns, man, raw, bf)
	if err != nil {
		return nil, err
	}
	src := &store.VM{Name: man.Source, VCPUs: man.VCPUs, MemoryMiB: man.MemoryMiB, DiskBytes: man.DiskBytes, Accel: man.Accel,
		Kernel: bf.Kernel, Initrd: bf.Initrd, Network: netName(man.HasNet)}
	if man.HasNet {
		src.Tap = "remote" // the shape has a NIC
	}
	out, err := m.cloneFrom(ctx, u, src, dir, "remote checkpoint "+req.Key, "remote:"+req.Key, req.As, start)
	if err != nil {
		return nil, err
	}
	out.Pulled = tr
	return out, nil
}

// ListRemote lists the checkpoints u pushed and the goldens u may pull.
func (m *Manager) ListRemote(ctx context.Context, u *store.User) ([]*api.RemoteSnapshot, error) {
	st, err := m.remoteStore()
	if err != nil {
		return nil, err
	}
	out := []*api.RemoteSnapshot{}
	for _, prefix := range []string{remoteNS(u) + "/checkpoints/", remoteNS(u) + "/golden/", remote.SystemNS + "/golden/"} {
		keys, err := st.List(ctx, prefix)
		if err != nil {
			return nil, err
		}
		for _, k := range keys {
			if !strings.HasSuffix(k, "/manifest.json") {
				continue
			}
			man, _, err := remote.ReadManifest(ctx, st, k)
			if err != nil {
				m.log.Warn("unreadable remote manifest", "key", k, "err", err)
				continue
			}
			out = append(out, apiRemote(man))
		}
	}
	return out, nil
}

// remoteGolden returns the store and the spec of a golden push or pull
// (the server's defaults filling zeros in req).
func (m *Manager) remoteGolden(req api.GoldenRemoteRequest) (st remote.Store, vcpus, mem int, spec string, err error) {
	if st, err = m.remoteStore(); err != nil {
		return nil, 0, 0, "", err
	}
	vcpus, mem = req.VCPUs, req.MemoryMiB
	if vcpus == 0 {
		vcpus = m.cfg.DefaultVCPUs
	}
	if mem == 0 {
		mem = m.cfg.DefaultMemoryMiB
	}
	if vcpus < 0 || mem < 0 {
		return nil, 0, 0, "", fmt.Errorf("%w: vcpus and memory_mib must be positive", errdefs.ErrInvalidArgument)
	}
	return st, vcpus, mem, specDirName(vcpus, mem), nil
}

// goldenNS is where u's golden pushes go: admins publish for everyone.
func goldenNS(u *store.User) string {
	if u.IsAdmin {
		return remote.SystemNS
	}
	return remoteNS(u)
}

// PushGolden uploads u's golden snapshot for a spec (an admin's: the
// system one, published for every user).
func (m *Manager) PushGolden(ctx context.Context, u *store.User, req api.GoldenRemoteRequest) (*api.RemoteSnapshot, error) {
	st, vcpus, mem, spec, err := m.remoteGolden(req)
	if err != nil {
		return nil, err
	}
	dir := filepath.Join(m.goldenRoot(u), spec)
	l := m.goldenLock(dir)
	l.RLock()
	gc, err := readGoldenConfig(dir)
	var stage string
	var names []string
	if err == nil {
		stage, names, err = m.stageSnapshot(ctx, dir, vmm.GoldenConfig, &gc.SnapshotMeta)
	}
	l.RUnlock()
	if errors.Is(err, os.ErrNotExist) {
		return nil, errdefs.WithHint(fmt.Errorf("%w: you have no golden snapshot for %d vCPU/%d MiB", errdefs.ErrNotFound, vcpus, mem), "noid golden list; noid golden promote <vm> <checkpoint>")
	}
	if err != nil {
		return nil, classifyIOErr("staging the golden snapshot for the push", err)
	}
	defer os.RemoveAll(stage)
	ns := goldenNS(u)
	owner := u.Name
	if u.IsAdmin {
		owner = remote.SystemNS
	}
	man := m.baseManifest(remote.KindGolden, spec, owner, &gc.SnapshotMeta)
	man.Source, man.RootfsFingerprint, man.MetaFile = gc.Source, gc.RootfsFingerprint, vmm.GoldenConfig
	s, err := remote.Push(ctx, st, ns, remote.GoldenKey(ns, spec), stage, names, man, remote.PushOptions{Parallel: m.cfg.Remote.ParallelOrDefault()})
	if err != nil {
		m.log.Warn("golden push failed", "user", u.Name, "spec", spec, "err", err)
		return nil, err
	}
	m.log.Info("golden snapshot pushed", "user", u.Name, "spec", spec, "owner", owner, "bytes_moved", s.BytesMoved, "chunks", s.Chunks, "chunks_reused", s.Reused, "ms", ms(s.Took))
	out := apiRemote(man)
	out.Pushed = transferOf(s)
	return out, nil
}

// PullGolden makes a remote golden snapshot for a spec u's local one: u's
// own pushed golden if there is one, else the system one (for an admin,
// the system one, which becomes this host's system golden).
func (m *Manager) PullGolden(ctx context.Context, u *store.User, req api.GoldenRemoteRequest) (*api.Golden, error) {
	st, vcpus, mem, spec, err := m.remoteGolden(req)
	if err != nil {
		return nil, err
	}
	nss := []string{remote.SystemNS}
	if !u.IsAdmin {
		nss = []string{remoteNS(u), remote.SystemNS}
	}
	var man *remote.Manifest
	var raw []byte
	var ns string
	for _, ns = range nss {
		man, raw, err = remote.ReadManifest(ctx, st, remote.GoldenKey(ns, spec))
		if !errors.Is(err, errdefs.ErrNotFound) {
			break
		}
	}
	if errors.Is(err, errdefs.ErrNotFound) {
		return nil, errdefs.WithHint(fmt.Errorf("%w: no golden snapshot for %d vCPU/%d MiB in the remote store", errdefs.ErrNotFound, vcpus, mem),
			"push one with `noid golden push --vcpus N --memory MiB` from the host that has it")
	}
	if err != nil {
		return nil, err
	}
	if man.Kind != remote.KindGolden || man.VCPUs != vcpus || man.MemoryMiB != mem {
		return nil, fmt.Errorf("%w: remote golden %s/%s is a %s for %d vCPU/%d MiB", errdefs.ErrConflict, ns, spec, man.Kind, man.VCPUs, man.MemoryMiB)
	}
	bf, err := m.resolveBootFiles()
	if err != nil {
		return nil, err
	}
	if err := m.remoteFits(ctx, man, bf); err != nil {
		return nil, err
	}
	sum := sha256.Sum256(raw)
	origin := ns + "/golden/" + spec + "@" + hex.EncodeToString(sum[:])
	root := m.goldenRoot(u)
	final := filepath.Join(root, spec)
	if gc, err := readGoldenConfig(final); err == nil && gc.Remote == origin {
		g := m.apiGolden(ctx, final, gc, u, bf)
		g.Remote, g.Pulled = origin, cachedTransfer(man)
		return g, nil
	}
	use, err := m.store.UserUsage(ctx, u.ID)
	if err != nil {
		return nil, err
	}
	if err := m.checkGoldenQuota(u, spec, man.DataBytes(), use.CheckpointBytes); err != nil {
		return nil, err
	}
	if err := m.checkFreeSpace("pulling the golden snapshot " + spec); err != nil {
		return nil, err
	}
	td, err := newTempDir(root, "golden dir")
	if err != nil {
		return nil, err
	}
	defer td.cleanup()
	tmp := td.path
	s, err := remote.Pull(ctx, st, ns, man, tmp, remote.PullOptions{Parallel: m.cfg.Remote.ParallelOrDefault(), Local: m.localFile(bf)})
	if err != nil {
		return nil, classifyIOErr("pulling the golden snapshot "+spec, err)
	}
	gc, err := readGoldenConfig(tmp)
	if err != nil {
		return nil, fmt.Errorf("%w: the pulled golden's config: %v", errdefs.ErrConflict, err)
	}
	if _, err := m.verifySnapshot(ctx, tmp, "remote golden "+spec); err != nil {
		return nil, err
	}
	// A new golden here: new spares, its origin recorded.
	gc.PromotedAt, gc.Remote = time.Now().UTC(), origin
	gc.Source = "remote " + ns + " (" + gc.Source + ", pushed from " + man.Host + ")"
	if err := m.publishGolden(root, tmp, final, gc); err != nil {
		return nil, err
	}
	td.keep()
	defer m.pool.refill(final)
	m.log.Info("golden snapshot pulled", "user", u.Name, "spec", spec, "from", ns, "bytes_moved", s.BytesMoved, "chunks", s.Chunks, "local_files", s.LocalFiles, "ms", ms(s.Took))
	g := m.apiGolden(ctx, final, gc, u, bf)
	g.Remote, g.Pulled = origin, transferOf(s)
	return g, nil
}
