// Package server is noid-server's core: it owns the VM lifecycle (create,
// exec, checkpoint, restore, destroy), re-adopts VMM processes after a
// restart, and serves the REST and WebSocket API on a unix socket (peer
// credentials) and optionally on TCP (tokens).
package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"time"

	"github.com/noid-vm/noid/internal/config"
	"github.com/noid-vm/noid/internal/errdefs"
	"github.com/noid-vm/noid/internal/network"
	"github.com/noid-vm/noid/internal/sandbox"
	"github.com/noid-vm/noid/internal/storage"
	"github.com/noid-vm/noid/internal/store"
	"github.com/noid-vm/noid/internal/vmm"
	"github.com/noid-vm/noid/internal/vmm/firecracker"
	"github.com/noid-vm/noid/internal/vmm/qemu"
)

// Version is noid-server's version, set at build time with
// -ldflags "-X github.com/noid-vm/noid/internal/server.Version=…".
var Version = "0.1.0-dev"

// Options configure a Server.
type Options struct {
	// Config is the loaded configuration (required).
	Config *config.Config
	// Logger receives structured logs; nil uses slog.Default().
	Logger *slog.Logger
	// Backend overrides the VMM backend chosen from the config (tests).
	Backend vmm.Backend
}

// Server is a running noid-server.
type Server struct {
	cfg     *config.Config
	log     *slog.Logger
	store   *store.Store
	backend vmm.Backend
	accel   vmm.Accel
	copier  *storage.Copier
	storage storage.Mode
	// verifier checks snapshot files against their recorded checksums.
	verifier storage.Verifier
	metrics  *metrics

	mu  sync.Mutex
	vms map[string]*vmRT // by VM id

	httpMu    sync.Mutex
	listeners []net.Listener
	https     []*http.Server
	closed    chan struct{}
	closeOnce sync.Once
	limiter   *authLimiter

	net  *network.Manager
	dns  *network.DNSServer
	pool *warmPool
	uids *sandbox.UIDPool

	goldenMu    sync.Mutex
	goldenLocks map[string]*sync.RWMutex

	sandbox sandboxState
}

// New opens the store, selects the backend and re-adopts the VMs an earlier
// server left running. It does not start listening; call Serve.
func New(ctx context.Context, opts Options) (*Server, error) {
	cfg := opts.Config
	if cfg == nil {
		return nil, errors.New("server: nil config")
	}
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	for _, d := range []string{cfg.DataDir, filepath.Join(cfg.DataDir, "run")} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, fmt.Errorf("creating %s: %w", d, err)
		}
	}
	if err := setupStorage(ctx, cfg, log); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Join(cfg.StorageDir(), "users"), 0o700); err != nil {
		return nil, fmt.Errorf("creating storage dir: %w", err)
	}
	st, err := store.Open(ctx, filepath.Join(cfg.DataDir, "noid.db"))
	if err != nil {
		return nil, err
	}
	s := &Server{
		cfg:     cfg,
		log:     log,
		store:   st,
		vms:     map[string]*vmRT{},
		closed:  make(chan struct{}),
		limiter: newAuthLimiter(),
		metrics: newMetrics(),
	}
	if err := s.selectBackend(ctx, opts.Backend); err != nil {
		st.Close()
		return nil, err
	}
	s.copier = &storage.Copier{}
	mode, err := storage.Probe(filepath.Join(cfg.StorageDir(), "users"))
	if err != nil {
		log.Warn("cannot probe storage for reflink support", "err", err)
	}
	s.storage = mode
	if mode == storage.ModeReflink {
		log.Info("storage: reflink (FICLONE) copies", "dir", cfg.StorageDir())
	} else {
		log.Info("storage: sparse copies; this filesystem has no reflink (set [storage] reflink_image_size to use a loop-mounted XFS)", "dir", cfg.StorageDir())
	}
	if err := s.setupNetwork(ctx); err != nil {
		st.Close()
		return nil, err
	}
	if err := s.recover(ctx); err != nil {
		s.closeNetwork()
		st.Close()
		return nil, err
	}
	s.sweepPool(ctx)
	s.pool = newWarmPool(s, cfg.PoolSpares())
	s.warmUp(ctx)
	return s, nil
}

