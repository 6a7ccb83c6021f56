//go:build e2e

package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/noid-vm/noid/client"
	"github.com/noid-vm/noid/internal/storage"
)

// counter reads the guest's in-memory counter from its tmpfs file.
func counter(t *testing.T, e *Env, vm string) int {
	t.Helper()
	out := strings.TrimSpace(e.MustExec(vm, "cat", "/tmp/counter"))
	n, err := strconv.Atoi(out)
	if err != nil {
		t.Fatalf("counter %q: %v", out, err)
	}
	return n
}

// waitCounter waits until the guest counter reaches at least n.
func waitCounter(t *testing.T, e *Env, vm string, n int) int {
	t.Helper()
	deadline := time.Now().Add(90 * time.Second)
	for {
		out, _, _ := e.Exec(vm, "cat", "/tmp/counter")
		if c, err := strconv.Atoi(strings.TrimSpace(out)); err == nil && c >= n {
			return c
		}
		if time.Now().After(deadline) {
			t.Fatalf("counter stuck at %q, waiting for %d", out, n)
		}
		e.MustExec(vm, "sleep", "0.3")
	}
}

const counterScript = `i=0; while true; do i=$((i+1)); echo $i > /tmp/counter.new; mv /tmp/counter.new /tmp/counter; sleep 0.2; done`

// TestCheckpointRewind: memory, CPU and disk state survive (acceptance 1),
// the clock is right after a restore (3), and rewinding twice works.
func TestCheckpointRewind(t *testing.T) {
	e := NewEnv(t)
	e.Create("rw")
	e.MustExec("rw", "sh", "-c", "setsid sh -c '"+counterScript+"' </dev/null >/dev/null 2>&1 &")
	waitCounter(t, e, "rw", 5)
	e.MustExec("rw", "sh", "-c", "echo before > /root/before && sync")
	c0 := counter(t, e, "rw")
	cp, err := e.Client.Checkpoint(ctx(t), "rw", client.CheckpointRequest{Name: "c1", Label: "counter test"})
	if err != nil {
		t.Fatal(err)
	}
	c1 := counter(t, e, "rw")
	t.Logf("checkpoint %s: pause %.1f ms, total %.1f ms, %d bytes; counter %d..%d", cp.Name, cp.PauseMs, cp.Timings.TotalMs, cp.SizeBytes, c0, c1)
	later := waitCounter(t, e, "rw", c1+25)
	e.MustExec("rw", "sh", "-c", "echo after > /root/after && sync")

	// Let the clock run on so a stale guest clock would be visible.
	time.Sleep(10 * time.Second)
	// The checkpoint prepared a blank VMM of the VM's shape: the first
	// rewind moves the VM into it (its runtime id changes, its id, MAC and
	// IP do not); the second may or may not find the refilled spare.
	e.WaitCloneSpare(2 * time.Minute)
	before, _ := e.Client.GetVM(ctx(t), "rw")
	for round := 1; round <= 2; round++ {
		restoreStart := time.Now()
		vm, err := e.Client.Restore(ctx(t), "rw", "c1")
		if err != nil {
			t.Fatalf("rewind %d: %v", round, err)
		}
		t.Logf("rewind %d: runtime %s, %+v", round, vm.RuntimeID, *vm.Timings)
		if round == 1 {
			if !vm.Timings.WarmSpare || vm.Timings.SpawnMs != 0 || vm.RuntimeID == before.RuntimeID || vm.ID != before.ID || vm.MAC != before.MAC {
				t.Errorf("rewind 1 did not move the VM into the waiting spare: before %+v, after %+v %+v", before, vm, *vm.Timings)
			}
			if out, _ := exec.Command("pgrep", "-f", "noid-"+before.RuntimeID+",").Output(); len(out) > 0 {
				t.Errorf("the VMM of the rewound run %s still runs: %s", before.RuntimeID, out)
			}
			// The console log of the boot before the rewind is kept.
			if logs, err := e.Client.Logs(ctx(t), "rw", 1<<20); err != nil || !bytes.Contains(logs, []byte("Linux version")) {
				t.Errorf("the console log lost the boot before the rewind (%v): %d bytes", err, len(logs))
			}
		}
		// The restore set the guest's clock from the host's clock read
		// during the Restore call, and it runs on from there, so when date
		// runs it reads between restoreStart and the host's clock after
		// the exec returned, however loaded the machine. A stale clock
		// would be the 10 s sleep behind. date +%s truncates to the
		// second, hence the bounds' truncation; the 1 s slack is for the
		// guest's own clocksource rate under TCG, not for any latency.
		out := strings.TrimSpace(e.MustExec("rw", "date", "+%s"))
		execEnd := time.Now()
		guest, err := strconv.ParseInt(out, 10, 64)
		if err != nil {
			t.Fatalf("rewind %d: guest date +%%s: %q", round, out)
		}
		const slack = 1
		if lo, hi := restoreStart.Unix()-slack, execEnd.Unix()+slack; guest < lo || guest > hi {
			t.Errorf("rewind %d: guest clock %d s, want within [%d, %d] (restore started at %d, the exec returned at %d, %d s slack)",
				round, guest, lo, hi, restoreStart.Unix(), execEnd.Unix(), slack)
		}
		got := counter(t, e, "rw")
		if got < c0 || got >= later {
			t.Errorf("rewind %d: counter %d, want about %d..%d (not 0, not the later %d)", round, got, c0, c1, later)
		}
		// It keeps counting from there.
		waitCounter(t, e, "rw", got+3)
		if out := e.MustExec("rw", "cat", "/root/before"); out != "before\n" {
			t.Errorf("rewind %d: /root/before = %q", round, out)
		}
		if _, _, code := e.Exec("rw", "test", "-e", "/root/after"); code == 0 {
			t.Errorf("rewind %d: /root/after, written after the checkpoint, survived", round)
		}
		e.MustExec("rw", "sh", "-c", "echo after > /root/after")
	}
	cps, err := e.Client.ListCheckpoints(ctx(t), "rw")
	if err != nil || len(cps) != 1 || cps[0].Name != "c1" || cps[0].Label != "counter test" || cps[0].SizeBytes <= 0 {
		t.Fatalf("checkpoints after rewinds: %+v %v", cps, err)
	}
	info, _ := e.Client.GetVM(ctx(t), "rw")
	if info.State != "running" {
		t.Fatalf("state after rewind: %s", info.State)
	}
}

