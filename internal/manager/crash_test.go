package manager

import (
	"context"
	"encoding/json"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"log/slog"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/noid-vm/noid/internal/api"
	"github.com/noid-vm/noid/internal/config"
	"github.com/noid-vm/noid/internal/vmm"
)

// The crash tests run each operation in a child process (this test binary,
// re-executed with childEnv set) whose manager kills itself with SIGKILL at
// one crash point; the test then opens a manager on the same data dir, as a
// restarted server would, and checks that everything was reconciled.

const (
	childEnv          = "NOID_MANAGER_CHILD"
	childConfigEnv    = "NOID_MANAGER_CONFIG"
	childNoPrepareEnv = "NOID_MANAGER_NO_PREPARE"
)

// childOp is one operation a child runs.
type childOp struct {
	Op         string `json:"op"` // open, open-spare, create, checkpoint, clone, rewind, destroy, promote, spare-clone, remote-push, remote-clone
	VM         string `json:"vm,omitempty"`
	Checkpoint string `json:"checkpoint,omitempty"`
	Name       string `json:"name,omitempty"`
}

// noPrepare hides the backend's vmm.Preparer, so the manager takes the
// paths of backends that cannot start a VMM ahead of time (Firecracker)
// with a real QEMU.
type noPrepare struct{ vmm.Backend }

// runChild runs one childOp (JSON in op) with a manager on the config in
// $NOID_MANAGER_CONFIG and returns the exit code. An armed crash point
// kills the process before it returns.
func runChild(op string) int {
	var o childOp
	if err := json.Unmarshal([]byte(op), &o); err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 2
	}
	cfg, err := config.Load(os.Getenv(childConfigEnv))
	if err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 2
	}
	opts := Options{Config: cfg, Logger: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))}
	if os.Getenv(childNoPrepareEnv) != "" {
		opts.WrapBackend = func(b vmm.Backend) vmm.Backend { return noPrepare{b} }
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	m, err := New(ctx, opts)
	if err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 1
	}
	defer m.Close()
	u, err := m.Store().EnsureUnixUser(ctx, 0, "root")
	if err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 1
	}
	fmt.Fprintln(os.Stderr, "child: op starting")
	switch o.Op {
	case "open":
		// Starting the manager was the operation.
	case "open-spare":
		// Wait for a golden's warm spare, then for the test's SIGKILL,
		// which leaves the spare running as a crash would.
		for err == nil {
			var met *Metrics
			if met, err = m.Metrics(ctx); err == nil && len(met.GoldenSpares) > 0 && met.GoldenSpares[0].Count > 0 {
				fmt.Fprintln(os.Stderr, "child: spare ready")
				select {}
			}
			time.Sleep(20 * time.Millisecond)
		}
	case "create":
		_, err = m.CreateVM(ctx, u, api.CreateVMRequest{Name: o.Name})
	case "checkpoint":
		_, err = m.Checkpoint(ctx, u, o.VM, api.CheckpointRequest{Name: o.Name})
	case "clone":
		_, err = m.Restore(ctx, u, o.VM, api.RestoreRequest{Checkpoint: o.Checkpoint, As: o.Name})
	case "spare-clone":
		// A clone that takes a blank spare: the checkpoint prepares one.
		if _, err = m.Checkpoint(ctx, u, o.VM, api.CheckpointRequest{Name: o.Checkpoint}); err == nil {
			for err == nil {
				var met *Metrics
				if met, err = m.Metrics(ctx); err == nil && len(met.CloneSpares) > 0 && met.CloneSpares[0].Count > 0 {
					break
				}
				time.Sleep(20 * time.Millisecond)
			}
			if err == nil {
				_, err = m.Restore(ctx, u, o.VM, api.RestoreRequest{Checkpoint: o.Checkpoint, As: o.Name})
			}
		}
	case "rewind":
		_, err = m.Restore(ctx, u, o.VM, api.RestoreRequest{Checkpoint: o.Checkpoint})
	case "destroy":
		_, err = m.DestroyVM(ctx, u, o.VM)
	case "promote":
		_, err = m.PromoteGolden(ctx, u, api.GoldenPromoteRequest{VM: o.VM, Checkpoint: o.Checkpoint})
	case "remote-push":
		_, err = m.PushCheckpoint(ctx, u, o.VM, o.Checkpoint, api.RemotePushRequest{Key: o.Name})
	case "remote-clone":
		_, err = m.CloneRemote(ctx, u, api.RemoteCloneRequest{Key: o.Checkpoint, As: o.Name})
	default:
		err = fmt.Errorf("unknown op %q", o.Op)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "child: op failed:", err)
		return 1
	}
	fmt.Fprintln(os.Stderr, "child: op succeeded")
	return 0
}

