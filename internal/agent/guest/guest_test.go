package guest

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/noid-vm/noid/internal/agent/client"
	"github.com/noid-vm/noid/internal/agent/proto"
)

func TestMain(m *testing.M) {
	if os.Getenv("NOID_REAPER_CHILD") == "1" {
		os.Exit(reaperChild())
	}
	os.Exit(m.Run())
}

// reaperChild runs in a separate process (global reaping would steal the
// statuses of the test binary's other children): it acts as init for its
// descendants with PR_SET_CHILD_SUBREAPER and checks the global reaper.
func reaperChild() int {
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		fmt.Println("prctl:", err)
		return 1
	}
	r := NewReaper(true, nil)
	fail := func(format string, args ...any) int { fmt.Printf(format+"\n", args...); return 1 }
	// Many short-lived children, started back to back: each one's status
	// reaches its own waiter even when it exits before registration could
	// have happened.
	for i := range 200 {
		cmd := exec.Command("/bin/sh", "-c", fmt.Sprintf("exit %d", i%7))
		pid, ch, err := r.Start(cmd)
		if err != nil {
			return fail("start: %v", err)
		}
		select {
		case ws := <-ch:
			if ws.ExitStatus() != i%7 {
				return fail("pid %d: status %d, want %d", pid, ws.ExitStatus(), i%7)
			}
		case <-time.After(10 * time.Second):
			return fail("no status for pid %d", pid)
		}
	}
	// Orphans: the shell exits at once, its background children are
	// reparented to us and must be reaped, not left as zombies.
	_, ch, err := r.Start(exec.Command("/bin/sh", "-c", "sleep 0.1 & sleep 0.1 & true 3>&- & exit 0"))
	if err != nil {
		return fail("start: %v", err)
	}
	<-ch
	deadline := time.Now().Add(10 * time.Second)
	for r.Orphans() < 3 {
		if time.Now().After(deadline) {
			return fail("orphans reaped: %d, want 3", r.Orphans())
		}
		time.Sleep(5 * time.Millisecond)
	}
	if z := zombies(); len(z) > 0 {
		return fail("zombies left: %v", z)
	}
	// A starting failure does not leak a waiter or a zombie.
	if _, _, err := r.Start(exec.Command("/nonexistent")); err == nil {
		return fail("start of a missing program succeeded")
	}
	r.mu.Lock()
	n := len(r.waiters)
	r.mu.Unlock()
	if n != 0 {
		return fail("%d waiters left", n)
	}
	fmt.Println("reaper ok")
	return 0
}

// zombies lists our zombie children.
func zombies() []string {
	var out []string
	ents, _ := os.ReadDir("/proc")
	me := fmt.Sprint(os.Getpid())
	for _, e := range ents {
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		s := string(b)
		i := strings.LastIndexByte(s, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(s[i+1:])
		if len(f) > 2 && f[0] == "Z" && f[1] == me {
			out = append(out, e.Name())
		}
	}
	return out
}

func TestGlobalReaper(t *testing.T) {
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "NOID_REAPER_CHILD=1")
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "reaper ok") {
		t.Fatalf("reaper child: %v\n%s", err, out)
	}
}

func TestParseCmdline(t *testing.T) {
	c := ParseCmdline(`console=ttyS0 root=/dev/vda rw noid.hostname="my vm" quiet noid.transport=vsock root=/dev/vdb` + "\n")
	if c.Get("root", "") != "/dev/vdb" || c.Get("noid.hostname", "") != "my vm" || !c.Has("quiet") || c.Has("ro") ||
		c.Get("noid.transport", "") != "vsock" || c.Get("noid.vsock_port", "1024") != "1024" {
		t.Fatalf("parsed %v", c)
	}
}

func TestHostsWithIdentity(t *testing.T) {
	old := "127.0.0.1\tlocalhost\n10.0.0.9\tother\n127.0.1.1\tprev # noid\n"
	got := string(hostsWithIdentity([]byte(old), "vm", "172.16.0.2"))
	want := "127.0.0.1\tlocalhost\n10.0.0.9\tother\n172.16.0.2\tvm # noid\n"
	if got != want {
		t.Fatalf("got %q want %q", got, want)
	}
}

