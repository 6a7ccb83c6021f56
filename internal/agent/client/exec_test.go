package client_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/noid-vm/noid/internal/agent/client"
	"github.com/noid-vm/noid/internal/agent/proto"
)

func TestExecStdoutStderrSeparate(t *testing.T) {
	c, _ := newClient(t)
	r := run(t, c, proto.ExecRequest{Argv: []string{"sh", "-c", "echo out; echo err >&2; echo out2"}}, nil)
	if r.err != nil {
		t.Fatal(r.err)
	}
	if r.stdout != "out\nout2\n" || r.stderr != "err\n" {
		t.Fatalf("stdout %q stderr %q", r.stdout, r.stderr)
	}
	if r.exit.Code != 0 || r.exit.Signal != 0 || r.exit.TimedOut {
		t.Fatalf("exit %+v", r.exit)
	}
}

func TestExecExitCodes(t *testing.T) {
	c, _ := newClient(t)
	r := run(t, c, proto.ExecRequest{Argv: []string{"sh", "-c", "exit 7"}}, nil)
	if r.err != nil || r.exit.Code != 7 {
		t.Fatalf("exit 7: got %+v, %v", r.exit, r.err)
	}
	r = run(t, c, proto.ExecRequest{Argv: []string{"sh", "-c", "kill -9 $$"}}, nil)
	if r.err != nil || r.exit.Signal != 9 || r.exit.Code != 128+9 {
		t.Fatalf("killed: got %+v, %v", r.exit, r.err)
	}
}

