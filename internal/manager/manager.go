// Package manager owns noid's VM lifecycle: create (cold boot, golden
// snapshot or warm spare), exec and files through the guest agent,
// checkpoint, rewind and clone, golden snapshots, the warm pool, destroy,
// and the recovery and re-adoption of VMM processes after a restart. It
// drives the VMM backends, storage, networking, the sandbox and the store,
// and it is driven from Go: every operation takes a context first, typed
// requests and the calling user, and fails with errdefs errors. The HTTP
// API (package server) only decodes requests, calls a Manager and encodes
// its answers; tests and other front ends use a Manager directly.
//
// The layers: cmd → server (HTTP) → manager → vmm / storage / network /
// sandbox / store.
package manager

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"sync"

	"github.com/noid-vm/noid/internal/config"
	"github.com/noid-vm/noid/internal/errdefs"
	"github.com/noid-vm/noid/internal/network"
	"github.com/noid-vm/noid/internal/procfs"
	"github.com/noid-vm/noid/internal/remote"
	"github.com/noid-vm/noid/internal/sandbox"
	"github.com/noid-vm/noid/internal/storage"
	"github.com/noid-vm/noid/internal/store"
	"github.com/noid-vm/noid/internal/vmm"
	"github.com/noid-vm/noid/internal/vmm/firecracker"
	"github.com/noid-vm/noid/internal/vmm/qemu"
)

// Options configure a Manager.
type Options struct {
	// Config is the loaded configuration (required).
	Config *config.Config
	// Logger receives structured logs; nil uses slog.Default().
	Logger *slog.Logger
	// Backend overrides the VMM backend chosen from the config (tests).
	Backend vmm.Backend
	// WrapBackend, when set, wraps the backend that was chosen (tests use
	// it to hide a backend's optional interfaces, such as vmm.Preparer).
	WrapBackend func(vmm.Backend) vmm.Backend
	// Remote overrides the object store [remote] configures (tests).
	Remote remote.Store
}

// Server is the VM lifecycle of one data dir: it owns the VMs' runtimes,
// the warm pool, the network and the sandbox set-up. It is safe for
// concurrent use.
type Manager struct {
	cfg     *config.Config
	log     *slog.Logger
	store   *store.Store
	backend vmm.Backend
	accel   vmm.Accel
	copier  *storage.Copier
	// storage is what [storage] mode resolved to.
	storage storage.Decision
	// verifier checks snapshot files against their recorded checksums.
	verifier storage.Verifier
	// ids are the content identities of the boot files (golden staleness).
	ids     storage.ContentIDs
	metrics *metrics

	mu  sync.Mutex
	vms map[string]*vmRT // by VM id

	closed    chan struct{}
	closeOnce sync.Once
	// bg counts the manager's background loops, which end when closed is.
	bg sync.WaitGroup

	net  *network.Manager
	dns  *network.DNSServer
	pool *warmPool
	uids *sandbox.UIDPool

	goldenMu    sync.Mutex
	goldenLocks map[string]*sync.RWMutex
	// goldenViewMu serialises refreshes of the golden view (goldenview.go).
	goldenViewMu sync.Mutex

	// quota holds the checkpoint space reserved by checkpoints being
	// written (quota.go).
	quota quotaState

	sandbox sandboxState

	// remote is the [remote] object store, nil without one; remoteErr
	// says why a configured one cannot be used (remote.go).
	remote    remote.Store
	remoteErr error
}