func TestBuildEnv(t *testing.T) {
	env := buildEnv([]string{"PATH=/x", "A=1", "=bad", "noequals", "A=2"}, true, nil)
	joined := strings.Join(env, "\n")
	if !strings.Contains(joined, "PATH=/x") || strings.Contains(joined, "/usr/bin") || !strings.Contains(joined, "TERM=xterm-256color") ||
		!strings.Contains(joined, "A=2") || strings.Contains(joined, "A=1") || strings.Contains(joined, "noequals") ||
		envGet(env, "HOME") != "/root" || envGet(env, "USER") != "" {
		t.Fatalf("env %q", env)
	}
	// A user brings HOME, USER and LOGNAME; the request's entries still win.
	u := &guestUser{Name: "noid", UID: 1000, GID: 1000, Home: "/home/noid"}
	env = buildEnv([]string{"LOGNAME=other"}, false, u)
	if envGet(env, "HOME") != "/home/noid" || envGet(env, "USER") != "noid" || envGet(env, "LOGNAME") != "other" || envGet(env, "TERM") != "dumb" {
		t.Fatalf("env with user %q", env)
	}
}

// ServePort on a real character device (a pty in raw mode standing in for
// a virtio-serial port): the *os.File path with the poller, deadlines and
// SIGIO plumbing.
func TestServePortOnCharDevice(t *testing.T) {
	master, slave, err := openPTY()
	if err != nil {
		t.Fatal(err)
	}
	defer master.Close()
	defer slave.Close()
	rc, _ := slave.SyscallConn()
	_ = rc.Control(func(fd uintptr) {
		tio, err := unix.IoctlGetTermios(int(fd), unix.TCGETS)
		if err != nil {
			t.Error(err)
			return
		}
		// cfmakeraw
		tio.Iflag &^= unix.IGNBRK | unix.BRKINT | unix.PARMRK | unix.ISTRIP | unix.INLCR | unix.IGNCR | unix.ICRNL | unix.IXON
		tio.Oflag &^= unix.OPOST
		tio.Lflag &^= unix.ECHO | unix.ECHONL | unix.ICANON | unix.ISIG | unix.IEXTEN
		tio.Cflag &^= unix.CSIZE | unix.PARENB
		tio.Cflag |= unix.CS8
		tio.Cc[unix.VMIN], tio.Cc[unix.VTIME] = 1, 0
		if err := unix.IoctlSetTermios(int(fd), unix.TCSETS, tio); err != nil {
			t.Error(err)
		}
	})
	port, err := OpenPort(fmt.Sprintf("/proc/self/fd/%d", fdOf(t, slave)))
	if err != nil {
		t.Fatal(err)
	}
	defer port.Close()
	a := New(Config{Logger: slog.New(slog.DiscardHandler), System: nopSystem{}, EtcDir: t.TempDir()})
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- a.ServePort(ctx, port) }()

	cctx, ccancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer ccancel()
	c, err := client.Connect(cctx, master, client.Options{})
	if err != nil {
		t.Fatal(err)
	}
	p, err := c.Exec(cctx, proto.ExecRequest{Argv: []string{"sh", "-c", "head -c 300000 /dev/zero | tr '\\0' x; exit 4"}})
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 64<<10)
	n := 0
	for {
		m, err := p.Stdout().Read(buf)
		n += m
		if err != nil {
			break
		}
	}
	e, err := p.Wait()
	if err != nil || e.Code != 4 || n != 300000 {
		t.Fatalf("exec over the port: %d bytes, %+v, %v", n, e, err)
	}
	cancel()
	select {
	case <-served:
	case <-time.After(10 * time.Second):
		t.Fatal("ServePort did not return after cancel")
	}
}

func fdOf(t *testing.T, f *os.File) int {
	rc, err := f.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var n int
	_ = rc.Control(func(fd uintptr) { n = int(fd) })
	return n
}

type nopSystem struct{}

func (nopSystem) Now() time.Time                    { return time.Now() }
func (nopSystem) SetClock(time.Time) error          { return syscall.EPERM }
func (nopSystem) AddEntropy([]byte) error           { return syscall.EPERM }
func (nopSystem) ReseedCRNG() error                 { return syscall.EPERM }
func (nopSystem) Hostname() (string, error)         { return "x", nil }
func (nopSystem) SetHostname(string) error          { return syscall.EPERM }
func (nopSystem) NetState(string) (NetState, error) { return NetState{}, nil }
func (nopSystem) SetMAC(string, string) error       { return syscall.EPERM }
func (nopSystem) SetIPv4(string, string) error      { return syscall.EPERM }
func (nopSystem) SetGateway(string, string) error   { return syscall.EPERM }