// child starts this test binary as a child running op on the env's data
// dir, with the given extra environment.
func (e *env) child(op childOp, cfgPath string, extraEnv ...string) (*exec.Cmd, *logBuf) {
	e.t.Helper()
	b, _ := json.Marshal(op)
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"="+string(b), childConfigEnv+"="+cfgPath)
	cmd.Env = append(cmd.Env, extraEnv...)
	out := &logBuf{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		e.t.Fatal(err)
	}
	return cmd, out
}

// crashAt closes the env's manager, runs op in a child armed to kill
// itself at point, checks that the point fired and then reopens the
// manager, which recovers. fired records the point.
func (e *env) crashAt(point string, op childOp, cfgPath string, fired map[string]bool, extraEnv ...string) {
	e.t.Helper()
	e.crashChild(point, op, cfgPath, extraEnv...)
	fired[point] = true
	e.open()
}

// crashChild closes the env's manager, runs op in a child armed to kill
// itself at point, and checks that the point fired.
func (e *env) crashChild(point string, op childOp, cfgPath string, extraEnv ...string) {
	e.t.Helper()
	e.close()
	cmd, out := e.child(op, cfgPath, append(extraEnv, "NOID_CRASHPOINT="+point)...)
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case <-done:
	case <-time.After(3 * time.Minute):
		cmd.Process.Kill()
		<-done
		e.t.Fatalf("%s: the child hung:\n%s", point, lastLines(out.String(), 40))
	}
	ws, _ := cmd.ProcessState.Sys().(syscall.WaitStatus)
	if !ws.Signaled() || ws.Signal() != syscall.SIGKILL || !strings.Contains(out.String(), "noid crashpoint: "+point+"\n") {
		e.t.Fatalf("crash point %s did not fire (%v):\n%s", point, cmd.ProcessState, lastLines(out.String(), 40))
	}
}

// checkConsistent verifies what must hold after any crash and restart:
// every VM runs (and answers) or is dead with a reason, every listed
// checkpoint is whole, the store and the disk agree, nothing unfinished
// is left, and no VMM of this data dir runs that the manager does not
// know.
func (e *env) checkConsistent(when string) {
	e.t.Helper()
	ctx := tctx(e.t)
	vms, err := e.mgr.ListVMs(ctx, e.user)
	if err != nil {
		e.t.Fatal(err)
	}
	ids, runtimes, cpIDs := map[string]bool{}, map[string]bool{}, map[string]bool{}
	for _, v := range vms {
		ids[v.ID], runtimes[v.RuntimeID] = true, true
		switch v.State {
		case "running":
			if out, _, code, err := e.exec(v.Name, "echo", "ok"); code != 0 || out != "ok\n" {
				e.t.Errorf("%s: %s is listed running but exec fails: %v", when, v.Name, err)
			}
		case "dead":
			if v.StateReason == "" {
				e.t.Errorf("%s: %s is dead without a reason", when, v.Name)
			}
		default:
			e.t.Errorf("%s: %s is %s after the restart", when, v.Name, v.State)
		}
		cps, err := e.mgr.ListCheckpoints(ctx, e.user, v.Name)
		if err != nil {
			e.t.Fatal(err)
		}
		for _, c := range cps {
			cpIDs[c.ID] = true
			dir := filepath.Join(e.mgr.userDir(e.user.ID), "checkpoints", c.ID)
			if _, err := e.mgr.verifySnapshot(ctx, dir, "checkpoint "+c.Name); err != nil {
				e.t.Errorf("%s: checkpoint %s/%s is listed but not whole: %v", when, v.Name, c.Name, err)
			}
		}
	}
	storage := e.cfg.StorageDir()
	dirs, _ := filepath.Glob(filepath.Join(storage, "users", "*", "vms", "*"))
	for _, d := range dirs {
		if !ids[filepath.Base(d)] {
			e.t.Errorf("%s: vm dir %s has no vm", when, d)
		}
	}
	cpdirs, _ := filepath.Glob(filepath.Join(storage, "users", "*", "checkpoints", "*"))
	for _, d := range cpdirs {
		if !cpIDs[filepath.Base(d)] {
			e.t.Errorf("%s: checkpoint dir %s is not listed", when, d)
		}
	}
	if tmp, _ := filepath.Glob(filepath.Join(storage, "golden", ".tmp-*")); len(tmp) > 0 {
		e.t.Errorf("%s: unfinished golden dirs: %v", when, tmp)
	}
	spares := e.mgr.pool.ids()
	out, _ := exec.Command("pgrep", "-af", "qemu-system.*"+regexp.QuoteMeta(e.dir)).Output()
	re := regexp.MustCompile(`-name noid-([0-9a-f]+),`)
	for _, m := range re.FindAllStringSubmatch(string(out), -1) {
		if !runtimes[m[1]] && !spares[m[1]] {
			e.t.Errorf("%s: a VMM runs for runtime id %s, which is neither a listed VM nor a spare", when, m[1])
		}
	}
}

