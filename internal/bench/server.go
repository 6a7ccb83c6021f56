package bench

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
	"syscall"
	"time"

	"github.com/vishvananda/netns"

	"github.com/noid-vm/noid/client"
	"github.com/noid-vm/noid/internal/image"
	"github.com/noid-vm/noid/internal/network"
	"github.com/noid-vm/noid/internal/procfs"
	"github.com/noid-vm/noid/internal/storage"
)

// ServerOpts choose how a benchmark server is configured.
type ServerOpts struct {
	// Name labels the server in logs and its temp dir.
	Name string
	// Reflink keeps VM storage on a loop-mounted XFS ([storage] reflink_image_size).
	Reflink bool
	// Network enables VM networking; the server then runs in a new network
	// namespace that the benchmark creates and removes.
	Network bool
	// MemoryMiB is default_memory_mib.
	MemoryMiB int
	// Extra is raw TOML appended to the config (top-level keys only).
	Extra string
	// Image is the guest image (nil: the tiny one).
	Image *image.Image
	// Defaults writes the server's default configuration: only the paths
	// (data dir, socket, image), accel and log level are set, so memory,
	// networking (on: the server runs in its own network namespace), the
	// sandbox and the pool are the server's defaults. Reflink still adds
	// [storage] and --pool-spares still sets [pool].
	Defaults bool
	// PlainCopy writes [storage] reflink_image_size = "" (plain copies on
	// the data dir's filesystem; the default).
	PlainCopy bool
	// LogLevel is log_level (default "info").
	LogLevel string
}

// Server is one noid-server process the benchmark started, with its own
// temporary data dir.
type Server struct {
	Opts    ServerOpts
	Dir     string // temp dir holding everything
	DataDir string
	Socket  string
	Client  *client.Client
	Pid     int
	// Config is the config.toml it runs with.
	Config string

	cmd    *exec.Cmd
	exited chan struct{}
	ns     netns.NsHandle
	logMu  sync.Mutex
	log    bytes.Buffer // last ~256 KiB
	// prepared counts the warm spares prepared per snapshot
	// ("checkpoints/<id>"), from the server's debug log.
	prepared map[string]int
	b        *Bench
}

// StorageDir is where users/ and golden/ live.
func (s *Server) StorageDir() string {
	if s.Opts.Reflink {
		return filepath.Join(s.DataDir, "reflink")
	}
	return s.DataDir
}

// StorageKind names the storage for reports.
func (s *Server) StorageKind() string {
	if s.Opts.Reflink {
		return "reflink"
	}
	return "copy"
}

