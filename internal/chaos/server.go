package chaos

import (
	"bufio"
	"bytes"
	"context"
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

	"github.com/noid-vm/noid/client"
	"github.com/vishvananda/netns"

	"github.com/noid-vm/noid/internal/image"
	"github.com/noid-vm/noid/internal/network"
)

// server is the one noid-server process a chaos run drives. It is killed
// with SIGKILL and started again on the same data dir, config and socket.
type server struct {
	bin     string
	dir     string // holds config, socket and data dir
	dataDir string
	config  string
	socket  string
	cgroup  string // [sandbox] cgroup_parent, private to this run
	client  *client.Client

	// ns is the network namespace the server (and so its VMMs) runs in
	// when networking is on; not open otherwise.
	ns netns.NsHandle

	cmd     *exec.Cmd
	exited  chan struct{}
	logMu   sync.Mutex
	log     bytes.Buffer // the last ~256 KiB
	logFile *os.File     // the whole log, when set
}

// newServer writes the config of a chaos server in dir, with its data dir
// at dataDir (on the run's own small filesystem): the tiny image
// under TCG, networking only when ns (the run's own network namespace, which
// the server then runs in) is open, no warm spares (every VMM of the data dir is
// then a listed VM's), no quotas, a cgroup parent and a uid range of its
// own so that leaks can be counted without seeing other servers'.
func newServer(dir, dataDir, bin string, img *image.Image, tag string, uidBase int64, ns netns.NsHandle) (*server, error) {
	s := &server{bin: bin, dir: dir, dataDir: dataDir, socket: filepath.Join(dir, "noid.sock"),
		config: filepath.Join(dir, "config.toml"), cgroup: "noid-chaos-" + tag, ns: ns}
	cfg := fmt.Sprintf("data_dir = %q\nsocket = %q\nkernel = %q\ninitrd = %q\nrootfs = %q\naccel = \"tcg\"\ndefault_memory_mib = 256\nlog_level = \"debug\"\n",
		s.dataDir, s.socket, img.Kernel, img.Initrd, img.Rootfs)
	cfg += "[quota]\nmax_vms = 0\nmax_vcpus = 0\nmax_memory_mib = 0\nmax_checkpoint_bytes = 0\nmax_disk_size = \"0\"\n"
	cfg += "[pool]\nspares = 0\n"
	cfg += fmt.Sprintf("[sandbox]\ncgroup_parent = %q\nuid_base = %d\nuid_count = 4096\n", s.cgroup, uidBase)
	if ns.IsOpen() {
		// The namespace is the run's own: the default bridge and pool.
		cfg += "[network]\nenabled = true\n"
	} else {
		cfg += "[network]\nenabled = false\n"
	}
	// The full-disk phase runs the data dir's filesystem out of space:
	// with the default reserve, every checkpoint would be refused up front
	// and the paths that meet ENOSPC half-way would go untested.
	cfg += "[storage]\nmin_free = \"0%\"\n"
	if err := os.WriteFile(s.config, []byte(cfg), 0o600); err != nil {
		return nil, fmt.Errorf("writing chaos server config %s: %w", s.config, err)
	}
	c, err := client.New("unix://"+s.socket, "")
	if err != nil {
		return nil, fmt.Errorf("chaos client for %s: %w", s.socket, err)
	}
	s.client = c
	return s, nil
}

// start launches noid-server and waits until it logs that it listens.
func (s *server) start(ctx context.Context) error {
	cmd := exec.Command(s.bin, "serve", "--config", s.config)
	pr, pw := io.Pipe()
	cmd.Stdout = pw
	cmd.Stderr = pw
	// Its own process group, so a signal meant for the chaos driver (^C)
	// does not reach it; VMMs are in groups of their own anyway.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := network.InNamespace(s.ns, cmd.Start); err != nil {
		return fmt.Errorf("starting noid-server %s: %w", s.bin, err)
	}
	s.cmd = cmd
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
				s.log = *bytes.NewBuffer(append([]byte(nil), s.log.Bytes()[128<<10:]...))
			}
			s.log.WriteString(line + "\n")
			if s.logFile != nil {
				s.logFile.WriteString(line + "\n")
			}
			s.logMu.Unlock()
			if strings.Contains(line, "msg=listening") {
				once.Do(func() { close(ready) })
			}
		}
		io.Copy(io.Discard, pr)
	}()
	exited := s.exited
	go func() { cmd.Wait(); pw.Close(); close(exited) }()
	select {
	case <-ready:
		return nil
	case <-exited:
		return fmt.Errorf("noid-server exited during start-up:\n%s", s.logTail(40))
	case <-time.After(2 * time.Minute):
		return fmt.Errorf("noid-server did not start listening within 2 minutes:\n%s", s.logTail(40))
	case <-ctx.Done():
		return ctx.Err()
	}
}

// running reports whether the server process has not exited.
func (s *server) running() bool {
	select {
	case <-s.exited:
		return false
	default:
		return true
	}
}

// pid is the running server's process id.
func (s *server) pid() int { return s.cmd.Process.Pid }

// kill sends SIGKILL to noid-server (only to it: its VMMs must live on)
// and waits until it is gone.
func (s *server) kill() error {
	if err := s.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		return fmt.Errorf("killing noid-server %d: %w", s.pid(), err)
	}
	select {
	case <-s.exited:
		return nil
	case <-time.After(time.Minute):
		return fmt.Errorf("noid-server %d still runs a minute after SIGKILL", s.pid())
	}
}

// stop asks noid-server to exit (SIGTERM) and waits for it.
func (s *server) stop() error {
	if s.cmd == nil {
		return nil
	}
	select {
	case <-s.exited:
		return nil
	default:
	}
	s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.exited:
		return nil
	case <-time.After(time.Minute):
		s.cmd.Process.Signal(syscall.SIGKILL)
		<-s.exited
		return fmt.Errorf("noid-server %d did not stop within a minute of SIGTERM; killed", s.pid())
	}
}

// logTail returns the last n lines the server logged.
func (s *server) logTail(n int) string {
	s.logMu.Lock()
	defer s.logMu.Unlock()
	lines := strings.Split(strings.TrimRight(s.log.String(), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// vmmPids lists the live processes whose command line names a path under
// the data dir: the VMMs of this server (the server's own command line
// names only its config, outside the data dir).
func (s *server) vmmPids() []int {
	ents, _ := os.ReadDir("/proc")
	var out []int
	needle := []byte(s.dataDir + "/")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		if err != nil || !bytes.Contains(b, needle) || !alive(pid) {
			continue
		}
		out = append(out, pid)
	}
	return out
}

// alive reports whether pid exists and is not a zombie.
func alive(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	// The state follows the command name in parentheses.
	i := bytes.LastIndexByte(b, ')')
	return i >= 0 && i+2 < len(b) && b[i+2] != 'Z' && b[i+2] != 'X'
}
