//go:build e2e

package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/noid-vm/noid/client"
	"github.com/noid-vm/noid/internal/testutil"
)

// provision runs scripts/provision-golden.sh against e with extra args.
func provision(t *testing.T, e *Env, extra string, args ...string) string {
	t.Helper()
	root, _ := testutil.RepoRoot()
	cmd := exec.Command(filepath.Join(root, "scripts", "provision-golden.sh"), args...)
	cmd.Env = append(os.Environ(), "NOID="+e.Bins.Noid, "NOID_URL=unix://"+e.Socket, "PROVISION_EXTRA="+extra)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("provision-golden.sh %v: %v\n%s", args, err, out)
	}
	return string(out)
}

// copyKernel gives the env its own kernel file, so a test can change it.
func copyKernel(t *testing.T, e *Env) string {
	img := testutil.TinyImage(t)
	k := filepath.Join(e.Dir, "vmlinuz")
	b, err := os.ReadFile(img.Kernel)
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(k, b, 0o644)
	cfg := strings.Replace(readFile(t, e.Config), fmt.Sprintf("kernel = %q", img.Kernel), fmt.Sprintf("kernel = %q", k), 1)
	os.WriteFile(e.Config, []byte(cfg), 0o600)
	e.Stop()
	e.Start()
	return k
}

func TestGolden(t *testing.T) {
	e := NewEnv(t)
	kernel := copyKernel(t, e)

	// 6 and 1: the script, default mode, with a marker installed.
	out := provision(t, e, "echo golden-marker > /root/marker")
	if !strings.Contains(out, "golden snapshot for 1 vCPU/256 MiB promoted") {
		t.Fatalf("provision output:\n%s", out)
	}
	if vms, _ := e.Client.ListVMs(ctx(t)); len(vms) != 0 {
		t.Fatalf("provisioning left VMs: %+v", vms)
	}
	// 3: the source VM and its checkpoint are gone (the script destroyed
	// them); the golden is self-contained.
	if left, _ := filepath.Glob(filepath.Join(e.Dir, "data", "users", "*", "checkpoints", "*")); len(left) != 0 {
		t.Fatalf("provisioning left checkpoints: %v", left)
	}
	// Memory, device state, metadata and the disk chain (the base image,
	// the frozen overlays).
	for _, f := range []string{"memory.snap", "vmstate.snap", "config.json", "disk-0000.raw", "disk-0001.qcow2"} {
		if _, err := os.Stat(filepath.Join(e.Dir, "data", "golden", "1x256", f)); err != nil {
			t.Errorf("golden layout: %v", err)
		}
	}
	cfg := readFile(t, filepath.Join(e.Dir, "data", "golden", "1x256", "config.json"))
	if strings.Contains(cfg, "/users/") || strings.Contains(cfg, "_provision/") {
		t.Errorf("golden config refers to its source's paths:\n%s", cfg)
	}

	// Promotion prepares a warm spare: the create then only loads state.
	waitSpares(t, e, 1)
	start := time.Now()
	vm := e.Create("g1")
	t.Logf("golden create took %v (%+v)", time.Since(start), *vm.Timings)
	if vm.BootPath != "golden" || vm.BootReason != "warm spare" {
		t.Fatalf("boot path %q (%s), want golden from a warm spare", vm.BootPath, vm.BootReason)
	}
	if vm.Timings.SpawnMs != 0 || vm.Timings.CopyMs != 0 {
		t.Errorf("a create from a warm spare spawned or copied: %+v", *vm.Timings)
	}
	// A VM made from a spare is a VM like any other: it checkpoints,
	// rewinds and clones.
	e.MustExec("g1", "sh", "-c", "echo from-spare > /root/spare")
	if _, err := e.Client.Checkpoint(ctx(t), "g1", client.CheckpointRequest{Name: "s"}); err != nil {
		t.Fatalf("checkpoint of a VM made from a spare: %v", err)
	}
	e.MustExec("g1", "rm", "/root/spare")
	if _, err := e.Client.Restore(ctx(t), "g1", "s"); err != nil {
		t.Fatal(err)
	}
	if _, err := e.Client.Clone(ctx(t), "g1", "s", "g1-clone"); err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"g1", "g1-clone"} {
		if got := e.MustExec(n, "cat", "/root/spare", "/root/marker"); got != "from-spare\ngolden-marker\n" {
			t.Errorf("%s: %q", n, got)
		}
	}
	e.MustCLI("destroy", "g1-clone")
	// The pool refills itself.
	waitSpares(t, e, 1)
	if got := e.MustExec("g1", "cat", "/root/marker"); got != "golden-marker\n" {
		t.Fatalf("marker in golden VM: %q", got)
	}
	if got := strings.TrimSpace(e.MustExec("g1", "hostname")); got != "g1" {
		t.Errorf("hostname %q", got)
	}
	var info client.VM
	json.Unmarshal([]byte(e.MustCLI("info", "g1", "--json")), &info)
	if info.BootPath != "golden" {
		t.Errorf("info boot_path %q", info.BootPath)
	}

	// 2: a mismatched spec cold-boots and says why; a second golden for it
	// is then used too.
	vm2 := e.Create("m1", func(r *client.CreateVMRequest) { r.MemoryMiB = 320 })
	if vm2.BootPath != "cold" || !strings.Contains(vm2.BootReason, "no golden snapshot for 1 vCPU/320 MiB") {
		t.Errorf("mismatched spec: %q %q", vm2.BootPath, vm2.BootReason)
	}
	e.MustExec("m1", "sh", "-c", "echo second-golden > /root/marker2")
	e.MustCLI("checkpoint", "m1", "g320")
	e.MustCLI("golden", "promote", "m1", "g320")
	vm3 := e.Create("m2", func(r *client.CreateVMRequest) { r.MemoryMiB = 320 })
	vm4 := e.Create("m3")
	if vm3.BootPath != "golden" || vm4.BootPath != "golden" {
		t.Errorf("two goldens: %q %q", vm3.BootPath, vm4.BootPath)
	}
	if got := e.MustExec("m2", "cat", "/root/marker2"); got != "second-golden\n" {
		t.Errorf("320 MiB golden content: %q", got)
	}
	var gl []client.Golden
	json.Unmarshal([]byte(e.MustCLI("golden", "list", "--json")), &gl)
	if len(gl) != 2 {
		t.Errorf("golden list: %+v", gl)
	}
	e.MustCLI("destroy", "m1", "m2", "m3", "g1")

	// 5: ten parallel creates from golden.
	var wg sync.WaitGroup
	rands := make([]string, 10)
	errs := make(chan error, 10)
	for i := 0; i < 10; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			name := fmt.Sprintf("p%d", i)
			v, err := e.Client.CreateVM(ctx(t), client.CreateVMRequest{Name: name})
			if err != nil {
				errs <- err
				return
			}
			if v.BootPath != "golden" {
				errs <- fmt.Errorf("%s boot path %s (%s)", name, v.BootPath, v.BootReason)
			}
			var out bytes.Buffer
			e.Client.Exec(ctx(t), name, client.ExecRequest{Argv: []string{"sh", "-c", "hostname; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'"}}, client.ExecIO{Stdout: &out, Stderr: io.Discard})
			lines := strings.Split(out.String(), "\n")
			if len(lines) < 2 || lines[0] != name {
				errs <- fmt.Errorf("%s: %q", name, out.String())
				return
			}
			rands[i] = lines[1]
		}(i)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	seen := map[string]bool{}
	for _, r := range rands {
		if r == "" || seen[r] {
			t.Errorf("entropy not distinct across golden VMs: %q", rands)
			break
		}
		seen[r] = true
	}
	for i := 0; i < 10; i++ {
		e.Client.DestroyVM(ctx(t), fmt.Sprintf("p%d", i))
	}

	// 4: a changed kernel makes the golden stale: create cold-boots with a
	// warning, list marks it, nothing breaks.
	f, _ := os.OpenFile(kernel, os.O_APPEND|os.O_WRONLY, 0)
	f.Write([]byte{0})
	f.Close()
	r := e.CLI("", "create", "after-kernel")
	if r.Code != 0 || !strings.Contains(r.Stderr, "warning: golden snapshot for 1 vCPU/256 MiB is stale: the kernel changed") {
		t.Fatalf("create with stale golden: %d\n%s\n%s", r.Code, r.Stdout, r.Stderr)
	}
	if strings.Count(strings.TrimSpace(r.Stderr), "\n") != 0 {
		t.Errorf("stale warning is not one line: %q", r.Stderr)
	}
	json.Unmarshal([]byte(e.MustCLI("info", "after-kernel", "--json")), &info)
	if info.BootPath != "cold" || !strings.Contains(info.BootReason, "stale") {
		t.Errorf("after kernel change: %q %q", info.BootPath, info.BootReason)
	}
	e.MustExec("after-kernel", "true")
	if !strings.Contains(e.MustCLI("golden", "list"), "STALE: the kernel changed") {
		t.Errorf("golden list does not mark the stale golden:\n%s", e.MustCLI("golden", "list"))
	}
}