// startServer writes a config and starts noid-server on a fresh temp dir.
// The returned server is registered for cleanup.
func (b *Bench) startServer(ctx context.Context, so ServerOpts) (*Server, error) {
	if so.MemoryMiB == 0 && !so.Defaults {
		so.MemoryMiB = 256
	}
	if so.Defaults {
		so.Network = true // the server's default
	}
	if so.LogLevel == "" {
		so.LogLevel = "info"
	}
	dir, err := os.MkdirTemp(b.opts.TempDir, "noid-bench-"+so.Name+"-")
	if err != nil {
		return nil, err
	}
	s := &Server{Opts: so, Dir: dir, DataDir: filepath.Join(dir, "data"), Socket: filepath.Join(dir, "noid.sock"), b: b, ns: netns.None()}
	b.addCleanup("server "+so.Name, s.Close)
	img := so.Image
	if img == nil {
		img = b.art.Image
	}
	cfg := fmt.Sprintf("data_dir = %q\nsocket = %q\nkernel = %q\ninitrd = %q\nrootfs = %q\naccel = %q\nlog_level = %q\n",
		s.DataDir, s.Socket, img.Kernel, img.Initrd, img.Rootfs, b.opts.Accel, so.LogLevel)
	if !so.Defaults {
		cfg += fmt.Sprintf("default_memory_mib = %d\n", so.MemoryMiB)
	}
	if b.opts.QEMU != "" {
		cfg += fmt.Sprintf("qemu_binary = %q\n", b.opts.QEMU)
	}
	cfg += so.Extra + "\n"
	// The benchmarks measure the server, not the shipped quotas (they keep
	// up to 21 VMs alive at once).
	cfg += "[quota]\nmax_vms = 0\nmax_vcpus = 0\nmax_memory_mib = 0\nmax_checkpoint_bytes = 0\nmax_disk_size = \"0\"\n"
	if b.opts.PoolSpares >= 0 {
		cfg += fmt.Sprintf("[pool]\nspares = %d\n", b.opts.PoolSpares)
	}
	if so.Reflink {
		cfg += "[storage]\nreflink_image_size = \"24G\"\n"
	} else if so.PlainCopy {
		cfg += "[storage]\nreflink_image_size = \"\"\n"
	}
	switch {
	case so.Defaults:
	case so.Network:
		cfg += "[network]\nenabled = true\n"
	default:
		cfg += "[network]\nenabled = false\n"
	}
	s.Config = cfg
	cfgPath := filepath.Join(dir, "config.toml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		return nil, err
	}
	if so.Network {
		ns, err := network.NewNamespace()
		if err != nil {
			return nil, fmt.Errorf("creating a network namespace for the network benchmark: %w", err)
		}
		s.ns = ns
	}
	cmd := exec.Command(b.art.Server, "serve", "--config", cfgPath)
	pr, pw := io.Pipe()
	cmd.Stdout = pw
	cmd.Stderr = pw
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := network.InNamespace(s.ns, cmd.Start); err != nil {
		return nil, fmt.Errorf("starting noid-server: %w", err)
	}
	s.cmd = cmd
	s.Pid = cmd.Process.Pid
	s.exited = make(chan struct{})
	ready := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(pr)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		var once sync.Once
		for sc.Scan() {
			line := sc.Text()
			s.logMu.Lock()
			if s.log.Len() > 256<<10 {
				rest := s.log.Bytes()[128<<10:]
				s.log = *bytes.NewBuffer(append([]byte(nil), rest...))
			}
			s.log.WriteString(line + "\n")
			if snap := spareSnapshot(line); snap != "" {
				if s.prepared == nil {
					s.prepared = map[string]int{}
				}
				s.prepared[snap]++
			}
			s.logMu.Unlock()
			if strings.Contains(line, "msg=listening") {
				once.Do(func() { close(ready) })
			}
		}
		io.Copy(io.Discard, pr)
	}()
	go func() { cmd.Wait(); pw.Close(); close(s.exited) }()
	select {
	case <-ready:
	case <-s.exited:
		return nil, fmt.Errorf("noid-server exited during start-up:\n%s", s.LogTail(30))
	case <-time.After(2 * time.Minute):
		return nil, fmt.Errorf("noid-server did not start listening within 2 minutes:\n%s", s.LogTail(30))
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	c, err := client.New("unix://"+s.Socket, "")
	if err != nil {
		return nil, err
	}
	s.Client = c
	b.logf("started noid-server %q (pid %d, %s storage, network %v) in %s", so.Name, s.Pid, s.StorageKind(), so.Network, dir)
	return s, nil
}

