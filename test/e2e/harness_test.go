//go:build e2e

// Package e2e boots real VMs under QEMU through a real noid-server process
// and the real noid CLI. Run with `go test -tags e2e ./test/e2e` as root;
// scripts/test.sh does.
package e2e

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netns"

	"github.com/noid-vm/noid/client"
	"github.com/noid-vm/noid/internal/image"
	"github.com/noid-vm/noid/internal/promtext"
	"github.com/noid-vm/noid/internal/testutil"
)

// Env is one noid-server process with its own data dir.
type Env struct {
	t       *testing.T
	Dir     string
	Config  string
	Socket  string
	Bins    testutil.Binaries
	Client  *client.Client
	cmd     *exec.Cmd
	logMu   sync.Mutex
	log     bytes.Buffer
	exited  chan struct{}
	extraCf string
	// ServerEnv is added to the server's environment on the next Start.
	ServerEnv []string
	// SocketGroup is the server's socket_group when the test chose one.
	SocketGroup string
	netNS       netns.NsHandle // when open, the server (and its VMMs) run in it
}

// Option adjusts the server config.
type Option func(*Env)

// WithConfig appends raw TOML to the config.
func WithConfig(toml string) Option { return func(e *Env) { e.extraCf += toml + "\n" } }

// WithSocketGroup gives the server a socket_group of its own (created by
// `noid-server add-user --local`, deleted with the test), so that tests
// that let other local users in leave the host's groups as they were.
func WithSocketGroup(t *testing.T) Option {
	b := make([]byte, 4)
	rand.Read(b)
	g := "noid-e2e-" + hex.EncodeToString(b)
	t.Cleanup(func() { exec.Command("groupdel", g).Run() })
	return func(e *Env) { e.extraCf = "socket_group = " + strconv.Quote(g) + "\n" + e.extraCf; e.SocketGroup = g }
}

// WithNetNS runs noid-server, and so every VMM it starts, inside the
// network namespace ns instead of the host's. The caller owns ns and keeps
// it open for the Env's lifetime.
func WithNetNS(ns netns.NsHandle) Option { return func(e *Env) { e.netNS = ns } }

// NewEnv starts a noid-server on a fresh data dir with the tiny image.
func NewEnv(t *testing.T, opts ...Option) *Env {
	t.Helper()
	testutil.RequireRoot(t)
	bins := testutil.Build(t)
	img := testutil.TinyImage(t)
	dir, err := os.MkdirTemp("", "noid-e2e-")
	if err != nil {
		t.Fatal(err)
	}
	e := &Env{t: t, Dir: dir, Bins: bins, Socket: filepath.Join(dir, "noid.sock"), netNS: netns.None()}
	for _, o := range opts {
		o(e)
	}
	e.Config = filepath.Join(dir, "config.toml")
	if err := os.WriteFile(e.Config, []byte(configTOML(filepath.Join(dir, "data"), e.Socket, img, e.extraCf)), 0o600); err != nil {
		t.Fatal(err)
	}
	e.Start()
	c, err := client.New("unix://"+e.Socket, "")
	if err != nil {
		t.Fatal(err)
	}
	e.Client = c
	t.Cleanup(e.cleanup)
	return e
}

// configTOML is a test server's config: the tiny image under TCG, debug
// logs, then extra; networking is off unless extra has a [network] section.
func configTOML(dataDir, socket string, img *image.Image, extra string) string {
	cfg := fmt.Sprintf("data_dir = %q\nsocket = %q\nkernel = %q\ninitrd = %q\nrootfs = %q\naccel = \"tcg\"\ndefault_memory_mib = 256\nlog_level = \"debug\"\n",
		dataDir, socket, img.Kernel, img.Initrd, img.Rootfs)
	if !strings.Contains(extra, "[network]") {
		return cfg + extra + "\n[network]\nenabled = false\n"
	}
	return cfg + extra
}