func (s *Server) selectBackend(ctx context.Context, override vmm.Backend) error {
	kvm := vmm.ProbeKVM()
	if override != nil {
		s.backend = override
	} else {
		fc := firecracker.New(firecracker.Config{Binary: s.cfg.FirecrackerBinary, Logger: s.log})
		switch s.cfg.VMM {
		case "firecracker":
			if err := fc.Check(ctx); err != nil {
				return errdefs.WithHint(err, "install Firecracker v1.16.1+ with KVM, or set vmm = \"qemu\"")
			}
			s.backend = fc
		case "auto":
			// Firecracker when it is installed and KVM works; QEMU otherwise.
			if _, err := os.Stat(s.cfg.FirecrackerBinary); err == nil && kvm.Usable {
				if err := fc.Check(ctx); err == nil {
					s.backend = fc
				} else {
					s.log.Warn("firecracker found but not usable; using qemu", "err", err)
				}
			}
		}
		if s.backend == nil {
			s.backend = qemu.New(s.qemuOptions(ctx))
		}
	}
	want := vmm.Accel(s.cfg.Accel)
	if s.backend.Name() == firecracker.BackendName {
		want = vmm.AccelKVM
	}
	accel, warn, err := vmm.ResolveAccel(want, kvm)
	if err != nil {
		return err
	}
	s.accel = accel
	if warn != "" {
		s.log.Warn(warn)
	}
	s.log.Info("vmm backend", "backend", s.backend.Name(), "accel", accel)
	if err := s.backend.Check(ctx); err != nil {
		// The server still starts (list, destroy and auth work), but creates
		// fail with this message.
		s.log.Warn("vmm backend unavailable", "backend", s.backend.Name(), "err", err)
	}
	return nil
}

// Store exposes the metadata store (used by admin subcommands and tests).
func (s *Server) Store() *store.Store { return s.store }

// Accel returns the acceleration mode VMs run with.
func (s *Server) Accel() vmm.Accel { return s.accel }

// StorageMode tells whether copies use reflink or sparse copying.
func (s *Server) StorageMode() storage.Mode { return s.storage }

// userDir is where a user's VMs and checkpoints live.
func (s *Server) userDir(uid int64) string {
	return filepath.Join(s.cfg.StorageDir(), "users", fmt.Sprint(uid))
}

func (s *Server) vmDir(v *store.VM) string {
	return filepath.Join(s.userDir(v.UserID), "vms", v.ID)
}

func (s *Server) checkpointDir(c *store.Checkpoint) string {
	return filepath.Join(s.userDir(c.UserID), "checkpoints", c.ID)
}

func (s *Server) runDir() string { return filepath.Join(s.cfg.DataDir, "run") }

// Serve listens on the unix socket (and the TCP address if configured) and
// serves until ctx ends or Close is called.
func (s *Server) Serve(ctx context.Context) error {
	ul, err := listenUnix(s.cfg.Socket)
	if err != nil {
		return err
	}
	s.log.Info("listening", "socket", s.cfg.Socket)
	errc := make(chan error, 2)
	s.serveOn(ul, true, errc)
	if s.cfg.Listen != "" {
		tl, err := net.Listen("tcp", s.cfg.Listen)
		if err != nil {
			ul.Close()
			return fmt.Errorf("listening on %s: %w", s.cfg.Listen, err)
		}
		s.log.Info("listening", "addr", tl.Addr().String(), "tls", s.cfg.TLSCert != "")
		s.serveOn(tl, false, errc)
	}
	select {
	case <-ctx.Done():
	case <-s.closed:
	case err = <-errc:
	}
	s.shutdownHTTP()
	return err
}

// ServeListener serves the API on an existing listener; local marks a unix
// socket whose peers are identified by their credentials.
func (s *Server) ServeListener(l net.Listener, local bool) {
	s.serveOn(l, local, make(chan error, 1))
}

func (s *Server) serveOn(l net.Listener, local bool, errc chan<- error) {
	hs := &http.Server{
		Handler:           s.Handler(local),
		ReadHeaderTimeout: 10 * time.Second,
		ConnContext:       connContext,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
	}
	s.httpMu.Lock()
	s.listeners = append(s.listeners, l)
	s.https = append(s.https, hs)
	s.httpMu.Unlock()
	go func() {
		var err error
		if !local && s.cfg.TLSCert != "" {
			err = hs.ServeTLS(l, s.cfg.TLSCert, s.cfg.TLSKey)
		} else {
			err = hs.Serve(l)
		}
		if err != nil && !errors.Is(err, http.ErrServerClosed) {
			select {
			case errc <- err:
			default:
			}
		}
	}()
}