// LogTail returns the last n lines the server logged.
func (s *Server) LogTail(n int) string {
	s.logMu.Lock()
	defer s.logMu.Unlock()
	lines := strings.Split(strings.TrimRight(s.log.String(), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// Close destroys every VM through the API, stops the server, kills any
// VMM process still running from its data dir (by pid), unmounts the reflink
// storage, drops the network namespace and removes the temp dir. It is safe
// to call twice.
func (s *Server) Close() error {
	if s.Dir == "" {
		return nil
	}
	var errs []error
	if s.cmd != nil {
		select {
		case <-s.exited:
		default:
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			if vms, err := s.Client.ListVMs(ctx); err == nil {
				for _, v := range vms {
					if _, err := s.Client.DestroyVM(ctx, v.Name); err != nil {
						errs = append(errs, fmt.Errorf("destroying %s: %w", v.Name, err))
					}
				}
			}
			cancel()
			s.cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-s.exited:
			case <-time.After(30 * time.Second):
				errs = append(errs, fmt.Errorf("noid-server %d did not stop on SIGTERM; killed", s.Pid))
				s.cmd.Process.Signal(syscall.SIGKILL)
				<-s.exited
			}
		}
	}
	// Anything still running from this dir is a VMM the server did not
	// stop (a leak, which the load benchmark reports separately).
	for _, pid := range pidsUsing(s.Dir) {
		errs = append(errs, fmt.Errorf("process %d still ran from %s; killed it", pid, s.Dir))
		syscall.Kill(pid, syscall.SIGKILL)
	}
	waitGone(pidsUsing(s.Dir), 10*time.Second)
	if s.Opts.Reflink {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		if err := storage.TeardownReflinkLoop(ctx, filepath.Join(s.DataDir, "reflink")); err != nil {
			errs = append(errs, err)
		}
		cancel()
	}
	if s.ns.IsOpen() {
		s.ns.Close()
		s.ns = netns.None()
	}
	if s.b.opts.Keep {
		s.b.logf("kept %s (--keep)", s.Dir)
	} else if err := os.RemoveAll(s.Dir); err != nil {
		errs = append(errs, err)
	}
	s.Dir = ""
	return errors.Join(errs...)
}

// pidsUsing lists processes whose command line mentions dir (the VMMs of a
// data dir: their memory, disk and log paths are under it).
func pidsUsing(dir string) []int {
	ents, _ := os.ReadDir("/proc")
	var out []int
	me := os.Getpid()
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == me {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		if err != nil || !bytes.Contains(b, []byte(dir+"/")) {
			continue
		}
		if procfs.Exited(pid) {
			continue
		}
		out = append(out, pid)
	}
	return out
}

func waitGone(pids []int, d time.Duration) {
	deadline := time.Now().Add(d)
	for _, p := range pids {
		for time.Now().Before(deadline) {
			if procfs.Exited(p) {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
}

// vmDir finds a VM's directory on disk by its id.
func (s *Server) vmDir(id string) string {
	m, _ := filepath.Glob(filepath.Join(s.StorageDir(), "users", "*", "vms", id))
	if len(m) == 0 {
		return ""
	}
	return m[0]
}

// checkpointDir finds a checkpoint's directory on disk by its id.
func (s *Server) checkpointDir(id string) string {
	m, _ := filepath.Glob(filepath.Join(s.StorageDir(), "users", "*", "checkpoints", id))
	if len(m) == 0 {
		return ""
	}
	return m[0]
}

// spareSnapshot returns the snapshot of a "warm pool: spare prepared" log
// line (logged at debug level), or "".
func spareSnapshot(line string) string {
	field := "snapshot="
	prefix := ""
	switch {
	case strings.Contains(line, `msg="warm pool: spare prepared"`):
	case strings.Contains(line, `msg="warm pool: golden spare running"`):
		// A running spare of a golden: counted as "golden/<spec>".
		field, prefix = "golden=", "golden/"
	default:
		return ""
	}
	for _, f := range strings.Fields(line) {
		if v, ok := strings.CutPrefix(f, field); ok {
			return prefix + strings.Trim(v, `"`)
		}
	}
	return ""
}

// SparesPrepared is how many warm spares the server has prepared for the
// checkpoint with id cpID (it must run with log_level "debug").
func (s *Server) SparesPrepared(cpID string) int { return s.sparesFor("checkpoints/" + cpID) }

// GoldenSparesRunning is how many running spares the server has started
// for the system golden of spec ("1x2048").
func (s *Server) GoldenSparesRunning(spec string) int { return s.sparesFor("golden/" + spec) }

func (s *Server) sparesFor(key string) int {
	s.logMu.Lock()
	defer s.logMu.Unlock()
	return s.prepared[key]
}

// WaitSparesPrepared waits until the server has prepared n warm spares in
// all for the checkpoint with id cpID, or until ctx ends. It reports
// whether it has.
func (s *Server) WaitSparesPrepared(ctx context.Context, cpID string, n int) bool {
	for s.SparesPrepared(cpID) < n {
		select {
		case <-ctx.Done():
			return false
		case <-time.After(10 * time.Millisecond):
		}
	}
	return true
}