// New opens the store, sets up storage (moving golden snapshots over when
// the storage root changed, see storageroot.go), selects the backend,
// sets up the network, and re-adopts the VMs an earlier server left
// running.
func New(ctx context.Context, opts Options) (*Manager, error) {
	cfg := opts.Config
	if cfg == nil {
		return nil, errors.New("server: nil config")
	}
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	for _, d := range []string{cfg.DataDir, filepath.Join(cfg.DataDir, "run")} {
		if err := privateDir(d, log); err != nil {
			return nil, err
		}
	}
	st, err := store.Open(ctx, filepath.Join(cfg.DataDir, "noid.db"))
	if err != nil {
		return nil, err
	}
	// Refuse a moved storage root before mounting anything for it.
	sw, err := planStorageSwitch(ctx, cfg, st)
	if err != nil {
		st.Close()
		return nil, err
	}
	if err := mountStorage(ctx, cfg, log); err != nil {
		st.Close()
		return nil, err
	}
	for _, d := range []string{cfg.StorageDir(), filepath.Join(cfg.StorageDir(), "users")} {
		if err := privateDir(d, log); err != nil {
			st.Close()
			return nil, err
		}
	}
	dec, err := storage.Decide(cfg.StorageDir(), cfg.Storage.Mode, configRoot(cfg).Image)
	if err != nil {
		if cfg.Storage.Mode == storage.SettingReflink {
			st.Close()
			return nil, err
		}
		log.Warn("storage: cannot probe for reflink support; making sparse copies", "dir", cfg.StorageDir(), "err", err)
	}
	log.Info("storage: "+dec.String(), "mode", dec.Setting, "resolved", dec.Resolved(), "dir", cfg.StorageDir())
	s := &Manager{
		cfg:     cfg,
		log:     log,
		store:   st,
		vms:     map[string]*vmRT{},
		closed:  make(chan struct{}),
		metrics: newMetrics(),
		copier:  &storage.Copier{NoReflink: dec.NoReflink()},
		storage: dec,
	}
	s.ids.Dir = filepath.Join(cfg.DataDir, "content-ids")
	if err := s.selectBackend(ctx, opts.Backend); err != nil {
		st.Close()
		return nil, err
	}
	if opts.WrapBackend != nil {
		s.backend = opts.WrapBackend(s.backend)
	}
	if err := s.setupNetwork(ctx); err != nil {
		st.Close()
		return nil, err
	}
	// Spares' TAPs of an earlier root are released through the network.
	if err := s.finishStorageSwitch(ctx, sw); err != nil {
		s.closeNetwork()
		st.Close()
		return nil, err
	}
	if err := s.recover(ctx); err != nil {
		s.closeNetwork()
		st.Close()
		return nil, err
	}
	s.sweepPool(ctx)
	s.sweepOrphanVMMs(ctx)
	spares := cfg.PoolSpares()
	if s.sandbox.refused != nil {
		spares = 0 // no VMM may start
	}
	s.setupRemote(opts.Remote)
	s.bg.Add(1)
	go s.primeBootFileIDs()
	s.pool = newWarmPool(s, spares)
	s.warmUp(ctx)
	s.bg.Add(1)
	go s.trimLogsLoop()
	// The default spec or the storage root may have changed.
	s.kickGoldenView()
	return s, nil
}

func (m *Manager) selectBackend(ctx context.Context, override vmm.Backend) error {
	kvm := vmm.ProbeKVM()
	if override != nil {
		m.backend = override
	} else {
		// Without its jailer, Firecracker would run as root without a
		// chroot: only when [sandbox] require is off.
		jailer := firecracker.JailerAuto
		if !m.cfg.SandboxRequired() {
			jailer = firecracker.JailerIfPresent
		}
		fc := firecracker.New(firecracker.Config{Binary: m.cfg.FirecrackerBinary, JailerMode: jailer, Logger: m.log})
		switch m.cfg.VMM {
		case "firecracker":
			err := fc.Check(ctx)
			switch {
			case errors.Is(err, firecracker.ErrNoJailer):
				// The server starts (VMs can be listed and destroyed);
				// no VMM does.
				m.sandbox.refused = errdefs.WithHint(err, "install Firecracker's jailer next to it, or set [sandbox] require = false to run it without")
				m.log.Error("sandbox: refusing to start VMMs", "err", err)
				m.backend = refuseVMMs(fc, m.sandbox.refused)
			case err != nil:
				return errdefs.WithHint(err, "install Firecracker v1.16.1+ with KVM, or set vmm = \"qemu\"")
			default:
				m.backend = fc
			}
		case "auto":
			// Firecracker when it is installed and KVM works; QEMU otherwise.
			if _, err := os.Stat(m.cfg.FirecrackerBinary); err == nil && kvm.Usable {
				if err := fc.Check(ctx); err == nil {
					m.backend = fc
				} else {
					m.log.Warn("firecracker found but not usable; using qemu", "err", err)
				}
			}
		}
		if m.backend == nil {
			m.backend = qemu.New(m.qemuOptions(ctx))
			if m.sandbox.refused != nil {
				m.backend = refuseVMMs(m.backend, m.sandbox.refused)
			}
		}
	}
	want := vmm.Accel(m.cfg.Accel)
	if m.backend.Name() == firecracker.BackendName {
		want = vmm.AccelKVM
	}
	accel, warn, err := vmm.ResolveAccel(want, kvm)
	if err != nil {
		return err
	}
	m.accel = accel
	if warn != "" {
		m.log.Warn(warn)
	}
	m.log.Info("vmm backend", "backend", m.backend.Name(), "accel", accel)
	if err := m.backend.Check(ctx); err != nil {
		// The server still starts (list, destroy and auth work), but creates
		// fail with this message.
		m.log.Warn("vmm backend unavailable", "backend", m.backend.Name(), "err", err)
	}
	return nil
}

