//go:build e2e

package e2e

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/creack/pty"

	"github.com/noid-vm/noid/client"
	"github.com/noid-vm/noid/internal/testutil"
)

// TestCoreExec covers acceptance 1 and 2 of the core issue on one VM.
func TestCoreExec(t *testing.T) {
	e := NewEnv(t)
	img := testutil.TinyImage(t)
	start := time.Now()
	r := e.CLI("", "create", "vm1")
	if r.Code != 0 {
		t.Fatalf("create: %d %s %s", r.Code, r.Stdout, r.Stderr)
	}
	t.Logf("create took %v: %s", time.Since(start), strings.TrimSpace(r.Stdout))

	t.Run("uname", func(t *testing.T) {
		r := e.CLI("", "exec", "vm1", "--", "uname", "-r")
		if r.Code != 0 || strings.TrimSpace(r.Stdout) != img.KernelRelease {
			t.Fatalf("uname -r = %q (code %d, stderr %q), want %q", r.Stdout, r.Code, r.Stderr, img.KernelRelease)
		}
	})
	t.Run("separate streams", func(t *testing.T) {
		r := e.CLI("", "exec", "vm1", "--", "sh", "-c", "echo to-out; echo to-err >&2")
		if r.Stdout != "to-out\n" || r.Stderr != "to-err\n" {
			t.Fatalf("stdout %q stderr %q", r.Stdout, r.Stderr)
		}
	})
	t.Run("exit code", func(t *testing.T) {
		if r := e.CLI("", "exec", "vm1", "--", "sh", "-c", "exit 7"); r.Code != 7 {
			t.Fatalf("exit code %d, want 7 (stderr %q)", r.Code, r.Stderr)
		}
	})
	t.Run("secret env", func(t *testing.T) {
		secret := "s3cr3t-" + fmt.Sprint(time.Now().UnixNano())
		r := e.CLI("", "exec", "vm1", "-e", "SECRET="+secret, "--", "sh", "-c", `echo "$SECRET"`)
		if strings.TrimSpace(r.Stdout) != secret {
			t.Fatalf("SECRET did not reach the process: %q %q", r.Stdout, r.Stderr)
		}
		if strings.Contains(e.Log(), secret) {
			t.Fatal("secret appears in the server log")
		}
		// The guest's RAM is never a file: nothing in the data dir holds
		// the secret, however large.
		filepath.Walk(filepath.Join(e.Dir, "data"), func(p string, fi os.FileInfo, err error) error {
			if err != nil || !fi.Mode().IsRegular() {
				return nil
			}
			if b, err := os.ReadFile(p); err == nil && bytes.Contains(b, []byte(secret)) {
				t.Errorf("secret appears in %s", p)
			}
			return nil
		})
	})
	t.Run("stdin", func(t *testing.T) {
		r := e.CLI("hi\n", "exec", "vm1", "--", "cat")
		if r.Stdout != "hi\n" {
			t.Fatalf("cat echoed %q (stderr %q)", r.Stdout, r.Stderr)
		}
	})
	t.Run("workdir and timeout", func(t *testing.T) {
		if r := e.CLI("", "exec", "vm1", "-w", "/tmp", "--", "pwd"); strings.TrimSpace(r.Stdout) != "/tmp" {
			t.Fatalf("pwd = %q", r.Stdout)
		}
		// 124 comes only from the agent's timer, after it killed and
		// reaped the sleep; the sleep ending by itself would give 0.
		r := e.CLI("", "exec", "vm1", "--timeout", "1s", "--", "sleep", "30")
		if r.Code != 124 {
			t.Fatalf("timeout: code %d, want 124 (stderr %q)", r.Code, r.Stderr)
		}
	})
	t.Run("parallel", func(t *testing.T) {
		var wg sync.WaitGroup
		errs := make(chan error, 8)
		for i := 0; i < 8; i++ {
			wg.Add(1)
			go func(i int) {
				defer wg.Done()
				var out bytes.Buffer
				st, err := e.Client.Exec(ctx(t), "vm1", client.ExecRequest{Argv: []string{"sh", "-c", fmt.Sprintf("echo job-%d; echo err-%d >&2", i, i)}}, client.ExecIO{Stdout: &out, Stderr: io.Discard})
				if err != nil || st.Code != 0 || out.String() != fmt.Sprintf("job-%d\n", i) {
					errs <- fmt.Errorf("job %d: %q code %d err %v", i, out.String(), st.Code, err)
				}
			}(i)
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
	})
	t.Run("16MiB", func(t *testing.T) {
		e.MustExec("vm1", "sh", "-c", "head -c 16777216 /dev/urandom > /tmp/big")
		want := strings.Fields(e.MustExec("vm1", "sha256sum", "/tmp/big"))[0]
		h := sha256.New()
		var n countWriter
		st := time.Now()
		res, err := e.Client.Exec(ctx(t), "vm1", client.ExecRequest{Argv: []string{"cat", "/tmp/big"}}, client.ExecIO{Stdout: io.MultiWriter(h, &n)})
		if err != nil || res.Code != 0 {
			t.Fatalf("16MiB exec: %v code %d", err, res.Code)
		}
		got := hex.EncodeToString(h.Sum(nil))
		if n != 16<<20 || got != want {
			t.Fatalf("got %d bytes sha256 %s, want %d bytes %s", n, got, 16<<20, want)
		}
		t.Logf("16 MiB in %v", time.Since(st))
	})
}

type countWriter int

func (c *countWriter) Write(p []byte) (int, error) { *c += countWriter(len(p)); return len(p), nil }

// TestCoreConsole drives `noid console` through a real PTY (acceptance 3).
func TestCoreConsole(t *testing.T) {
	e := NewEnv(t)
	e.Create("con")
	cmd := exec.Command(e.Bins.Noid, "console", "con")
	cmd.Env = append(os.Environ(), "NOID_URL=unix://"+e.Socket)
	f, err := pty.StartWithSize(cmd, &pty.Winsize{Rows: 30, Cols: 100})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	out := &syncBuf{}
	copied := make(chan struct{})
	go func() { io.Copy(out, f); close(copied) }()
	waitFor := func(what string) {
		t.Helper()
		deadline := time.Now().Add(60 * time.Second)
		for !strings.Contains(out.String(), what) {
			if time.Now().After(deadline) {
				t.Fatalf("console never showed %q; got:\n%s", what, out.String())
			}
			out.wait(200 * time.Millisecond)
		}
	}
	waitFor("Ctrl-]")
	f.Write([]byte("echo $((6*7))-console; stty size\r"))
	waitFor("42-console")
	waitFor("30 100")
	pty.Setsize(f, &pty.Winsize{Rows: 40, Cols: 120})
	cmd.Process.Signal(syscall.SIGWINCH)
	f.Write([]byte("stty size\r"))
	waitFor("40 120")
	f.Write([]byte{0x1d})
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("console exited with %v; output:\n%s", err, out.String())
		}
	case <-time.After(20 * time.Second):
		cmd.Process.Kill()
		t.Fatalf("console did not detach; output:\n%s", out.String())
	}
	// The console's last words may still be in the pty: read to its end
	// (EIO once the console, the only holder of its other side, is gone).
	select {
	case <-copied:
	case <-time.After(10 * time.Second):
		t.Error("the console's pty did not reach its end after the console exited")
	}
	if !strings.Contains(out.String(), "detached") {
		t.Errorf("no detach message in %q", out.String())
	}
	vm, err := e.Client.GetVM(ctx(t), "con")
	if err != nil || vm.State != "running" {
		t.Fatalf("vm after detach: %+v %v", vm, err)
	}
	if got := strings.TrimSpace(e.MustExec("con", "echo", "alive")); got != "alive" {
		t.Fatalf("exec after console: %q", got)
	}
}