// crashPointsInCode lists the crash points the package's code names: the
// string given to crashpoint, or as the crash point of insertVM.
func crashPointsInCode(t *testing.T) []string {
	t.Helper()
	fset := token.NewFileSet()
	files, _ := filepath.Glob("*.go")
	seen := map[string]bool{}
	for _, f := range files {
		if strings.HasSuffix(f, "_test.go") {
			continue
		}
		af, err := parser.ParseFile(fset, f, nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		var inFunc string
		ast.Inspect(af, func(n ast.Node) bool {
			if fd, ok := n.(*ast.FuncDecl); ok {
				inFunc = fd.Name.Name
			}
			call, ok := n.(*ast.CallExpr)
			if !ok || len(call.Args) == 0 {
				return true
			}
			var fn string
			switch f := call.Fun.(type) {
			case *ast.Ident:
				fn = f.Name
			case *ast.SelectorExpr:
				fn = f.Sel.Name
			}
			if fn != "crashpoint" && fn != "insertVM" {
				return true
			}
			if lit, ok := call.Args[len(call.Args)-1].(*ast.BasicLit); ok && lit.Kind == token.STRING {
				name, _ := strconv.Unquote(lit.Value)
				seen[name] = true
			} else if fn == "crashpoint" && inFunc != "insertVM" { // insertVM passes on its caller's literal
				t.Errorf("%s: crashpoint called with a name that is not a literal", fset.Position(call.Pos()))
			}
			return true
		})
	}
	var out []string
	for p := range seen {
		out = append(out, p)
	}
	sort.Strings(out)
	return out
}

// TestCrashPoints kills the manager at every crash point its code has (the
// list comes from the source), and at random moments of checkpoints and
// clones, and checks after each restart that nothing is half-done: no
// half-created VM or clone is listed, no partial checkpoint or golden, a
// rewind cut short leaves the VM dead with a reason or running its
// checkpoint, and no VMM runs that the manager does not know.
func TestCrashPoints(t *testing.T) {
	points := crashPointsInCode(t)
	if len(points) < 10 {
		t.Fatalf("found only %d crash points in the code: %v", len(points), points)
	}
	e := newEnv(t, "")
	e.create("base")
	e.mustExec("base", "sh", "-c", "echo v1 > /root/state; sync")
	if _, err := e.mgr.Checkpoint(tctx(t), e.user, "base", api.CheckpointRequest{Name: "c0"}); err != nil {
		t.Fatal(err)
	}
	listed := func(name string) bool {
		_, err := e.mgr.GetVM(tctx(t), e.user, name)
		return err == nil
	}
	state := func() (string, string) {
		v, err := e.mgr.GetVM(tctx(t), e.user, "base")
		if err != nil {
			t.Fatal(err)
		}
		return v.State, v.StateReason
	}
	// baseState reads base's marker file; rewinds to c0 bring back v1.
	baseState := func() string { return strings.TrimSpace(e.mustExec("base", "cat", "/root/state")) }
	fired := map[string]bool{}

	for i, point := range []string{"create.after-insert", "create.after-boot", "create.before-running"} {
		name := fmt.Sprintf("new%d", i)
		e.crashAt(point, childOp{Op: "create", Name: name}, e.cfgPath, fired)
		e.checkConsistent(point)
		if listed(name) {
			t.Errorf("%s: half-created vm %s is listed", point, name)
		}
	}
	for i, point := range []string{"checkpoint.after-copy", "checkpoint.after-rename"} {
		e.crashAt(point, childOp{Op: "checkpoint", VM: "base", Name: fmt.Sprintf("cp%d", i)}, e.cfgPath, fired)
		e.checkConsistent(point)
		if cps, _ := e.mgr.ListCheckpoints(tctx(t), e.user, "base"); len(cps) != 1 {
			t.Errorf("%s: checkpoints %+v", point, cps)
		}
	}
	// Clones by backends that cannot prepare a VMM (restored directly).
	for i, point := range []string{"clone.after-insert", "clone.after-spawn"} {
		name := fmt.Sprintf("clone%d", i)
		e.crashAt(point, childOp{Op: "clone", VM: "base", Checkpoint: "c0", Name: name}, e.cfgPath, fired, childNoPrepareEnv+"=1")
		e.checkConsistent(point)
		if listed(name) {
			t.Errorf("%s: half-made clone %s is listed", point, name)
		}
	}
	e.crashAt("spare.after-insert", childOp{Op: "spare-clone", VM: "base", Checkpoint: "for-spare", Name: "spareclone"}, e.cfgPath, fired)
	e.checkConsistent("spare.after-insert")
	if listed("spareclone") {
		t.Error("spare.after-insert: half-made clone is listed")
	}
	if err := e.mgr.DeleteCheckpoint(tctx(t), e.user, "base", "for-spare"); err != nil {
		t.Fatal(err)
	}

	// Rewinds load the checkpoint into a spare before they stop the VM.
	// Killed after the old VMM was stopped and before the VM was recorded
	// on the spare: the VM is dead, and a rewind brings it back.
	e.mustExec("base", "sh", "-c", "echo v2 > /root/state; sync")
	e.crashAt("restore.after-kill", childOp{Op: "rewind", VM: "base", Checkpoint: "c0"}, e.cfgPath, fired)
	e.checkConsistent("restore.after-kill")
	if st, why := state(); st != "dead" || !strings.Contains(why, "restore") {
		t.Errorf("restore.after-kill: base is %s (%s), want dead after a cut-short restore", st, why)
	}
	if _, err := e.mgr.Restore(tctx(t), e.user, "base", api.RestoreRequest{Checkpoint: "c0"}); err != nil {
		t.Fatalf("rewinding again after the crash: %v", err)
	}
	// Killed once the VM was recorded on the spare (whose state is loaded):
	// the restart finishes the move and resumes it, so base runs c0.
	for _, point := range []string{"restore.spare-after-move", "restore.after-spawn"} {
		e.mustExec("base", "sh", "-c", "echo v2 > /root/state; sync")
		e.crashAt(point, childOp{Op: "rewind", VM: "base", Checkpoint: "c0"}, e.cfgPath, fired)
		e.checkConsistent(point)
		if st, why := state(); st != "running" {
			t.Fatalf("%s: base is %s (%s), want it running the checkpoint", point, st, why)
		}
		if got := baseState(); got != "v1" {
			t.Errorf("%s: base's state is %q, want the checkpoint's v1", point, got)
		}
	}
	// Backends that cannot prepare a VMM restore in place.
	e.crashAt("restore.cold-after-kill", childOp{Op: "rewind", VM: "base", Checkpoint: "c0"}, e.cfgPath, fired, childNoPrepareEnv+"=1")
	e.checkConsistent("restore.cold-after-kill")
	if st, why := state(); st != "dead" || !strings.Contains(why, "restore") {
		t.Errorf("restore.cold-after-kill: base is %s (%s)", st, why)
	}
	e.mustExecAfterRewind("c0")
	e.crashAt("restore.cold-after-spawn", childOp{Op: "rewind", VM: "base", Checkpoint: "c0"}, e.cfgPath, fired, childNoPrepareEnv+"=1")
	e.checkConsistent("restore.cold-after-spawn")
	if st, why := state(); st != "running" {
		t.Errorf("restore.cold-after-spawn: base is %s (%s)", st, why)
	}

	for i, point := range []string{"destroy.after-kill", "destroy.after-rmdir"} {
		name := fmt.Sprintf("doomed%d", i)
		if _, err := e.mgr.Restore(tctx(t), e.user, "base", api.RestoreRequest{Checkpoint: "c0", As: name}); err != nil {
			t.Fatal(err)
		}
		e.crashAt(point, childOp{Op: "destroy", VM: name}, e.cfgPath, fired)
		e.checkConsistent(point)
		if listed(name) {
			t.Errorf("%s: vm %s survived", point, name)
		}
	}
	e.crashAt("golden.after-copy", childOp{Op: "promote", VM: "base", Checkpoint: "c0"}, e.cfgPath, fired)
	e.checkConsistent("golden.after-copy")
	if gs, _ := e.mgr.ListGolden(tctx(t), e.user); len(gs) != 0 {
		t.Errorf("golden after a crash mid-promotion: %+v", gs)
	}

	// Points that need more than this test's data dir are reached by
	// tests of their own.
	elsewhere := map[string]string{"storage.move-after-rename": "TestStorageSwitch", "remote.after-pull": "TestRemoteCrashMidPull", "remote.push-before-manifest": "TestRemoteCrashMidPull"}
	for _, p := range points {
		if !fired[p] && elsewhere[p] == "" {
			t.Errorf("crash point %s is in the code but no test reached it", p)
		}
	}
	for p := range fired {
		if !slices.Contains(points, p) {
			t.Errorf("crash point %s fired but is not in the code's list %v", p, points)
		}
	}

	// And kills at random moments of checkpoints and clones.
	rng := rand.New(rand.NewSource(time.Now().UnixNano()))
	for i := 0; i < 4; i++ {
		e.close()
		op := childOp{Op: "checkpoint", VM: "base", Name: fmt.Sprintf("r%d", i)}
		if i%2 == 1 {
			op = childOp{Op: "clone", VM: "base", Checkpoint: "c0", Name: fmt.Sprintf("rc%d", i)}
		}
		cmd, out := e.child(op, e.cfgPath)
		for deadline := time.Now().Add(time.Minute); !strings.Contains(out.String(), "child: op starting"); time.Sleep(5 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("the child never started its operation:\n%s", lastLines(out.String(), 20))
			}
		}
		d := time.Duration(rng.Intn(400)) * time.Millisecond
		time.Sleep(d) // a random moment: fault injection, not readiness
		cmd.Process.Signal(syscall.SIGKILL)
		err := cmd.Wait()
		t.Logf("random kill %d (%s) %v into the operation: %v; the child's last line: %s", i, op.Op, d, err, lastLines(out.String(), 1))
		e.open()
		e.checkConsistent(fmt.Sprintf("random kill %d", i))
	}
	if got := baseState(); got != "v1" {
		t.Errorf("base lost its state: %q", got)
	}
}

// mustExecAfterRewind rewinds base to cp with the env's manager and checks
// that it answers.
func (e *env) mustExecAfterRewind(cp string) {
	e.t.Helper()
	if _, err := e.mgr.Restore(tctx(e.t), e.user, "base", api.RestoreRequest{Checkpoint: cp}); err != nil {
		e.t.Fatalf("rewinding base to %s: %v", cp, err)
	}
	e.mustExec("base", "true")
}