// Store exposes the metadata store (used by admin subcommands and tests).
func (m *Manager) Store() *store.Store { return m.store }

// Accel returns the acceleration mode VMs run with.
func (m *Manager) Accel() vmm.Accel { return m.accel }

// StorageMode tells whether copies use reflink or sparse copying.
func (m *Manager) StorageMode() storage.Mode { return m.storage.Mode }

// StorageDecision is what [storage] mode resolved to at start-up, and why.
func (m *Manager) StorageDecision() storage.Decision { return m.storage }

// userDir is where a user's VMs and checkpoints live.
func (m *Manager) userDir(uid int64) string {
	return filepath.Join(m.cfg.StorageDir(), "users", fmt.Sprint(uid))
}

func (m *Manager) vmDir(v *store.VM) string {
	return filepath.Join(m.userDir(v.UserID), "vms", v.ID)
}

func (m *Manager) checkpointDir(c *store.Checkpoint) string {
	return filepath.Join(m.userDir(c.UserID), "checkpoints", c.ID)
}

func (m *Manager) runDir() string { return filepath.Join(m.cfg.DataDir, "run") }

// Config is the configuration the manager runs with.
func (m *Manager) Config() *config.Config { return m.cfg }

// BackendName is the VMM backend's name ("qemu", "firecracker").
func (m *Manager) BackendName() string { return m.backend.Name() }

// VMMVersion is the VMM binary's version, or "" when it cannot be read.
func (m *Manager) VMMVersion(ctx context.Context) string {
	v, _ := m.backend.Version(ctx)
	return v
}

// Close releases the manager's resources. VMs keep running; the next
// manager on the data dir re-adopts them.
func (m *Manager) Close() error {
	m.closeOnce.Do(func() {
		close(m.closed)
		m.bg.Wait()
		m.mu.Lock()
		rts := make([]*vmRT, 0, len(m.vms))
		for _, rt := range m.vms {
			rts = append(rts, rt)
		}
		m.mu.Unlock()
		for _, rt := range rts {
			rt.release()
		}
		m.pool.close()
		m.closeNetwork()
		m.store.Close()
	})
	return nil
}

// closeNetwork stops the DNS server. TAPs and rules stay: VMs keep their
// connectivity while the server is down.
func (m *Manager) closeNetwork() {
	if m.dns != nil {
		m.dns.Close()
	}
	if m.net != nil {
		m.net.Close()
	}
}

// privateDir creates dir with mode 0700, or gives an existing dir that
// mode when group or others have any access to it (a data dir made by hand,
// or by an older noid), saying so in the log: the database, the images and
// every VM's files live below it.
func privateDir(dir string, log *slog.Logger) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("creating %s: %w", dir, err)
	}
	fi, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("checking %s: %w", dir, err)
	}
	if mode := fi.Mode().Perm(); mode&0o077 != 0 {
		if err := os.Chmod(dir, 0o700); err != nil {
			return fmt.Errorf("making %s private (mode 0700): %w", dir, err)
		}
		log.Warn("made a data directory private: it was open to group or others", "dir", dir, "old_mode", fmt.Sprintf("%04o", mode), "mode", "0700")
	}
	return nil
}

// hostLimits are the ranges accepted for vcpus and memory.
func hostLimits() (maxVCPUs int, maxMemMiB int) {
	maxVCPUs = runtime.NumCPU()
	maxMemMiB = procfs.MeminfoMiB("MemTotal")
	if maxMemMiB <= 0 {
		maxMemMiB = 1 << 20
	}
	return
}

// checkHostMemory refuses to start a VM the host has no memory for: guest
// RAM is allocated lazily, so up to [quota] host_memory_overcommit times
// the host's available memory may be promised to one new VM.
func (m *Manager) checkHostMemory(memMiB int) error {
	avail := procfs.MeminfoMiB("MemAvailable")
	if avail < 0 {
		return nil
	}
	limit := int(float64(avail) * m.cfg.HostMemoryOvercommit())
	if memMiB > limit {
		return errdefs.WithHint(fmt.Errorf("%w: the host is out of memory: %d MiB available (%d MiB with overcommit), the VM needs %d MiB",
			errdefs.ErrResourceExhausted, avail, limit, memMiB), "destroy VMs, ask for less --memory, or raise [quota] host_memory_overcommit")
	}
	return nil
}