// waitSpares waits until the default golden has n warm spares.
func waitSpares(t *testing.T, e *Env, n int) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for {
		gs, err := e.Client.ListGolden(ctx(t))
		if err == nil {
			for _, g := range gs {
				if g.MemoryMiB == 256 && g.Spares >= n {
					return
				}
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("the golden never got %d warm spares: %+v %v", n, gs, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestGoldenFromCheckpoint runs the script's --from-checkpoint mode.
func TestGoldenFromCheckpoint(t *testing.T) {
	e := NewEnv(t)
	e.Create("src")
	e.MustExec("src", "sh", "-c", "echo from-cp > /root/m")
	cp, err := e.Client.Checkpoint(ctx(t), "src", client.CheckpointRequest{Name: "ready"})
	if err != nil {
		t.Fatal(err)
	}
	provision(t, e, "", "--from-checkpoint", cp.ID)
	// Promote again: the old one is backed up, and it is safe to repeat.
	provision(t, e, "", "--from-checkpoint", cp.ID)
	if b, _ := filepath.Glob(filepath.Join(e.Dir, "data", "golden", ".backup", "1x256-*")); len(b) != 1 {
		t.Errorf("backups: %v", b)
	}
	e.MustCLI("destroy", "src")
	vm := e.Create("g")
	if vm.BootPath != "golden" {
		t.Fatalf("boot path %s (%s)", vm.BootPath, vm.BootReason)
	}
	if got := e.MustExec("g", "cat", "/root/m"); got != "from-cp\n" {
		t.Fatalf("content %q", got)
	}
	e.MustCLI("golden", "rm", "--vcpus", "1", "--memory", "256")
	if r := e.CLI("", "golden", "rm", "--vcpus", "1", "--memory", "256"); r.Code != 1 || !strings.Contains(r.Stderr, "not found") {
		t.Errorf("second rm: %d %q", r.Code, r.Stderr)
	}
}