// Start launches noid-server and waits until it logs that it is listening.
func (e *Env) Start() {
	e.t.Helper()
	cmd := exec.Command(e.Bins.Server, "serve", "--config", e.Config)
	cmd.Env = append(os.Environ(), e.ServerEnv...)
	pr, pw := io.Pipe()
	cmd.Stdout = pw
	cmd.Stderr = pw
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := startInNetNS(e.netNS, cmd); err != nil {
		e.t.Fatal(err)
	}
	e.cmd = cmd
	e.exited = make(chan struct{})
	ready := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(pr)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		once := sync.Once{}
		for sc.Scan() {
			line := sc.Text()
			e.logMu.Lock()
			e.log.WriteString(line + "\n")
			e.logMu.Unlock()
			if strings.Contains(line, "msg=listening") {
				once.Do(func() { close(ready) })
			}
		}
	}()
	go func() { cmd.Wait(); pw.Close(); close(e.exited) }()
	select {
	case <-ready:
	case <-e.exited:
		e.t.Fatalf("noid-server exited during start-up:\n%s", e.Log())
	case <-time.After(60 * time.Second):
		e.t.Fatalf("noid-server did not start listening:\n%s", e.Log())
	}
}

// startInNetNS starts cmd in network namespace ns (or in the caller's when
// ns is not open): a child inherits the namespace of the thread that forks
// it.
func startInNetNS(ns netns.NsHandle, cmd *exec.Cmd) error {
	if !ns.IsOpen() || ns == 0 { // 0: an Env not made by NewEnv (fd 0 is never a namespace here)
		return cmd.Start()
	}
	return inNetNS(ns, cmd.Start)
}

// inNetNS runs fn on a locked OS thread switched into ns. If the thread
// cannot be switched back it stays locked and dies with its goroutine, so
// no other goroutine ever runs in ns by accident.
func inNetNS(ns netns.NsHandle, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		defer orig.Close()
		if err := netns.Set(ns); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("entering netns: %w", err)
			return
		}
		err = fn()
		if serr := netns.Set(orig); serr != nil {
			errc <- errors.Join(err, fmt.Errorf("leaving netns: %w", serr))
			return
		}
		runtime.UnlockOSThread()
		errc <- err
	}()
	return <-errc
}

// Log returns everything the server has logged.
func (e *Env) Log() string {
	e.logMu.Lock()
	defer e.logMu.Unlock()
	return e.log.String()
}

// Kill9 kills the server with SIGKILL (VMs keep running) and waits for it.
func (e *Env) Kill9() {
	e.cmd.Process.Signal(syscall.SIGKILL)
	<-e.exited
}

// Stop sends SIGTERM and waits for a graceful exit.
func (e *Env) Stop() {
	e.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-e.exited:
	case <-time.After(30 * time.Second):
		e.t.Errorf("noid-server did not stop on SIGTERM")
		e.Kill9()
	}
}