type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
	ch chan struct{}
}

func (s *syncBuf) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ch != nil {
		close(s.ch)
		s.ch = nil
	}
	return s.b.Write(p)
}

func (s *syncBuf) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// wait blocks until the next write or the timeout.
func (s *syncBuf) wait(d time.Duration) {
	s.mu.Lock()
	if s.ch == nil {
		s.ch = make(chan struct{})
	}
	ch := s.ch
	s.mu.Unlock()
	select {
	case <-ch:
	case <-time.After(d):
	}
}

// TestCoreRestartAndDeath covers acceptance 4 and 5.
func TestCoreRestartAndDeath(t *testing.T) {
	e := NewEnv(t)
	e.Create("a")
	e.Create("b")
	e.Kill9()
	e.Start()
	vms, err := e.Client.ListVMs(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	if len(vms) != 2 {
		t.Fatalf("after restart: %d VMs listed", len(vms))
	}
	pids := map[string]int{}
	for _, v := range vms {
		if v.State != "running" {
			t.Fatalf("after restart %s is %s (%s)", v.Name, v.State, v.StateReason)
		}
		if got := strings.TrimSpace(e.MustExec(v.Name, "echo", "ok-"+v.Name)); got != "ok-"+v.Name {
			t.Fatalf("exec after restart: %q", got)
		}
		pids[v.Name] = v.PID
	}
	// Kill a VM's QEMU: it is reported dead. The server learns it from the
	// process's pidfd; the minute is a guard against a hang, and how long
	// it took is only logged (this machine is shared).
	syscall.Kill(pids["a"], syscall.SIGKILL)
	killed := time.Now()
	for {
		r := e.CLI("", "list", "--json")
		var list []client.VM
		if err := json.Unmarshal([]byte(r.Stdout), &list); err != nil {
			t.Fatalf("list --json: %v: %s", err, r.Stdout)
		}
		dead := false
		for _, v := range list {
			if v.Name == "a" && v.State == "dead" {
				dead = true
			}
		}
		if dead {
			break
		}
		if time.Since(killed) > time.Minute {
			t.Fatalf("vm a not reported dead a minute after its QEMU was killed: %s", r.Stdout)
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("dead reported after %v", time.Since(killed))
	// Exec on the dead VM fails with a clear message (the minute is a guard
	// against a hang, not a speed bound).
	st := time.Now()
	r := e.CLI("", "exec", "a", "--", "true")
	if r.Code == 0 || !strings.Contains(r.Stderr, "vm is not running") || time.Since(st) > time.Minute {
		t.Fatalf("exec on dead vm: code %d after %v: %s", r.Code, time.Since(st), r.Stderr)
	}
	// Destroy cleans up both: processes, directories and rows.
	vmB, _ := e.Client.GetVM(ctx(t), "b")
	e.MustCLI("destroy", "a", "b")
	if processAlive(vmB.PID) {
		t.Errorf("qemu of b (pid %d) still running after destroy", vmB.PID)
	}
	if vms, _ := e.Client.ListVMs(ctx(t)); len(vms) != 0 {
		t.Errorf("VMs left after destroy: %v", vms)
	}
	ents, _ := filepath.Glob(filepath.Join(e.Dir, "data", "users", "*", "vms", "*"))
	if len(ents) != 0 {
		t.Errorf("vm dirs left after destroy: %v", ents)
	}
	socks, _ := filepath.Glob(filepath.Join(e.Dir, "data", "run", "*"))
	if len(socks) != 0 {
		t.Errorf("sockets left after destroy: %v", socks)
	}
}

// TestCoreBadInput covers acceptance 6: every bad input gets a clear error.
func TestCoreBadInput(t *testing.T) {
	e := NewEnv(t)
	e.Create("ok")
	cases := []struct {
		args    []string
		code    int
		message string
	}{
		{[]string{"create", "Bad_Name"}, 1, "invalid vm name"},
		{[]string{"create", "-x"}, 2, "unknown shorthand"},
		{[]string{"create", strings.Repeat("a", 64)}, 1, "invalid vm name"},
		{[]string{"create", "ok"}, 1, "already exists"},
		{[]string{"create", "big", "--vcpus", "999"}, 1, "vcpus must be between"},
		{[]string{"create", "big", "--memory", "16"}, 1, "memory must be between"},
		{[]string{"create", "big", "--memory", "99999999"}, 1, "memory must be between"},
		{[]string{"create", "big", "--disk-size", "lots"}, 1, "disk size"},
		{[]string{"info", "nope"}, 1, "not found"},
		{[]string{"exec", "nope", "--", "true"}, 1, "not found"},
		{[]string{"destroy", "nope"}, 1, "not found"},
		{[]string{"exec"}, 2, "needs a VM name"},
		{[]string{"exec", "ok", "-e", "=nokey", "--", "true"}, 2, "KEY=VALUE"},
	}
	for _, c := range cases {
		r := e.CLI("", c.args...)
		if r.Code != c.code || !strings.Contains(r.Stderr, c.message) {
			t.Errorf("noid %s: code %d stderr %q; want code %d and %q", strings.Join(c.args, " "), r.Code, r.Stderr, c.code, c.message)
		}
	}
	// The API answers with the right statuses and a JSON error body.
	_, err := e.Client.CreateVM(ctx(t), client.CreateVMRequest{Name: "ok"})
	if !errors.Is(err, client.ErrAlreadyExists) {
		t.Errorf("duplicate create: %v, want ErrAlreadyExists", err)
	}
	_, err = e.Client.GetVM(ctx(t), "missing")
	if !errors.Is(err, client.ErrNotFound) {
		t.Errorf("get missing: %v", err)
	}
	// Nothing was half-created by the failures.
	vms, _ := e.Client.ListVMs(ctx(t))
	if len(vms) != 1 {
		t.Errorf("after bad creates: %d VMs", len(vms))
	}
	// "not found" carries a hint.
	if r := e.CLI("", "info", "nope"); !strings.Contains(r.Stderr, "hint: noid list") {
		t.Errorf("no hint in %q", r.Stderr)
	}
}

// TestCoreMissingParts: a missing kernel, rootfs or qemu binary, or forced
// KVM that is unusable, gives a one-line message saying what to do.
func TestCoreMissingParts(t *testing.T) {
	e := NewEnv(t)
	img := testutil.TinyImage(t)
	runServer := func(cfg string) (string, int) {
		p := filepath.Join(e.Dir, "other.toml")
		os.WriteFile(p, []byte(cfg), 0o600)
		cmd := exec.Command(e.Bins.Server, "serve", "--config", p)
		out, _ := cmd.CombinedOutput()
		return string(out), cmd.ProcessState.ExitCode()
	}
	other := fmt.Sprintf("data_dir = %q\nsocket = %q\n", filepath.Join(e.Dir, "other"), filepath.Join(e.Dir, "other.sock"))
	if !kvmUsable() {
		out, code := runServer("accel = \"kvm\"\n" + other)
		if code == 0 || !strings.Contains(out, `accel = "kvm" but`) || !strings.Contains(out, `set accel = "tcg"`) {
			t.Errorf("forced kvm: code %d: %s", code, out)
		}
	}
	if out, code := runServer("bogus_key = 1\n" + other); code == 0 || !strings.Contains(out, "bogus_key") {
		t.Errorf("unknown key: code %d: %s", code, out)
	}

	orig := readFile(t, e.Config)
	restart := func(cfg string) {
		os.WriteFile(e.Config, []byte(cfg), 0o600)
		e.Stop()
		e.Start()
	}
	for _, c := range []struct{ key, path string }{{"kernel", img.Kernel}, {"rootfs", img.Rootfs}} {
		restart(strings.Replace(orig, fmt.Sprintf("%s = %q", c.key, c.path), fmt.Sprintf("%s = %q", c.key, "/nonexistent/"+c.key), 1))
		r := e.CLI("", "create", "x-"+c.key)
		if r.Code != 1 || !strings.Contains(r.Stderr, c.key+" /nonexistent/"+c.key+" is missing") || !strings.Contains(r.Stderr, "hint:") {
			t.Errorf("missing %s: code %d stderr %q", c.key, r.Code, r.Stderr)
		}
	}
	restart("qemu_binary = \"/nonexistent/qemu-system-x86_64\"\n" + orig)
	r := e.CLI("", "create", "noqemu")
	if r.Code != 1 || !strings.Contains(r.Stderr, "apt-get install qemu-system-x86") {
		t.Errorf("missing qemu: code %d stderr %q", r.Code, r.Stderr)
	}
	restart(orig)
	if vms, _ := e.Client.ListVMs(ctx(t)); len(vms) != 0 {
		t.Errorf("failed creates left VMs: %v", vms)
	}
}

func readFile(t *testing.T, p string) string {
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func kvmUsable() bool {
	b, _ := os.ReadFile("/proc/cpuinfo")
	return bytes.Contains(b, []byte(" vmx")) || bytes.Contains(b, []byte(" svm"))
}

// processAlive reports whether pid runs (a zombie whose parent has not
// reaped it yet does not count).
func processAlive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	i := bytes.LastIndexByte(b, ')')
	return i > 0 && i+2 < len(b) && b[i+2] != 'Z' && b[i+2] != 'X'
}