// TestCheckpointClones: clones are independent, have their own entropy and
// hostname (acceptance 2), and a clone can be checkpointed and cloned again.
func TestCheckpointClones(t *testing.T) {
	e := NewEnv(t)
	e.Create("src")
	e.MustExec("src", "sh", "-c", "echo base > /root/base")
	if _, err := e.Client.Checkpoint(ctx(t), "src", client.CheckpointRequest{Name: "base"}); err != nil {
		t.Fatal(err)
	}
	// The checkpoint made the server prepare a blank VMM of its shape; the
	// first clone takes it and only copies files and loads state. The
	// others may or may not find the refilled spare.
	e.WaitCloneSpare(2 * time.Minute)
	names := []string{"clone-a", "clone-b", "clone-c"}
	for i, n := range names {
		vm, err := e.Client.Clone(ctx(t), "src", "base", n)
		if err != nil {
			t.Fatalf("clone %s: %v", n, err)
		}
		t.Logf("clone %s (%s): %+v", n, vm.BootReason, *vm.Timings)
		if vm.BootPath != "clone" {
			t.Errorf("clone %s boot path %q", n, vm.BootPath)
		}
		if i == 0 && (vm.BootReason != "warm spare" || vm.Timings.SpawnMs != 0) {
			t.Errorf("the first clone did not use the waiting spare: %q %+v", vm.BootReason, *vm.Timings)
		}
	}
	rand := map[string]string{}
	for _, n := range append(names, "src") {
		e.MustExec(n, "sh", "-c", "echo "+n+" > /root/who")
		r := e.MustExec(n, "sh", "-c", "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'")
		if len(r) != 64 {
			t.Fatalf("%s: urandom read %q", n, r)
		}
		for other, or := range rand {
			if or == r {
				t.Errorf("%s and %s read the same 32 random bytes", n, other)
			}
		}
		rand[n] = r
	}
	for _, n := range names {
		if got := strings.TrimSpace(e.MustExec(n, "hostname")); got != n {
			t.Errorf("hostname of %s is %q", n, got)
		}
		if got := e.MustExec(n, "cat", "/root/who"); got != n+"\n" {
			t.Errorf("%s sees /root/who = %q", n, got)
		}
		if got := e.MustExec(n, "cat", "/root/base"); got != "base\n" {
			t.Errorf("%s lost /root/base: %q", n, got)
		}
	}
	if got := strings.TrimSpace(e.MustExec("src", "hostname")); got != "src" {
		t.Errorf("original's hostname changed to %q", got)
	}
	// A clone can be checkpointed and cloned again.
	e.MustExec("clone-a", "sh", "-c", "echo second > /root/gen2")
	if _, err := e.Client.Checkpoint(ctx(t), "clone-a", client.CheckpointRequest{Name: "gen2"}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.Client.Clone(ctx(t), "clone-a", "gen2", "grandchild"); err != nil {
		t.Fatal(err)
	}
	if got := e.MustExec("grandchild", "cat", "/root/gen2", "/root/who"); got != "second\nclone-a\n" {
		t.Errorf("grandchild sees %q", got)
	}
	// Destroying the source removes its checkpoints; clones are independent.
	r := e.MustCLI("destroy", "src")
	if !strings.Contains(r, "1 checkpoints removed") {
		t.Errorf("destroy output: %q", r)
	}
	if left, _ := filepath.Glob(filepath.Join(e.Dir, "data", "users", "*", "checkpoints", "*")); len(left) != 1 {
		t.Errorf("checkpoint dirs after destroying src: %v (want only gen2)", left)
	}
	if got := e.MustExec("clone-b", "cat", "/root/base"); got != "base\n" {
		t.Errorf("clone after source destroyed: %q", got)
	}
}

// TestCheckpointBadInput covers acceptance 5.
func TestCheckpointBadInput(t *testing.T) {
	e := NewEnv(t)
	e.Create("a")
	e.Create("b", func(r *client.CreateVMRequest) { r.MemoryMiB = 320 })
	cp, err := e.Client.Checkpoint(ctx(t), "a", client.CheckpointRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if cp.Name != cp.ID || len(cp.ID) < 6 {
		t.Errorf("unnamed checkpoint got name %q id %q", cp.Name, cp.ID)
	}
	if _, err := e.Client.Checkpoint(ctx(t), "a", client.CheckpointRequest{Name: "one"}); err != nil {
		t.Fatal(err)
	}
	check := func(what string, err error, want error, msg string) {
		t.Helper()
		if !errors.Is(err, want) || !strings.Contains(err.Error(), msg) {
			t.Errorf("%s: %v; want %v containing %q", what, err, want, msg)
		}
	}
	_, err = e.Client.Checkpoint(ctx(t), "a", client.CheckpointRequest{Name: "one"})
	check("duplicate name", err, client.ErrAlreadyExists, "already exists")
	_, err = e.Client.Restore(ctx(t), "a", "nope")
	check("unknown checkpoint", err, client.ErrNotFound, "not found")
	_, err = e.Client.Checkpoint(ctx(t), "a", client.CheckpointRequest{Name: "Bad Name"})
	check("bad name", err, client.ErrInvalidArgument, "invalid checkpoint name")
	before, _ := e.Client.GetVM(ctx(t), "b")
	_, err = e.Client.Clone(ctx(t), "a", "one", "b")
	check("clone onto existing", err, client.ErrAlreadyExists, "already exists")
	after, _ := e.Client.GetVM(ctx(t), "b")
	if after.PID != before.PID || after.State != "running" {
		t.Errorf("failed clone changed b: %+v -> %+v", before, after)
	}
	_, err = e.Client.Restore(ctx(t), "b", cp.ID)
	check("different spec", err, client.ErrInvalidArgument, "needs 1 vCPUs and 256 MiB")
	if r := e.CLI("", "checkpoint", "rm", "a", "nope"); r.Code != 1 || !strings.Contains(r.Stderr, "not found") {
		t.Errorf("rm unknown: %d %q", r.Code, r.Stderr)
	}
	e.MustCLI("checkpoint", "rm", "a", "one")
	if cps, _ := e.Client.ListCheckpoints(ctx(t), "a"); len(cps) != 1 {
		t.Errorf("after rm: %d checkpoints", len(cps))
	}
	// A dead VM cannot be checkpointed.
	vm, _ := e.Client.GetVM(ctx(t), "b")
	syscall.Kill(vm.PID, syscall.SIGKILL)
	waitState(t, e, "b", "dead")
	_, err = e.Client.Checkpoint(ctx(t), "b", client.CheckpointRequest{})
	check("dead vm", err, client.ErrNotRunning, "vm is not running")
	// A rewind revives a dead VM.
	if _, err := e.Client.Checkpoint(ctx(t), "a", client.CheckpointRequest{Name: "two"}); err != nil {
		t.Fatal(err)
	}
}

func waitState(t *testing.T, e *Env, vm, state string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		v, err := e.Client.GetVM(ctx(t), vm)
		if err == nil && v.State == state {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s never became %s: %+v %v", vm, state, v, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestCheckpointFaults covers acceptance 4: kills in the middle of a
// checkpoint, and a full disk.
func TestCheckpointFaults(t *testing.T) {
	e := NewEnv(t)
	e.Create("f", func(r *client.CreateVMRequest) { r.MemoryMiB = 512 })
	// Touch memory so the checkpoint has real work to do.
	e.MustExec("f", "sh", "-c", "dd if=/dev/urandom of=/tmp/fill bs=1M count=160 2>/dev/null")
	cpRoot := filepath.Join(e.Dir, "data", "users")

	t.Run("kill server mid-checkpoint", func(t *testing.T) {
		go e.Client.Checkpoint(context.Background(), "f", client.CheckpointRequest{Name: "killed"})
		waitGlob(t, filepath.Join(cpRoot, "*", "checkpoints", ".tmp-*", "memory.snap"))
		e.Kill9()
		e.Start()
		cps, err := e.Client.ListCheckpoints(ctx(t), "f")
		if err != nil || len(cps) != 0 {
			t.Fatalf("after a kill mid-checkpoint: %+v %v", cps, err)
		}
		if left, _ := filepath.Glob(filepath.Join(cpRoot, "*", "checkpoints", "*")); len(left) != 0 {
			t.Errorf("partial checkpoint files left: %v", left)
		}
		vm, _ := e.Client.GetVM(ctx(t), "f")
		if vm.State != "running" {
			t.Fatalf("vm after restart: %s (%s)", vm.State, vm.StateReason)
		}
		if got := strings.TrimSpace(e.MustExec("f", "echo", "alive")); got != "alive" {
			t.Fatalf("exec after interrupted checkpoint: %q", got)
		}
		// And a checkpoint works again.
		if _, err := e.Client.Checkpoint(ctx(t), "f", client.CheckpointRequest{Name: "after-kill"}); err != nil {
			t.Fatal(err)
		}
		e.MustCLI("checkpoint", "rm", "f", "after-kill")
	})

	t.Run("full disk", func(t *testing.T) {
		u, _ := filepath.Glob(filepath.Join(cpRoot, "*", "checkpoints"))
		if len(u) != 1 {
			t.Fatalf("checkpoint dirs: %v", u)
		}
		img := filepath.Join(e.Dir, "small.img")
		mustRun(t, "truncate", "-s", "48M", img)
		mustRun(t, "mkfs.ext4", "-q", img)
		mustRun(t, "mount", "-o", "loop", img, u[0])
		defer exec.Command("umount", u[0]).Run()
		_, err := e.Client.Checkpoint(ctx(t), "f", client.CheckpointRequest{Name: "full"})
		if !errors.Is(err, client.ErrResourceExhausted) || !strings.Contains(err.Error(), "full") {
			t.Fatalf("checkpoint onto a full disk: %v", err)
		}
		if got := strings.TrimSpace(e.MustExec("f", "echo", "still")); got != "still" {
			t.Fatalf("vm after failed checkpoint: %q", got)
		}
		if cps, _ := e.Client.ListCheckpoints(ctx(t), "f"); len(cps) != 0 {
			t.Errorf("failed checkpoint listed: %+v", cps)
		}
		ents, _ := os.ReadDir(u[0])
		for _, en := range ents {
			if en.Name() != "lost+found" {
				t.Errorf("left on the full disk: %s", en.Name())
			}
		}
	})

	t.Run("kill vmm mid-checkpoint", func(t *testing.T) {
		vm, _ := e.Client.GetVM(ctx(t), "f")
		errc := make(chan error, 1)
		go func() {
			_, err := e.Client.Checkpoint(context.Background(), "f", client.CheckpointRequest{Name: "vmm-killed"})
			errc <- err
		}()
		waitGlob(t, filepath.Join(cpRoot, "*", "checkpoints", ".tmp-*", "memory.snap"))
		syscall.Kill(vm.PID, syscall.SIGKILL)
		if err := <-errc; err == nil {
			t.Fatal("checkpoint succeeded although its VMM was killed")
		} else {
			t.Logf("checkpoint error: %v", err)
		}
		waitState(t, e, "f", "dead")
		if cps, _ := e.Client.ListCheckpoints(ctx(t), "f"); len(cps) != 0 {
			t.Errorf("partial checkpoint listed: %+v", cps)
		}
		if left, _ := filepath.Glob(filepath.Join(cpRoot, "*", "checkpoints", "*")); len(left) != 0 {
			t.Errorf("partial checkpoint files left: %v", left)
		}
	})
}

func waitGlob(t *testing.T, pattern string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		if m, _ := filepath.Glob(pattern); len(m) > 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s never appeared", pattern)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func mustRun(t *testing.T, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %v: %v\n%s", name, args, err, out)
	}
}

var _ = fmt.Sprint
var _ sync.Mutex

// TestRewindRefusesDamagedCheckpoint: a rewind or clone to a checkpoint
// whose files were removed, truncated or damaged on the host is refused
// before the VM is touched, and a checkpoint that passes its checks but
// does not load is refused too: the VM keeps running as it was, with the
// same VMM, its memory (a counter process) and its disk (a file written
// after the checkpoint).
func TestRewindRefusesDamagedCheckpoint(t *testing.T) {
	e := NewEnv(t)
	e.Create("dmg")
	e.MustExec("dmg", "sh", "-c", "setsid sh -c '"+counterScript+"' </dev/null >/dev/null 2>&1 &")
	waitCounter(t, e, "dmg", 2)
	cpRoot := filepath.Join(e.Dir, "data", "users")
	checkpoint := func(name string) string {
		t.Helper()
		cp, err := e.Client.Checkpoint(ctx(t), "dmg", client.CheckpointRequest{Name: name})
		if err != nil {
			t.Fatal(err)
		}
		dirs, _ := filepath.Glob(filepath.Join(cpRoot, "*", "checkpoints", cp.ID))
		if len(dirs) != 1 {
			t.Fatalf("checkpoint %s (%s) has no directory: %v", name, cp.ID, dirs)
		}
		return dirs[0]
	}
	// The marker is written after every checkpoint: a rewind would remove it.
	e.MustExec("dmg", "sh", "-c", "echo after > /root/after && sync")
	flipMiddle := func(p string) {
		f, err := os.OpenFile(p, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		fi, _ := f.Stat()
		// Find a non-zero byte near the middle (a hole reads as zeros and
		// writing one there would not change the content a rewind loads).
		buf := make([]byte, 1<<20)
		for off := fi.Size() / 2; ; off = (off + int64(len(buf))) % fi.Size() {
			n, _ := f.ReadAt(buf, off)
			for i := 0; i < n; i++ {
				if buf[i] != 0 {
					if _, err := f.WriteAt([]byte{^buf[i]}, off+int64(i)); err != nil {
						t.Fatal(err)
					}
					return
				}
			}
		}
	}
	// topLayer is the disk layer a checkpoint froze: its own (the layers
	// below it are shared with the VM, and the bottom with the image).
	// own gives the checkpoint a private copy of a file before it is
	// damaged, so that the running VM, which reads the same layer, is not.
	topLayer := func(dir string) string {
		m, _ := filepath.Glob(filepath.Join(dir, "disk-*"))
		sort.Strings(m)
		if len(m) < 2 {
			t.Fatalf("checkpoint disk chain: %v", m)
		}
		return m[len(m)-1]
	}
	own := func(p string) string {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		os.Remove(p)
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	truncateHalf := func(p string) {
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(p, fi.Size()/2); err != nil {
			t.Fatal(err)
		}
	}
	// stateLoadsBadly garbles the device state but records the garbled
	// file's size and checksum, as if the checkpoint had been written so:
	// the checks pass and the state load itself fails.
	stateLoadsBadly := func(dir string) {
		p := filepath.Join(dir, "vmstate.snap")
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		for i := 64; i < len(b); i += 97 {
			b[i] ^= 0x5a
		}
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		size, sum, err := storage.Checksum(context.Background(), p)
		if err != nil {
			t.Fatal(err)
		}
		mp := filepath.Join(dir, "meta.json")
		var meta map[string]any
		mb, _ := os.ReadFile(mp)
		if err := json.Unmarshal(mb, &meta); err != nil {
			t.Fatal(err)
		}
		files, _ := meta["files"].(map[string]any)
		if files == nil {
			t.Fatalf("meta.json records no file checksums: %s", mb)
		}
		files["vmstate.snap"] = map[string]any{"size": size, "sum": sum}
		mb, _ = json.Marshal(meta)
		if err := os.WriteFile(mp, mb, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	cases := []struct {
		name   string
		damage func(dir string)
		want   string // in the error
	}{
		{"memory removed", func(d string) { os.Remove(filepath.Join(d, "memory.snap")) }, "memory.snap is missing"},
		{"memory truncated", func(d string) { truncateHalf(filepath.Join(d, "memory.snap")) }, "memory.snap has"},
		{"memory damaged", func(d string) { flipMiddle(filepath.Join(d, "memory.snap")) }, "memory.snap is damaged"},
		{"state removed", func(d string) { os.Remove(filepath.Join(d, "vmstate.snap")) }, "vmstate.snap is missing"},
		{"state truncated", func(d string) { truncateHalf(filepath.Join(d, "vmstate.snap")) }, "vmstate.snap has"},
		{"disk removed", func(d string) { os.Remove(topLayer(d)) }, ".qcow2 is missing"},
		{"disk truncated", func(d string) { truncateHalf(own(topLayer(d))) }, ".qcow2 has"},
		{"disk damaged", func(d string) { flipMiddle(own(topLayer(d))) }, ".qcow2 is damaged"},
		{"base removed", func(d string) { os.Remove(filepath.Join(d, "disk-0000.raw")) }, "disk-0000.raw is missing"},
		{"metadata removed", func(d string) { os.Remove(filepath.Join(d, "meta.json")) }, "metadata"},
		{"state does not load", stateLoadsBadly, "did not load"},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cpName := fmt.Sprintf("cp%d", i)
			dir := checkpoint(cpName)
			e.MustExec("dmg", "sh", "-c", "echo after > /root/after && sync")
			before, err := e.Client.GetVM(ctx(t), "dmg")
			if err != nil {
				t.Fatal(err)
			}
			c0 := counter(t, e, "dmg")
			tc.damage(dir)
			_, err = e.Client.Restore(ctx(t), "dmg", cpName)
			if !errors.Is(err, client.ErrConflict) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("rewind to a checkpoint with %s: %v, want a conflict error mentioning %q", tc.name, err, tc.want)
			}
			if _, err := e.Client.Clone(ctx(t), "dmg", cpName, "dmg-clone"); err == nil {
				t.Errorf("clone of a checkpoint with %s succeeded", tc.name)
				e.Client.DestroyVM(ctx(t), "dmg-clone")
			} else if _, gerr := e.Client.GetVM(ctx(t), "dmg-clone"); !errors.Is(gerr, client.ErrNotFound) {
				t.Errorf("a refused clone left a VM behind: %v", gerr)
			}
			after, err := e.Client.GetVM(ctx(t), "dmg")
			if err != nil || after.State != "running" || after.PID != before.PID || after.RuntimeID != before.RuntimeID {
				t.Fatalf("vm after the refused rewind: %+v %v (before: pid %d runtime %s)", after, err, before.PID, before.RuntimeID)
			}
			// Memory and disk are the VM's own, not the checkpoint's.
			waitCounter(t, e, "dmg", c0+2)
			if out := e.MustExec("dmg", "cat", "/root/after"); out != "after\n" {
				t.Fatalf("/root/after = %q after a refused rewind", out)
			}
		})
	}
	// A whole checkpoint still rewinds (a positive control for the checks).
	checkpoint("whole")
	e.MustExec("dmg", "sh", "-c", "echo later > /root/later && sync")
	if _, err := e.Client.Restore(ctx(t), "dmg", "whole"); err != nil {
		t.Fatalf("rewind to an intact checkpoint: %v", err)
	}
	if _, _, code := e.Exec("dmg", "test", "-e", "/root/later"); code == 0 {
		t.Error("the rewind to an intact checkpoint kept a file written after it")
	}
}