// cleanup destroys every user's VM through the server, stops it and removes the dir.
func (e *Env) cleanup() {
	select {
	case <-e.exited:
		e.Start()
	default:
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if vms, err := e.Client.ListAllVMs(ctx); err == nil {
		for _, v := range vms {
			e.Client.DestroyVM(ctx, v.Owner+"/"+v.Name)
		}
	}
	e.Stop()
	if e.t.Failed() {
		e.t.Logf("server log:\n%s", lastLines(e.Log(), 80))
	}
	// Anything still running from this data dir is a leak.
	if out, _ := exec.Command("pgrep", "-f", e.Dir).Output(); len(bytes.TrimSpace(out)) > 0 {
		e.t.Errorf("processes left running after cleanup: %s", out)
		exec.Command("pkill", "-9", "-f", e.Dir).Run()
	}
	os.RemoveAll(e.Dir)
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// Result is a finished CLI invocation.
type Result struct {
	Stdout, Stderr string
	Code           int
}

// CLI runs the noid binary against this server.
func (e *Env) CLI(stdin string, args ...string) Result {
	e.t.Helper()
	return e.runCLI(stdin, nil, args)
}

// CLIAs runs the noid binary against this server with token (a user's,
// over the unix socket) instead of the caller's uid.
func (e *Env) CLIAs(token string, args ...string) Result {
	e.t.Helper()
	return e.runCLI("", []string{"NOID_TOKEN=" + token}, args)
}

func (e *Env) runCLI(stdin string, env, args []string) Result {
	e.t.Helper()
	cmd := exec.Command(e.Bins.Noid, args...)
	cmd.Env = append(append(os.Environ(), "NOID_URL=unix://"+e.Socket), env...)
	if stdin != "" {
		cmd.Stdin = strings.NewReader(stdin)
	}
	var out, errb bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &errb
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		e.t.Fatalf("running noid %v: %v", args, err)
	}
	return Result{Stdout: out.String(), Stderr: errb.String(), Code: code}
}

// MustCLI runs the CLI and fails the test on a non-zero exit.
func (e *Env) MustCLI(args ...string) string {
	e.t.Helper()
	r := e.CLI("", args...)
	if r.Code != 0 {
		e.t.Fatalf("noid %s: exit %d\nstdout: %s\nstderr: %s", strings.Join(args, " "), r.Code, r.Stdout, r.Stderr)
	}
	return r.Stdout
}

// ServerCLI runs noid-server with this server's config.
func (e *Env) ServerCLI(args ...string) Result {
	c, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(c, e.Bins.Server, append(args, "--config", e.Config)...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		return Result{Stderr: err.Error(), Code: -1}
	}
	return Result{Stdout: out.String(), Stderr: errb.String(), Code: cmd.ProcessState.ExitCode()}
}

// Exec runs a command in vm through the client and returns its output.
func (e *Env) Exec(vm string, argv ...string) (string, string, int) {
	e.t.Helper()
	var out, errb bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	st, err := e.Client.Exec(ctx, vm, client.ExecRequest{Argv: argv}, client.ExecIO{Stdout: &out, Stderr: &errb})
	if err != nil {
		e.t.Fatalf("exec %v in %s: %v", argv, vm, err)
	}
	return out.String(), errb.String(), st.Code
}

// MustExec runs a command in vm and fails on a non-zero exit.
func (e *Env) MustExec(vm string, argv ...string) string {
	e.t.Helper()
	out, errs, code := e.Exec(vm, argv...)
	if code != 0 {
		e.t.Fatalf("exec %v in %s: exit %d\nstdout: %s\nstderr: %s", argv, vm, code, out, errs)
	}
	return out
}

// Create creates a VM through the client with the test defaults.
func (e *Env) Create(name string, mut ...func(*client.CreateVMRequest)) *client.VM {
	e.t.Helper()
	req := client.CreateVMRequest{Name: name}
	for _, m := range mut {
		m(&req)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	vm, err := e.Client.CreateVM(ctx, req)
	if err != nil {
		e.t.Fatalf("create %s: %v", name, err)
	}
	return vm
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	t.Cleanup(cancel)
	return c
}

// Metrics returns the server's /metrics text, read over its unix socket as root.
func (e *Env) Metrics() string {
	e.t.Helper()
	m, err := e.Client.Metrics(ctx(e.t))
	if err != nil {
		e.t.Fatalf("reading metrics: %v", err)
	}
	return m
}

// WaitCloneSpare waits until the server has a blank warm spare (for clones
// and rewinds) ready, as /metrics reports, or fails the test.
func (e *Env) WaitCloneSpare(within time.Duration) {
	e.t.Helper()
	deadline := time.Now().Add(within)
	for {
		m := e.Metrics()
		fams, err := promtext.Parse(m)
		if err != nil {
			e.t.Fatal(err)
		}
		if fams.Sum("noid_warm_spares", map[string]string{"kind": "clone"}) > 0 {
			return
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("no blank warm spare within %s; metrics:\n%s", within, m)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// curlAs sends GET path to the server's socket with curl, run as uid (gid
// = uid) with the supplementary groups given, and returns curl's output.
func (e *Env) curlAs(t *testing.T, uid uint32, groups []uint32, path string) (string, error) {
	t.Helper()
	cmd := exec.Command("curl", "-s", "--unix-socket", e.Socket, "http://noid"+path)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid, Groups: groups}}
	out, err := cmd.Output()
	return string(out), err
}

// loginGroups are the supplementary groups a login of the account name
// gets from the account database, as a session started after an
// add-user --local has them.
func loginGroups(t *testing.T, name string) []uint32 {
	t.Helper()
	u, err := user.Lookup(name)
	if err != nil {
		t.Fatal(err)
	}
	ids, err := u.GroupIds()
	if err != nil {
		t.Fatal(err)
	}
	var out []uint32
	for _, id := range ids {
		n, _ := strconv.ParseUint(id, 10, 32)
		out = append(out, uint32(n))
	}
	return out
}

// socketGID is the gid of the server's socket_group, which must exist.
func socketGID(t *testing.T, e *Env) uint32 {
	t.Helper()
	g, err := user.LookupGroup(e.SocketGroup)
	if err != nil {
		t.Fatalf("socket group %q: %v", e.SocketGroup, err)
	}
	n, _ := strconv.ParseUint(g.Gid, 10, 32)
	return uint32(n)
}