func TestExecStartFailure(t *testing.T) {
	c, _ := newClient(t)
	if !c.HasFeature(proto.FeatureExecUser) {
		t.Fatalf("the agent does not announce %s: %+v", proto.FeatureExecUser, c.Agent())
	}
	dir := t.TempDir()
	for name, content := range map[string]string{"data": "", "garbage": "\x01\x02 not a program\n", "badinterp": "#!/nonexistent/interp\n"} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for _, name := range []string{"garbage", "badinterp"} {
		if err := os.Chmod(filepath.Join(dir, name), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		req    proto.ExecRequest
		reason string
		msg    string
	}{
		{proto.ExecRequest{Argv: []string{"/nonexistent/program"}}, proto.ReasonNotFound, "/nonexistent/program: no such file or directory"},
		{proto.ExecRequest{Argv: []string{"nonexistent-cmd", "arg"}}, proto.ReasonNotFound, "nonexistent-cmd: command not found"},
		{proto.ExecRequest{Argv: []string{filepath.Join(dir, "data")}}, proto.ReasonNotExecutable, filepath.Join(dir, "data") + ": permission denied"},
		{proto.ExecRequest{Argv: []string{dir}}, proto.ReasonNotExecutable, dir + ": is a directory"},
		{proto.ExecRequest{Argv: []string{"./garbage"}, Cwd: dir}, proto.ReasonNotExecutable, "./garbage: exec format error"},
		{proto.ExecRequest{Argv: []string{"./badinterp"}, Cwd: dir}, proto.ReasonNotFound, "./badinterp: bad interpreter or loader: no such file or directory"},
		{proto.ExecRequest{Argv: []string{"true"}, Cwd: "/nonexistent-dir"}, proto.ReasonBadCwd, "working directory /nonexistent-dir: no such file or directory"},
		{proto.ExecRequest{Argv: []string{"true"}, Cwd: filepath.Join(dir, "data")}, proto.ReasonBadCwd, "working directory " + filepath.Join(dir, "data") + ": not a directory"},
		// The agent's EtcDir has no passwd: nobody but the default root exists.
		{proto.ExecRequest{Argv: []string{"true"}, User: "root"}, proto.ReasonUnknownUser, `no user "root" in the guest's /etc/passwd`},
	} {
		r := run(t, c, tc.req, nil)
		var se *client.StartError
		if !errors.As(r.err, &se) || r.exit.Code != -1 || se.Reason != tc.reason || se.Message != tc.msg || r.exit.Reason != tc.reason {
			t.Errorf("%q in %q as %q: exit %+v, err %v; want %s %q", tc.req.Argv, tc.req.Cwd, tc.req.User, r.exit, r.err, tc.reason, tc.msg)
		}
	}
	// The connection is still fine.
	if err := c.Ping(context.Background()); err != nil {
		t.Fatal(err)
	}
}

// TestExecAsUser runs processes as a user of the agent's /etc/passwd: its
// uid, gid, groups, HOME, USER and LOGNAME, its home as the working
// directory, its own terminal, and the user's permissions for the working
// directory and the program.
func TestExecAsUser(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to change uid")
	}
	c, e := newClient(t)
	base := t.TempDir()
	// t.TempDir's parent is private (0700): open both to everyone.
	for _, d := range []string{filepath.Dir(base), base} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	home := filepath.Join(base, "home")
	closed := filepath.Join(base, "closed")
	for _, d := range []string{home, closed} {
		if err := os.Mkdir(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Chown(home, 4242, 4243); err != nil {
		t.Fatal(err)
	}
	private := filepath.Join(base, "private-tool")
	if err := os.WriteFile(private, []byte("#!/bin/sh\necho ran\n"), 0o700); err != nil {
		t.Fatal(err)
	}
	passwd := "root:x:0:0:root:/root:/bin/sh\ntester:x:4242:4243:tester:" + home + ":/bin/sh\n"
	group := "root:x:0:\ntester:x:4243:\nextra:x:5000:someone,tester\nother:x:5001:someone\n"
	for name, content := range map[string]string{"passwd": passwd, "group": group} {
		if err := os.WriteFile(filepath.Join(e.etc, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}

	script := `id -u; id -g; id -G; echo "$HOME $USER $LOGNAME"; pwd`
	want := fmt.Sprintf("4242\n4243\n4243 5000\n%s tester tester\n%s\n", home, home)
	for _, user := range []string{"tester", "4242"} {
		r := run(t, c, proto.ExecRequest{Argv: []string{"sh", "-c", script}, User: user}, nil)
		if r.err != nil || r.exit.Code != 0 || r.stdout != want {
			t.Errorf("as %s: %+v, want stdout %q", user, r, want)
		}
	}
	// Root by name: uid 0 with root's HOME from passwd.
	r := run(t, c, proto.ExecRequest{Argv: []string{"sh", "-c", `id -u; echo "$HOME $USER"`}, User: "root"}, nil)
	if r.err != nil || r.stdout != "0\n/root root\n" {
		t.Errorf("as root: %+v", r)
	}
	// The user's terminal belongs to the user.
	r = run(t, c, proto.ExecRequest{Argv: []string{"sh", "-c", `id -u; stat -c %u "$(tty)"`}, User: "tester", TTY: true}, nil)
	if r.err != nil || strings.ReplaceAll(r.stdout, "\r", "") != "4242\n4242\n" {
		t.Errorf("tty as tester: %+v", r)
	}
	// What the user may not enter or run is refused before anything starts,
	// with a reason.
	var se *client.StartError
	r = run(t, c, proto.ExecRequest{Argv: []string{"true"}, User: "tester", Cwd: closed}, nil)
	if !errors.As(r.err, &se) || se.Reason != proto.ReasonBadCwd || !strings.Contains(se.Message, "permission denied for user tester") {
		t.Errorf("closed cwd: %+v", r)
	}
	r = run(t, c, proto.ExecRequest{Argv: []string{private}, User: "tester"}, nil)
	if !errors.As(r.err, &se) || se.Reason != proto.ReasonNotExecutable || se.Message != private+": permission denied" {
		t.Errorf("root-only program: %+v", r)
	}
	// Root may run it.
	if r = run(t, c, proto.ExecRequest{Argv: []string{private}}, nil); r.err != nil || r.stdout != "ran\n" {
		t.Errorf("root-only program as root: %+v", r)
	}
	// A user whose home is missing starts in /.
	passwd += "gone:x:4300:4300::/nonexistent:/bin/false\n"
	if err := os.WriteFile(filepath.Join(e.etc, "passwd"), []byte(passwd), 0o644); err != nil {
		t.Fatal(err)
	}
	r = run(t, c, proto.ExecRequest{Argv: []string{"sh", "-c", `pwd; echo "$HOME"`}, User: "gone"}, nil)
	if r.err != nil || r.stdout != "/\n/nonexistent\n" {
		t.Errorf("as gone: %+v", r)
	}
	r = run(t, c, proto.ExecRequest{Argv: []string{"true"}, User: "nosuchuser"}, nil)
	if !errors.As(r.err, &se) || se.Reason != proto.ReasonUnknownUser {
		t.Errorf("unknown user: %+v", r)
	}
}

func TestExecEnvAndDefaults(t *testing.T) {
	c, _ := newClient(t)
	r := run(t, c, proto.ExecRequest{
		Argv: []string{"sh", "-c", `printf '%s|%s|%s|%s' "$FOO" "$HOME" "$TERM" "$PATH"`},
		Env:  []string{"FOO=bar baz", "TERM=vt100", "garbage"},
	}, nil)
	if r.err != nil {
		t.Fatal(r.err)
	}
	parts := strings.Split(r.stdout, "|")
	if len(parts) != 4 || parts[0] != "bar baz" || parts[1] != "/root" || parts[2] != "vt100" || !strings.Contains(parts[3], "/usr/bin") {
		t.Fatalf("env output %q", r.stdout)
	}
	// The agent's own environment does not leak into processes.
	t.Setenv("NOID_AGENT_SECRET", "leak")
	r = run(t, c, proto.ExecRequest{Argv: []string{"sh", "-c", `printf '%s' "$NOID_AGENT_SECRET"`}}, nil)
	if r.stdout != "" {
		t.Fatalf("agent environment leaked: %q", r.stdout)
	}
}

func TestExecCwd(t *testing.T) {
	c, _ := newClient(t)
	dir := t.TempDir()
	want, _ := filepath.EvalSymlinks(dir)
	r := run(t, c, proto.ExecRequest{Argv: []string{"pwd", "-P"}, Cwd: dir}, nil)
	if r.err != nil || strings.TrimSpace(r.stdout) != want {
		t.Fatalf("pwd = %q (%v), want %q", r.stdout, r.err, want)
	}
}

func TestExecStdin(t *testing.T) {
	c, _ := newClient(t)
	r := run(t, c, proto.ExecRequest{Argv: []string{"cat"}}, []byte("hello\nworld\n"))
	if r.err != nil || r.stdout != "hello\nworld\n" || r.exit.Code != 0 {
		t.Fatalf("cat: %+v", r)
	}
	// Without Stdin the process reads /dev/null, and the host cannot write.
	p, err := c.Exec(context.Background(), proto.ExecRequest{Argv: []string{"cat"}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.Stdin().Write([]byte("x")); err == nil {
		t.Fatal("write to stdin of a process without Stdin succeeded")
	}
	r = collect(t, p, nil)
	if r.err != nil || r.stdout != "" || r.exit.Code != 0 {
		t.Fatalf("cat </dev/null: %+v", r)
	}
}

func TestExecParallel(t *testing.T) {
	c, _ := newClient(t)
	const n = 8
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := run(t, c, proto.ExecRequest{Argv: []string{"sh", "-c", fmt.Sprintf("sleep 0.2; echo %d; echo e%d >&2; exit %d", i, i, i)}}, nil)
			if r.err != nil || r.stdout != fmt.Sprintf("%d\n", i) || r.stderr != fmt.Sprintf("e%d\n", i) || r.exit.Code != i {
				errs <- fmt.Errorf("exec %d: %+v", i, r)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func sha(b []byte) string { s := sha256.Sum256(b); return fmt.Sprintf("%x", s) }

// TestExecLargeOutputByteExact sends 16 MiB through stdin and cat back out
// at the same time (both directions flow-controlled), and reads a 16 MiB
// file on stdout, checking both by sha256.
func TestExecLargeOutputByteExact(t *testing.T) {
	c, _ := newClient(t)
	data := make([]byte, 16<<20)
	_, _ = rand.Read(data)
	want := sha(data)

	r := run(t, c, proto.ExecRequest{Argv: []string{"cat"}}, data)
	if r.err != nil || r.exit.Code != 0 {
		t.Fatalf("cat: %v %+v", r.err, r.exit)
	}
	if len(r.stdout) != len(data) || sha([]byte(r.stdout)) != want {
		t.Fatalf("stdin->stdout: got %d bytes sha %s, want %d bytes sha %s", len(r.stdout), sha([]byte(r.stdout)), len(data), want)
	}

	f := filepath.Join(t.TempDir(), "big")
	if err := os.WriteFile(f, data, 0o644); err != nil {
		t.Fatal(err)
	}
	r = run(t, c, proto.ExecRequest{Argv: []string{"sh", "-c", `cat "$1"; cat "$1" >&2`, "sh", f}}, nil)
	if r.err != nil || r.exit.Code != 0 {
		t.Fatalf("cat file: %v %+v", r.err, r.exit)
	}
	if sha([]byte(r.stdout)) != want || sha([]byte(r.stderr)) != want {
		t.Fatalf("file output mismatch: stdout %d bytes, stderr %d bytes", len(r.stdout), len(r.stderr))
	}
}

func TestExecTTY(t *testing.T) {
	c, _ := newClient(t)
	p, err := c.Exec(context.Background(), proto.ExecRequest{
		Argv: []string{"sh", "-c", `tty; stty size; [ -t 0 ] && [ -t 1 ] && [ -t 2 ] && echo all-tty; read x; stty size; exit 3`},
		TTY:  true, Rows: 40, Cols: 100, Stdin: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	var acc bytes.Buffer
	readUntil(t, p.Stdout(), &acc, "all-tty")
	out := acc.String()
	if !strings.Contains(out, "/dev/pts/") || !strings.Contains(out, "40 100") {
		t.Fatalf("tty output %q", out)
	}
	if err := p.Resize(context.Background(), 50, 120); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Stdin().Write([]byte("go\n")); err != nil {
		t.Fatal(err)
	}
	readUntil(t, p.Stdout(), &acc, "50 120")
	r := collect(t, p, nil)
	if r.err != nil || r.exit.Code != 3 {
		t.Fatalf("tty exit: %+v", r)
	}
	if r.stderr != "" {
		t.Fatalf("tty stderr should be empty, got %q", r.stderr)
	}
}

func TestConsole(t *testing.T) {
	c, _ := newClient(t)
	p, err := c.Console(context.Background(), proto.ExecRequest{Rows: 30, Cols: 90})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.Stdin().Write([]byte("echo $((6*7))x; stty size; exit 5\n")); err != nil {
		t.Fatal(err)
	}
	r := collect(t, p, nil)
	if r.err != nil || r.exit.Code != 5 || !strings.Contains(r.stdout, "42x") || !strings.Contains(r.stdout, "30 90") {
		t.Fatalf("console: %+v", r)
	}
}

func TestExecSignal(t *testing.T) {
	c, _ := newClient(t)
	p, err := c.Exec(context.Background(), proto.ExecRequest{Argv: []string{"sleep", "100"}})
	if err != nil {
		t.Fatal(err)
	}
	// Sent right away: the agent applies controls once the process runs.
	if err := p.Signal(context.Background(), syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	r := collect(t, p, nil)
	if r.err != nil || r.exit.Signal != int(syscall.SIGTERM) || r.exit.Code != 128+15 {
		t.Fatalf("signal: %+v", r)
	}
	if err := p.Signal(context.Background(), syscall.SIGTERM); err == nil {
		t.Fatal("Signal after exit succeeded")
	}
}

func TestExecSignalReachesProcessGroup(t *testing.T) {
	c, _ := newClient(t)
	// The shell waits for a child; SIGINT to the group stops both.
	p, err := c.Exec(context.Background(), proto.ExecRequest{Argv: []string{"sh", "-c", "sleep 100; echo survived"}})
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Signal(context.Background(), syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	r := collect(t, p, nil)
	if r.err != nil || r.exit.Signal != 9 || strings.Contains(r.stdout, "survived") {
		t.Fatalf("group signal: %+v", r)
	}
}

// TestExecTimeout: a process past its timeout is killed and reported as
// timed out (code 124); sleep 100 could only end otherwise after run's own
// testTimeout, which fails the test.
func TestExecTimeout(t *testing.T) {
	c, _ := newClient(t)
	r := run(t, c, proto.ExecRequest{Argv: []string{"sh", "-c", "echo started; sleep 100"}, TimeoutMS: 300}, nil)
	if r.err != nil || r.exit.Code != 124 || !r.exit.TimedOut || r.stdout != "started\n" {
		t.Fatalf("timeout: %+v", r)
	}
	r = run(t, c, proto.ExecRequest{Argv: []string{"true"}, TimeoutMS: 10000}, nil)
	if r.exit.Code != 0 || r.exit.TimedOut {
		t.Fatalf("fast process with timeout: %+v", r)
	}
}

// A background child that keeps stdout open must not hold the exec open:
// the exec ends (within run's testTimeout, a guard against a hang) while
// the child still runs.
func TestExecBackgroundChildDoesNotHold(t *testing.T) {
	c, _ := newClient(t)
	r := run(t, c, proto.ExecRequest{Argv: []string{"sh", "-c", "sleep 100 & echo $!"}}, nil)
	if r.err != nil || r.exit.Code != 0 {
		t.Fatalf("bg: %+v", r)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(r.stdout))
	if err != nil {
		t.Fatalf("bg output %q", r.stdout)
	}
	defer syscall.Kill(pid, syscall.SIGKILL)
	if processGone(pid) {
		t.Fatal("background child should still run")
	}
}

// A consumer that never reads one stream must stall only that stream.
func TestStalledConsumerDoesNotBlockOthers(t *testing.T) {
	c, _ := newClient(t)
	// 4 MiB of output nobody reads: far more than the window.
	big, err := c.Exec(context.Background(), proto.ExecRequest{Argv: []string{"head", "-c", "4194304", "/dev/zero"}})
	if err != nil {
		t.Fatal(err)
	}
	// A process that never reads stdin while the host pushes 4 MiB into it.
	deaf, err := c.Exec(context.Background(), proto.ExecRequest{Argv: []string{"sleep", "100"}, Stdin: true})
	if err != nil {
		t.Fatal(err)
	}
	pushed := make(chan error, 1)
	go func() {
		_, err := deaf.Stdin().Write(make([]byte, 4<<20))
		pushed <- err
	}()
	for i := range 5 {
		r := run(t, c, proto.ExecRequest{Argv: []string{"echo", fmt.Sprint(i)}}, nil)
		if r.err != nil || r.stdout != fmt.Sprintf("%d\n", i) {
			t.Fatalf("exec %d while another stream is stalled: %+v", i, r)
		}
		if err := c.Ping(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	select {
	case err := <-pushed:
		t.Fatalf("4 MiB into a process that does not read finished early: %v", err)
	default:
	}
	// Now consume the stalled stream: all of it arrives.
	r := collect(t, big, nil)
	if r.err != nil || r.exit.Code != 0 || len(r.stdout) != 4<<20 {
		t.Fatalf("big output: %d bytes, %+v %v", len(r.stdout), r.exit, r.err)
	}
	if err := deaf.Signal(context.Background(), syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if err := waitTimeout(t, pushed, "stdin writer to fail after exit"); err == nil {
		t.Fatal("stdin write to an exited process succeeded")
	}
	if _, err := deaf.Wait(); err != nil {
		t.Fatal(err)
	}
}

func TestInfoAndPing(t *testing.T) {
	c, _ := newClient(t)
	if err := c.Ping(context.Background()); err != nil {
		t.Fatal(err)
	}
	info, err := c.Info(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if info.ProtocolVersion != proto.Version || info.Kernel == "" || info.UptimeNS <= 0 || info.Sessions != 1 || info.Init {
		t.Fatalf("info %+v", info)
	}
	if ack := c.Agent(); ack.PID != os.Getpid() || ack.Version != proto.Version {
		t.Fatalf("hello ack %+v", ack)
	}
}

func TestSync(t *testing.T) {
	c, e := newClient(t)
	entropy := bytes.Repeat([]byte{0xab}, 64)
	now := time.Unix(2000000000, 5)
	req := proto.Sync{TimeUnixNano: now.UnixNano(), Entropy: entropy, Identity: &proto.Identity{
		Hostname: "vm-1", MAC: "02:AA:00:00:00:02", IPv4: "172.16.0.5/24", Gateway: "172.16.0.1",
		DNS: []string{"172.16.0.1", "1.1.1.1"},
	}}
	res, err := c.Sync(context.Background(), req)
	if err != nil {
		t.Fatal(err)
	}
	if !res.ClockSet || res.ClockStepNS != now.Sub(time.Unix(1000, 0)).Nanoseconds() || res.EntropyBytes != 64 || !res.Reseeded {
		t.Fatalf("result %+v", res)
	}
	want := []string{"hostname", "hosts", "mac", "ipv4", "gateway", "dns"}
	if strings.Join(res.Changed, ",") != strings.Join(want, ",") {
		t.Fatalf("changed %v, want %v", res.Changed, want)
	}
	e.sys.mu.Lock()
	if len(e.sys.entropy) != 1 || !bytes.Equal(e.sys.entropy[0], entropy) || e.sys.reseeds != 1 ||
		e.sys.hostname != "vm-1" || e.sys.net.MAC != "02:aa:00:00:00:02" || e.sys.net.Gateway != "172.16.0.1" ||
		!e.sys.now.Equal(now) {
		t.Fatalf("system %+v", e.sys)
	}
	e.sys.mu.Unlock()
	read := func(name string) string {
		b, err := os.ReadFile(filepath.Join(e.etc, name))
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	if read("hostname") != "vm-1\n" {
		t.Fatalf("hostname file %q", read("hostname"))
	}
	if h := read("hosts"); !strings.Contains(h, "127.0.0.1\tlocalhost") || !strings.Contains(h, "172.16.0.5\tvm-1 # noid") {
		t.Fatalf("hosts file %q", h)
	}
	if r := read("resolv.conf"); !strings.Contains(r, "nameserver 172.16.0.1\nnameserver 1.1.1.1\n") {
		t.Fatalf("resolv.conf %q", r)
	}

	// Same identity again: nothing changes, no privileged calls.
	e.sys.mu.Lock()
	e.sys.calls = nil
	e.sys.mu.Unlock()
	res, err = c.Sync(context.Background(), proto.Sync{Identity: req.Identity})
	if err != nil || len(res.Changed) != 0 || res.ClockSet || res.EntropyBytes != 0 {
		t.Fatalf("second sync: %+v %v", res, err)
	}
	e.sys.mu.Lock()
	if len(e.sys.calls) != 0 {
		t.Fatalf("second sync made calls %v", e.sys.calls)
	}
	e.sys.mu.Unlock()

	// A new hostname replaces the managed hosts line, keeps the others.
	res, err = c.Sync(context.Background(), proto.Sync{Identity: &proto.Identity{Hostname: "vm-2"}})
	if err != nil || strings.Join(res.Changed, ",") != "hostname,hosts" {
		t.Fatalf("rename: %+v %v", res, err)
	}
	if h := read("hosts"); strings.Contains(h, "vm-1") || !strings.Contains(h, "127.0.1.1\tvm-2 # noid") || !strings.Contains(h, "localhost") {
		t.Fatalf("hosts after rename %q", h)
	}

	// Bad input is reported, not applied.
	res, err = c.Sync(context.Background(), proto.Sync{Identity: &proto.Identity{IPv4: "nonsense"}})
	if err == nil || len(res.Errors) != 1 {
		t.Fatalf("bad ipv4: %+v %v", res, err)
	}
}

// With a terminal too, a background child that keeps the terminal open
// (and ignores the hangup) does not hold the exec open: the exec ends
// while the child still runs.
func TestExecTTYBackgroundChildDoesNotHold(t *testing.T) {
	c, _ := newClient(t)
	r := run(t, c, proto.ExecRequest{Argv: []string{"sh", "-c", "trap '' HUP; sleep 100 & echo $!"}, TTY: true}, nil)
	if r.err != nil || r.exit.Code != 0 {
		t.Fatalf("bg: %+v", r)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(r.stdout))
	if err != nil {
		t.Fatalf("bg output %q", r.stdout)
	}
	defer syscall.Kill(pid, syscall.SIGKILL)
	if processGone(pid) {
		t.Fatal("background child should still run")
	}
}
