package manager

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/noid-vm/noid/internal/api"
	"github.com/noid-vm/noid/internal/config"
	"github.com/noid-vm/noid/internal/remote"
	"github.com/noid-vm/noid/internal/store"
	"github.com/noid-vm/noid/internal/testutil"
	"github.com/noid-vm/noid/internal/vmm"
)

// TestMain runs the package's tests, or, in a child started by a crash
// test (NOID_MANAGER_CHILD set), one manager operation in this process.
func TestMain(m *testing.M) {
	if op := os.Getenv(childEnv); op != "" {
		os.Exit(runChild(op))
	}
	os.Exit(testutil.Main(m))
}

// env is a manager on a data dir of its own, with the tiny image under
// QEMU, driven from Go without HTTP.
type env struct {
	t       *testing.T
	dir     string
	cfgPath string
	cfg     *config.Config
	backend vmm.Backend  // nil: the one the config selects
	remote  remote.Store // nil: the one [remote] configures
	mgr     *Manager
	user    *store.User
	logs    *logBuf
}

// logBuf collects a manager's log lines for the test.
type logBuf = testutil.LogBuffer

// newEnv writes a config for a fresh data dir (extra is appended TOML) and
// opens a manager on it. Networking is off unless extra has a [network]
// section; VMs get 256 MiB.
func newEnv(t *testing.T, extra string) *env {
	t.Helper()
	testutil.RequireRoot(t)
	img := testutil.TinyImage(t)
	dir, err := os.MkdirTemp("", "noid-manager-")
	if err != nil {
		t.Fatal(err)
	}
	e := &env{t: t, dir: dir, cfgPath: filepath.Join(dir, "config.toml"), logs: &logBuf{}}
	if !strings.Contains(extra, "[network]") {
		extra += "\n[network]\nenabled = false\n"
	}
	toml := fmt.Sprintf("data_dir = %q\nsocket = %q\nkernel = %q\ninitrd = %q\nrootfs = %q\naccel = \"tcg\"\ndefault_memory_mib = 256\nlog_level = \"debug\"\n%s",
		filepath.Join(dir, "data"), filepath.Join(dir, "noid.sock"), img.Kernel, img.Initrd, img.Rootfs, extra)
	if err := os.WriteFile(e.cfgPath, []byte(toml), 0o600); err != nil {
		t.Fatal(err)
	}
	if e.cfg, err = config.Load(e.cfgPath); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.cleanup)
	e.open()
	return e
}

// open starts a manager on the env's data dir (recovering what an earlier
// one, or a crashed child, left).
func (e *env) open() {
	e.t.Helper()
	log := slog.New(slog.NewTextHandler(e.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	m, err := New(context.Background(), Options{Config: e.cfg, Logger: log, Backend: e.backend, Remote: e.remote})
	if err != nil {
		e.t.Fatalf("opening the manager: %v\n%s", err, lastLines(e.logs.String(), 30))
	}
	e.mgr = m
	if e.user, err = m.Store().EnsureUnixUser(context.Background(), 0, "root"); err != nil {
		e.t.Fatal(err)
	}
}

// close closes the manager; its VMs keep running.
func (e *env) close() {
	if e.mgr != nil {
		e.mgr.Close()
		e.mgr = nil
	}
}

// cleanup destroys every VM, closes the manager and removes the data dir;
// any QEMU of this data dir still running is killed.
func (e *env) cleanup() {
	if e.mgr != nil {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		if vms, err := e.mgr.ListVMs(ctx, e.user); err == nil {
			for _, v := range vms {
				e.mgr.DestroyVM(ctx, e.user, v.Name)
			}
		}
		cancel()
		e.close()
	}
	exec.Command("pkill", "-9", "-f", "qemu-system.*"+regexp.QuoteMeta(e.dir)).Run()
	if e.t.Failed() {
		e.t.Logf("manager log (end):\n%s", lastLines(e.logs.String(), 60))
	}
	os.RemoveAll(e.dir)
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func tctx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// create creates a VM of the default shape and waits for its agent.
func (e *env) create(name string) *api.VM {
	e.t.Helper()
	v, err := e.mgr.CreateVM(tctx(e.t), e.user, api.CreateVMRequest{Name: name})
	if err != nil {
		e.t.Fatalf("creating %s: %v", name, err)
	}
	return v
}

// exec runs argv in vm and returns its stdout, stderr and exit code.
func (e *env) exec(vm string, argv ...string) (string, string, int, error) {
	ctx := tctx(e.t)
	g, err := e.mgr.Guest(ctx, e.user, vm)
	if err != nil {
		return "", "", -1, err
	}
	p, err := g.Exec(ctx, api.ExecRequest{Argv: argv}, false)
	if err != nil {
		return "", "", -1, err
	}
	var out, errb bytes.Buffer
	done := make(chan struct{})
	go func() { io.Copy(&errb, p.Stderr()); close(done) }()
	io.Copy(&out, p.Stdout())
	<-done
	ex, err := p.Wait()
	return out.String(), errb.String(), ex.Code, err
}

// mustExec runs argv in vm and fails the test unless it exits 0.
func (e *env) mustExec(vm string, argv ...string) string {
	e.t.Helper()
	out, errOut, code, err := e.exec(vm, argv...)
	if err != nil || code != 0 {
		e.t.Fatalf("%s: %v: exit %d %v: %s", vm, argv, code, err, errOut)
	}
	return out
}

// waitCloneSpare waits until the manager has a blank warm spare.
func (e *env) waitCloneSpare(within time.Duration) {
	e.t.Helper()
	deadline := time.Now().Add(within)
	for {
		m, err := e.mgr.Metrics(tctx(e.t))
		if err != nil {
			e.t.Fatal(err)
		}
		for _, sc := range m.CloneSpares {
			if sc.Count > 0 {
				return
			}
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("no blank warm spare within %s", within)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