func listenUnix(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("creating socket dir: %w", err)
	}
	// A stale socket from a crashed server is removed; a live one is refused.
	if c, err := net.DialTimeout("unix", path, 200*time.Millisecond); err == nil {
		c.Close()
		return nil, fmt.Errorf("another noid-server is already listening on %s", path)
	}
	os.Remove(path)
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("listening on %s: %w", path, err)
	}
	// Every local user may connect; the peer's uid decides who they are.
	if err := os.Chmod(path, 0o666); err != nil {
		l.Close()
		return nil, err
	}
	return l, nil
}

func (s *Server) shutdownHTTP() {
	s.httpMu.Lock()
	hs := s.https
	s.https = nil
	s.httpMu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for _, h := range hs {
		h.Shutdown(ctx)
	}
}

// Close stops serving and releases resources. VMs keep running; the next
// server re-adopts them.
func (s *Server) Close() error {
	s.closeOnce.Do(func() {
		close(s.closed)
		s.shutdownHTTP()
		s.mu.Lock()
		rts := make([]*vmRT, 0, len(s.vms))
		for _, rt := range s.vms {
			rts = append(rts, rt)
		}
		s.mu.Unlock()
		for _, rt := range rts {
			rt.release()
		}
		s.pool.close()
		s.closeNetwork()
		s.store.Close()
	})
	return nil
}

// closeNetwork stops the DNS server. TAPs and rules stay: VMs keep their
// connectivity while the server is down.
func (s *Server) closeNetwork() {
	if s.dns != nil {
		s.dns.Close()
	}
	if s.net != nil {
		s.net.Close()
	}
}

// storageRootFile records which storage root the VMs were created under.
const storageRootFile = "storage-root"

// setupStorage mounts the reflink image when configured, and refuses to
// start when the storage root changed under existing VMs.
func setupStorage(ctx context.Context, cfg *config.Config, log *slog.Logger) error {
	if cfg.Storage.ReflinkImageSize != "" {
		size, _ := config.ParseSize(cfg.Storage.ReflinkImageSize)
		mnt := cfg.StorageDir()
		if err := storage.SetupReflinkLoop(ctx, cfg.Storage.ReflinkImage, mnt, size); err != nil {
			return fmt.Errorf("setting up reflink storage %s on %s: %w", cfg.Storage.ReflinkImage, mnt, err)
		}
		log.Info("reflink storage mounted", "image", cfg.Storage.ReflinkImage, "mount", mnt, "size", cfg.Storage.ReflinkImageSize)
	}
	rec := filepath.Join(cfg.DataDir, storageRootFile)
	prev, err := os.ReadFile(rec)
	if err == nil && strings.TrimSpace(string(prev)) != cfg.StorageDir() {
		if ents, _ := os.ReadDir(filepath.Join(strings.TrimSpace(string(prev)), "users")); len(ents) > 0 {
			return fmt.Errorf("%w: the storage root changed from %s to %s but VMs still live in the old one; destroy them first or revert [storage]",
				errdefs.ErrInvalidArgument, strings.TrimSpace(string(prev)), cfg.StorageDir())
		}
	}
	return os.WriteFile(rec, []byte(cfg.StorageDir()+"\n"), 0o600)
}

// hostLimits are the ranges accepted for vcpus and memory.
func hostLimits() (maxVCPUs int, maxMemMiB int) {
	maxVCPUs = runtime.NumCPU()
	maxMemMiB = meminfoMiB("MemTotal")
	if maxMemMiB <= 0 {
		maxMemMiB = 1 << 20
	}
	return
}

// meminfoMiB reads one field of /proc/meminfo, in MiB (-1 if absent).
func meminfoMiB(field string) int {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return -1
	}
	for _, line := range strings.Split(string(b), "\n") {
		var kb int
		if n, _ := fmt.Sscanf(line, field+": %d kB", &kb); n == 1 {
			return kb / 1024
		}
	}
	return -1
}

// checkHostMemory refuses to start a VM the host has no memory for: guest
// RAM is allocated lazily, so up to [quota] host_memory_overcommit times
// the host's available memory may be promised to one new VM.
func (s *Server) checkHostMemory(memMiB int) error {
	avail := meminfoMiB("MemAvailable")
	if avail < 0 {
		return nil
	}
	limit := int(float64(avail) * s.cfg.HostMemoryOvercommit())
	if memMiB > limit {
		return errdefs.WithHint(fmt.Errorf("%w: the host is out of memory: %d MiB available (%d MiB with overcommit), the VM needs %d MiB",
			errdefs.ErrResourceExhausted, avail, limit, memMiB), "destroy VMs, ask for less --memory, or raise [quota] host_memory_overcommit")
	}
	return nil
}
