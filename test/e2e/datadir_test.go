//go:build e2e

package e2e

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netns"

	"github.com/noid-vm/noid/client"
	"github.com/noid-vm/noid/internal/testutil"
)

// Issue 20: one server per data dir, and one noid network per network
// namespace.

// runRefusedServe runs `noid-server serve --config cfg` in ns and returns
// what it printed and its exit status. The test fails if it is still
// running after a minute: it was not refused.
func runRefusedServe(t *testing.T, ns netns.NsHandle, cfg string) Result {
	t.Helper()
	cmd := exec.Command(testutil.Build(t).Server, "serve", "--config", cfg)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := startInNetNS(ns, cmd); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case <-done:
	case <-time.After(time.Minute):
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-done
		t.Fatalf("a second noid-server (config %s) was not refused; it ran:\n%s%s", cfg, out.String(), errb.String())
	}
	t.Logf("refused (exit %d):\n%s", cmd.ProcessState.ExitCode(), errb.String())
	return Result{Stdout: out.String(), Stderr: errb.String(), Code: cmd.ProcessState.ExitCode()}
}

// otherConfig writes the config of another server: its own data dir and
// socket under a new temporary dir, the tiny image, and extra.
func otherConfig(t *testing.T, extra string) string {
	t.Helper()
	dir := t.TempDir()
	p := filepath.Join(dir, "config.toml")
	if err := os.WriteFile(p, []byte(configTOML(filepath.Join(dir, "data"), filepath.Join(dir, "noid.sock"), testutil.TinyImage(t), extra)), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// vmmPids lists the QEMU processes working on files under dir (VMs and
// warm spares), sorted.
func vmmPids(t *testing.T, dir string) []int {
	t.Helper()
	out, _ := exec.Command("pgrep", "-f", "qemu-system.*"+regexp.QuoteMeta(dir)).Output()
	var pids []int
	for _, f := range strings.Fields(string(out)) {
		if n, err := strconv.Atoi(f); err == nil {
			pids = append(pids, n)
		}
	}
	sort.Ints(pids)
	return pids
}

// TestDataDirLock: a second server on a running server's data dir exits at
// once with status 1, naming the data dir and the first server's pid, and
// touches nothing; so does a second server with its own data dir in the
// same network namespace, on the same bridge or on another bridge and pool
// (the namespace's noid tables and TAPs would be shared). A server in a
// namespace of its own runs next to the first. The locks die with the
// server, not with its VMs.
func TestDataDirLock(t *testing.T) {
	l := newNetLab(t)
	e := NewEnv(t, WithNetNS(l.ns), WithConfig("[network]\nenabled = true\n"))
	vm := e.Create("keep")
	if vm.Tap == "" {
		t.Fatalf("vm has no TAP: %+v", vm)
	}
	if out := e.MustExec("keep", "echo", "up"); strings.TrimSpace(out) != "up" {
		t.Fatalf("exec: %q", out)
	}
	// A checkpoint makes the server keep a warm spare of the VM's shape: a
	// second server's start-up sweep would kill it.
	if _, err := e.Client.Checkpoint(ctx(t), "keep", client.CheckpointRequest{Name: "c1"}); err != nil {
		t.Fatal(err)
	}
	e.WaitCloneSpare(2 * time.Minute)
	pid := e.cmd.Process.Pid
	vmms := vmmPids(t, e.Dir)
	if len(vmms) < 2 {
		t.Fatalf("QEMU processes %v: want the VM's and a spare's; the test would prove less", vmms)
	}
	t.Logf("QEMU processes of the first server (the VM and its spares): %v", vmms)
	links := func() []string {
		var names []string
		for n := range l.links() {
			names = append(names, n)
		}
		sort.Strings(names)
		return names
	}
	linksBefore := links()

	// The same data dir, with another socket (so nothing but the lock
	// stands in the way): refused before it reads or logs anything.
	cf, err := os.ReadFile(e.Config)
	if err != nil {
		t.Fatal(err)
	}
	same := filepath.Join(t.TempDir(), "same-data-dir.toml")
	sock2 := filepath.Join(filepath.Dir(same), "noid.sock")
	if err := os.WriteFile(same, bytes.Replace(cf, []byte(strconv.Quote(e.Socket)), []byte(strconv.Quote(sock2)), 1), 0o600); err != nil {
		t.Fatal(err)
	}
	r := runRefusedServe(t, l.ns, same)
	lines := strings.Split(strings.TrimRight(r.Stderr, "\n"), "\n")
	want := fmt.Sprintf("noid-server: data dir %s is in use by noid-server pid %d", filepath.Join(e.Dir, "data"), pid)
	if r.Code != 1 || len(lines) != 2 || lines[0] != want || !strings.HasPrefix(lines[1], "hint: ") || !strings.Contains(lines[1], "systemctl status noid-server") {
		t.Errorf("second server on the same data dir: exit %d, stderr:\n%s\nwant exit 1 and exactly:\n%s\nhint: …systemctl status noid-server…", r.Code, r.Stderr, want)
	}
	if _, err := os.Stat(sock2); err == nil {
		t.Error("the refused server created its socket")
	}

	// Another data dir, the same bridge: refused, naming the bridge and pid.
	r = runRefusedServe(t, l.ns, otherConfig(t, "[network]\nenabled = true\n"))
	if want := fmt.Sprintf("bridge noid0 is in use by noid-server pid %d", pid); r.Code != 1 || !strings.Contains(r.Stderr, want) || !strings.Contains(r.Stderr, "\nhint: ") {
		t.Errorf("second server on the same bridge: exit %d, stderr:\n%s\nwant exit 1, %q and a hint", r.Code, r.Stderr, want)
	}

	// Another data dir, another bridge and pool, the same namespace:
	// refused as well, saying why.
	r = runRefusedServe(t, l.ns, otherConfig(t, "[network]\nenabled = true\nbridge = \"noid1\"\npool = \"10.60.0.0/24\"\n"))
	if want := fmt.Sprintf("network namespace's noid network (bridge noid0, pool 172.16.0.0/16) is in use by noid-server pid %d", pid); r.Code != 1 || !strings.Contains(r.Stderr, want) {
		t.Errorf("second server on another bridge in the namespace: exit %d, stderr:\n%s\nwant exit 1 and %q", r.Code, r.Stderr, want)
	}

	// The first server is untouched: the same QEMU processes, the same
	// interfaces (its TAP too; no bridge of the others), and it still serves.
	if after := vmmPids(t, e.Dir); !slices.Equal(after, vmms) {
		t.Errorf("QEMU processes of the first server were %v, now %v", vmms, after)
	}
	if after := links(); !slices.Equal(after, linksBefore) {
		t.Errorf("interfaces in the namespace were %v, now %v", linksBefore, after)
	}
	if out := e.MustExec("keep", "echo", "still-here"); strings.TrimSpace(out) != "still-here" {
		t.Errorf("exec after the refused servers: %q", out)
	}

	// Another bridge and pool in a namespace of its own: runs beside it.
	other := NewEnv(t, WithNetNS(newNamespace(t)), WithConfig("[network]\nenabled = true\nbridge = \"noid1\"\npool = \"10.60.0.0/24\"\n"))
	if w, err := other.Client.WhoAmI(ctx(t)); err != nil || w.User != "root" {
		t.Errorf("the server in its own namespace: whoami %+v, %v", w, err)
	}
	if out := e.MustExec("keep", "echo", "beside"); strings.TrimSpace(out) != "beside" {
		t.Errorf("exec with a second server in another namespace: %q", out)
	}

	// SIGKILL leaves the VM's QEMU running; the locks go with the server,
	// and a new one takes over the data dir and the VM.
	e.Kill9()
	e.Start()
	if out := e.MustExec("keep", "echo", "adopted"); strings.TrimSpace(out) != "adopted" {
		t.Errorf("exec after the restart: %q", out)
	}
}

// addUsers runs `noid-server add-user` for every name at once and returns
// the printed tokens by name.
func addUsers(t *testing.T, e *Env, names ...string) map[string]string {
	t.Helper()
	type res struct {
		name string
		r    Result
	}
	out := make(chan res, len(names))
	var wg sync.WaitGroup
	for _, n := range names {
		wg.Add(1)
		go func() {
			defer wg.Done()
			out <- res{n, e.ServerCLI("add-user", n)}
		}()
	}
	wg.Wait()
	close(out)
	toks := map[string]string{}
	for x := range out {
		tok := strings.TrimSpace(x.r.Stdout)
		if x.r.Code != 0 || !strings.HasPrefix(tok, "noid_tok_") {
			t.Errorf("add-user %s: exit %d, stdout %q, stderr %q", x.name, x.r.Code, x.r.Stdout, x.r.Stderr)
			continue
		}
		toks[x.name] = tok
	}
	return toks
}

// checkTokens asserts that each token authenticates as its user.
func checkTokens(t *testing.T, e *Env, toks map[string]string) {
	t.Helper()
	seen := map[string]bool{}
	for name, tok := range toks {
		if seen[tok] {
			t.Errorf("token of %s handed out twice", name)
		}
		seen[tok] = true
		c, err := client.New("unix://"+e.Socket, tok)
		if err != nil {
			t.Fatal(err)
		}
		w, err := c.WhoAmI(ctx(t))
		if err != nil || w.User != name || w.Via != "token" {
			t.Errorf("whoami with %s's token: %+v, %v", name, w, err)
		}
	}
}

// auditCount counts the successful audit entries of action.
func auditCount(t *testing.T, e *Env, action string) int {
	t.Helper()
	r := e.ServerCLI("audit", "--limit", "1000")
	if r.Code != 0 {
		t.Fatalf("noid-server audit: exit %d: %s", r.Code, r.Stderr)
	}
	n := 0
	for _, line := range strings.Split(r.Stdout, "\n") {
		if strings.Contains(line, action) && strings.Contains(line, " ok ") {
			n++
		}
	}
	return n
}

// TestAddUserWithAndWithoutServer: add-user works next to a running server,
// several at once, through the server (its audit log has every one); and
// without a server, several at once too, under the data dir's lock. Every
// token authenticates against the server.
func TestAddUserWithAndWithoutServer(t *testing.T) {
	e := NewEnv(t)
	online := addUsers(t, e, "ann", "bob", "cid", "dee", "eve", "fay")
	if len(online) != 6 {
		t.Fatalf("%d of 6 concurrent add-users worked", len(online))
	}
	checkTokens(t, e, online)
	if n := auditCount(t, e, "POST /v1/users "); n != 6 {
		t.Errorf("the server's audit log has %d user creations, want 6: add-user did not go through the server", n)
	}
	if r := e.ServerCLI("add-user", "ann"); r.Code != 1 || !strings.Contains(r.Stderr, "already exists") {
		t.Errorf("add-user of an existing user: exit %d, %q", r.Code, r.Stderr)
	}

	e.Stop()
	offline := addUsers(t, e, "gus", "hal", "ida")
	if len(offline) != 3 {
		t.Fatalf("%d of 3 concurrent add-users without a server worked", len(offline))
	}
	e.Start()
	checkTokens(t, e, offline)
	checkTokens(t, e, online)
}
