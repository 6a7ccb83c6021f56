//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"math/rand"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/noid-vm/noid/client"
)

// checkConsistent verifies what must hold after any crash and restart:
// every VM runs or is dead with a reason, the DB and the disk agree, no
// unfinished directory is left, and no VMM runs that the DB does not know.
func checkConsistent(t *testing.T, e *Env) {
	t.Helper()
	vms, err := e.Client.ListVMs(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	ids, runtimes := map[string]bool{}, map[string]bool{}
	for _, v := range vms {
		ids[v.ID], runtimes[v.RuntimeID] = true, true
		switch v.State {
		case "running":
			if out, _, code := e.Exec(v.Name, "echo", "ok"); code != 0 || out != "ok\n" {
				t.Errorf("%s is listed running but exec fails", v.Name)
			}
		case "dead":
			if v.StateReason == "" {
				t.Errorf("%s is dead without a reason", v.Name)
			}
		default:
			t.Errorf("%s is %s after restart", v.Name, v.State)
		}
		cps, err := e.Client.ListCheckpoints(ctx(t), v.Name)
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range cps {
			m, _ := filepath.Glob(filepath.Join(e.Dir, "data", "users", "*", "checkpoints", c.ID, "meta.json"))
			if len(m) != 1 {
				t.Errorf("checkpoint %s/%s is listed but its files are missing", v.Name, c.Name)
			}
		}
	}
	dirs, _ := filepath.Glob(filepath.Join(e.Dir, "data", "users", "*", "vms", "*"))
	for _, d := range dirs {
		if !ids[filepath.Base(d)] {
			t.Errorf("vm dir %s has no vm", d)
		}
	}
	all := map[string]bool{}
	for _, v := range vms {
		cps, _ := e.Client.ListCheckpoints(ctx(t), v.Name)
		for _, c := range cps {
			all[c.ID] = true
		}
	}
	cpdirs, _ := filepath.Glob(filepath.Join(e.Dir, "data", "users", "*", "checkpoints", "*"))
	for _, d := range cpdirs {
		if !all[filepath.Base(d)] {
			t.Errorf("checkpoint dir %s is not listed", d)
		}
	}
	tmp, _ := filepath.Glob(filepath.Join(e.Dir, "data", "golden", ".tmp-*"))
	if len(tmp) > 0 {
		t.Errorf("unfinished golden dirs: %v", tmp)
	}
	out, _ := exec.Command("pgrep", "-af", "qemu-system.*"+regexp.QuoteMeta(e.Dir)).Output()
	re := regexp.MustCompile(`-name noid-([0-9a-f]+),`)
	for _, m := range re.FindAllStringSubmatch(string(out), -1) {
		if !runtimes[m[1]] {
			t.Errorf("a VMM runs for runtime id %s, which the server does not list", m[1])
		}
	}
}

// crashAt runs op with the server armed to SIGKILL itself at point, then
// restarts it normally.
func crashAt(t *testing.T, e *Env, point string, op func() error) {
	t.Helper()
	e.Stop()
	e.ServerEnv = []string{"NOID_CRASHPOINT=" + point}
	e.Start()
	e.ServerEnv = nil
	err := op()
	select {
	case <-e.exited:
	case <-time.After(2 * time.Minute):
		t.Fatalf("crash point %s was never reached (op error: %v)", point, err)
	}
	if err == nil {
		t.Errorf("%s: the operation reported success although the server died", point)
	}
	e.Start()
}

func TestCrashPoints(t *testing.T) {
	e := NewEnv(t)
	e.Create("base")
	e.MustExec("base", "sh", "-c", "echo v1 > /root/state")
	if _, err := e.Client.Checkpoint(ctx(t), "base", client.CheckpointRequest{Name: "c0"}); err != nil {
		t.Fatal(err)
	}
	listed := func(name string) bool {
		_, err := e.Client.GetVM(ctx(t), name)
		return err == nil
	}
	for i, point := range []string{"create.after-insert", "create.after-boot", "create.before-running"} {
		name := fmt.Sprintf("new%d", i)
		crashAt(t, e, point, func() error { _, err := e.Client.CreateVM(ctx(t), client.CreateVMRequest{Name: name}); return err })
		checkConsistent(t, e)
		if listed(name) {
			t.Errorf("%s: half-created vm %s is listed", point, name)
		}
	}
	for i, point := range []string{"checkpoint.after-copy", "checkpoint.after-rename"} {
		name := fmt.Sprintf("cp%d", i)
		crashAt(t, e, point, func() error {
			_, err := e.Client.Checkpoint(ctx(t), "base", client.CheckpointRequest{Name: name})
			return err
		})
		checkConsistent(t, e)
		cps, _ := e.Client.ListCheckpoints(ctx(t), "base")
		if len(cps) != 1 {
			t.Errorf("%s: checkpoints %+v", point, cps)
		}
	}
	for i, point := range []string{"clone.after-insert", "clone.after-spawn"} {
		name := fmt.Sprintf("clone%d", i)
		crashAt(t, e, point, func() error { _, err := e.Client.Clone(ctx(t), "base", "c0", name); return err })
		checkConsistent(t, e)
		if listed(name) {
			t.Errorf("%s: half-made clone %s is listed", point, name)
		}
	}
	// A clone that took a blank spare, killed right after its insert. The
	// checkpoint, made with the crash point armed, prepares the spare.
	crashAt(t, e, "spare.after-insert", func() error {
		if _, err := e.Client.Checkpoint(ctx(t), "base", client.CheckpointRequest{Name: "for-spare"}); err != nil {
			t.Fatal(err)
		}
		e.WaitCloneSpare(2 * time.Minute)
		_, err := e.Client.Clone(ctx(t), "base", "for-spare", "spareclone")
		return err
	})
	checkConsistent(t, e)
	if listed("spareclone") {
		t.Error("spare.after-insert: half-made clone is listed")
	}
	// A rewind into a blank spare, killed after the files moved and before
	// the state load: the VM is reported dead (its new VMM never got its
	// state), and a second rewind works.
	crashAt(t, e, "restore.spare-after-move", func() error {
		if _, err := e.Client.Checkpoint(ctx(t), "base", client.CheckpointRequest{Name: "for-rewind"}); err != nil {
			t.Fatal(err)
		}
		e.WaitCloneSpare(2 * time.Minute)
		_, err := e.Client.Restore(ctx(t), "base", "for-rewind")
		return err
	})
	checkConsistent(t, e)
	if v, _ := e.Client.GetVM(ctx(t), "base"); v.State != "dead" {
		t.Errorf("after a crash before a spare loaded the rewound state: %s (%s)", v.State, v.StateReason)
	}
	if _, err := e.Client.Restore(ctx(t), "base", "for-rewind"); err != nil {
		t.Fatalf("rewinding again after the crash: %v", err)
	}
	for _, cp := range []string{"for-spare", "for-rewind"} {
		if err := e.Client.DeleteCheckpoint(ctx(t), "base", cp); err != nil {
			t.Fatal(err)
		}
	}
	crashAt(t, e, "restore.after-kill", func() error { _, err := e.Client.Restore(ctx(t), "base", "c0"); return err })
	checkConsistent(t, e)
	if v, _ := e.Client.GetVM(ctx(t), "base"); v.State != "dead" || !strings.Contains(v.StateReason, "restore") {
		t.Errorf("after a crash between kill and spawn: %s (%s)", v.State, v.StateReason)
	}
	if _, err := e.Client.Restore(ctx(t), "base", "c0"); err != nil {
		t.Fatalf("restoring again after the crash: %v", err)
	}
	crashAt(t, e, "restore.after-spawn", func() error { _, err := e.Client.Restore(ctx(t), "base", "c0"); return err })
	checkConsistent(t, e)
	if v, _ := e.Client.GetVM(ctx(t), "base"); v.State != "running" {
		t.Errorf("after a crash right after the restored VMM started: %s (%s)", v.State, v.StateReason)
	}
	for i, point := range []string{"destroy.after-kill", "destroy.after-rmdir"} {
		name := fmt.Sprintf("doomed%d", i)
		if _, err := e.Client.Clone(ctx(t), "base", "c0", name); err != nil {
			t.Fatal(err)
		}
		crashAt(t, e, point, func() error { _, err := e.Client.DestroyVM(ctx(t), name); return err })
		checkConsistent(t, e)
		if listed(name) {
			t.Errorf("%s: vm %s survived", point, name)
		}
	}
	crashAt(t, e, "golden.after-copy", func() error { _, err := e.Client.PromoteGolden(ctx(t), "base", "c0"); return err })
	checkConsistent(t, e)
	if gs, _ := e.Client.ListGolden(ctx(t)); len(gs) != 0 {
		t.Errorf("golden after a crash mid-promotion: %+v", gs)
	}

	// And kills at random moments of checkpoints and clones.
	rng := rand.New(rand.NewSource(time.Now().UnixNano()))
	for i := 0; i < 4; i++ {
		errc := make(chan error, 1)
		go func(i int) {
			var err error
			if i%2 == 0 {
				_, err = e.Client.Checkpoint(context.Background(), "base", client.CheckpointRequest{Name: fmt.Sprintf("r%d", i)})
			} else {
				_, err = e.Client.Clone(context.Background(), "base", "c0", fmt.Sprintf("rc%d", i))
			}
			errc <- err
		}(i)
		d := time.Duration(rng.Intn(600)) * time.Millisecond
		time.Sleep(d)
		e.Kill9()
		err := <-errc
		t.Logf("random kill %d after %v: op error %v", i, d, err)
		e.Start()
		checkConsistent(t, e)
	}
	if out := strings.TrimSpace(e.MustExec("base", "cat", "/root/state")); out != "v1" {
		t.Errorf("base lost its state: %q", out)
	}
}
