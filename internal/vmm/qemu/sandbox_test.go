package qemu

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/noid-vm/noid/internal/agent/client"
	"github.com/noid-vm/noid/internal/agent/proto"
	"github.com/noid-vm/noid/internal/sandbox"
	"github.com/noid-vm/noid/internal/storage"
	"github.com/noid-vm/noid/internal/testutil"
	"github.com/noid-vm/noid/internal/vmm"
	"github.com/noid-vm/noid/internal/vmm/vmmtest"
)

// confinedBackend returns a QEMU backend with the host's real cgroups
// (under a parent private to the test) and a uid pool in a temp dir.
func confinedBackend(t testing.TB) (*Backend, *sandbox.Manager, *sandbox.UIDPool) {
	t.Helper()
	testutil.RequireRoot(t)
	l, err := sandbox.Detect(sandbox.DetectOptions{})
	if err != nil {
		t.Skipf("no usable cgroups: %v", err)
	}
	parent := fmt.Sprintf("noid-qemu-test-%d", os.Getpid())
	m, err := sandbox.NewManager(l, parent)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		m.Prune(context.Background(), 0)
		for _, h := range l.Hierarchies {
			syscall.Rmdir(filepath.Join(h.Mount, parent))
		}
	})
	pool, err := sandbox.OpenUIDPool(t.TempDir(), sandbox.DefaultUIDBase, sandbox.DefaultUIDCount)
	if err != nil {
		t.Fatal(err)
	}
	return New(Options{Cgroups: m, UIDs: pool}), m, pool
}

func testAccel(t *testing.T) vmm.Accel {
	accel, _, err := vmm.ResolveAccel(vmm.AccelAuto, vmm.ProbeKVM())
	if err != nil {
		t.Fatal(err)
	}
	return accel
}

// TestConformanceConfined runs the backend conformance suite (boot, exec,
// checkpoint, clone, adopt, kill, snapshot refusal) with every QEMU
// confined: seccomp, a per-VM uid and a cgroup with limits.
func TestConformanceConfined(t *testing.T) {
	b, _, _ := confinedBackend(t)
	img := testutil.TinyImage(t)
	vmmtest.Run(t, vmmtest.Setup{Backend: b, Kernel: img.Kernel, Initrd: img.Initrd, Rootfs: img.Rootfs, Accel: testAccel(t)})
}

// vmDirIn makes a tree shaped like noid's data dir (root-owned, 0700 at
// every level) and returns the directory of one VM in it.
func vmDirIn(t testing.TB, root, id string) string {
	d := filepath.Join(root, "users", "1", "vms", id)
	if err := os.MkdirAll(d, 0o700); err != nil {
		t.Fatal(err)
	}
	return d
}

func bootConfined(t *testing.T, b *Backend, root, id string, kernel, initrd, rootfs string) (vmm.Spec, vmm.Instance) {
	t.Helper()
	dir := vmDirIn(t, root, id)
	spec := vmm.Spec{
		ID: id, Name: id, Dir: dir, RunDir: filepath.Join(root, "run"), VCPUs: 1, MemoryMiB: 256,
		Kernel: kernel, Initrd: initrd, Disk: filepath.Join(dir, "disk.ext4"), MemFile: filepath.Join(dir, "mem.raw"),
		Accel: testAccel(t), SerialLog: filepath.Join(dir, "serial.log"), Sandbox: &vmm.Sandbox{Seccomp: true},
	}
	if err := b.NewDisk(context.Background(), dir, rootfs, 0, &storage.Copier{}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	inst, err := b.Boot(ctx, spec)
	if err != nil {
		t.Fatalf("boot %s: %v", id, err)
	}
	t.Cleanup(func() { inst.Kill(context.Background()) })
	return spec, inst
}

// procStatus returns the fields of /proc/<pid>/status.
func procStatus(t *testing.T, pid int) map[string]string {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]string{}
	for _, line := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if ok {
			m[k] = strings.Join(strings.Fields(v), " ")
		}
	}
	return m
}

// catAs runs cat on path as uid:gid and returns its stderr and whether it
// succeeded.
func catAs(t *testing.T, uid uint32, path string) (string, bool) {
	t.Helper()
	cmd := exec.Command("cat", path)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid}}
	cmd.Stdout = io.Discard
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	err := cmd.Run()
	return stderr.String(), err == nil
}

func agentRun(t *testing.T, inst vmm.Instance, argv ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	conn, err := inst.DialAgent(ctx)
	if err != nil {
		t.Fatal(err)
	}
	c, err := client.Connect(ctx, conn, client.Options{})
	if err != nil {
		t.Fatalf("agent: %v", err)
	}
	defer c.Close()
	p, err := c.Exec(ctx, proto.ExecRequest{Argv: argv})
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	go io.Copy(io.Discard, p.Stderr())
	io.Copy(&out, p.Stdout())
	if ex, err := p.Wait(); err != nil || ex.Code != 0 {
		t.Fatalf("%v: %v %+v", argv, err, ex)
	}
	return out.String()
}

// TestConfinement boots two confined VMs and checks, from the host: each
// QEMU runs as its own unprivileged uid with seccomp on and no way back to
// root, sits in its cgroup with the limits set, cannot open its neighbour's
// disk (nor, through the data dir, anything else), and its cgroup and uid
// are released when it is killed.
func TestConfinement(t *testing.T) {
	b, m, pool := confinedBackend(t)
	img := testutil.TinyImage(t)
	root := t.TempDir() // 0700, root-owned, like the data dir
	specA, a := bootConfined(t, b, root, "confa", img.Kernel, img.Initrd, img.Rootfs)
	specB, bb := bootConfined(t, b, root, "confb", img.Kernel, img.Initrd, img.Rootfs)
	uidA, okA := pool.Lookup("confa")
	uidB, okB := pool.Lookup("confb")
	if !okA || !okB || uidA == uidB || uidA < sandbox.DefaultUIDBase || uidB < sandbox.DefaultUIDBase {
		t.Fatalf("uids %d (%v) and %d (%v): want two distinct leased uids", uidA, okA, uidB, okB)
	}

	t.Run("uid and seccomp", func(t *testing.T) {
		for _, c := range []struct {
			pid int
			uid uint32
		}{{a.Pid(), uidA}, {bb.Pid(), uidB}} {
			st := procStatus(t, c.pid)
			u := strconv.FormatUint(uint64(c.uid), 10)
			if st["Uid"] != strings.Repeat(u+" ", 3)+u || st["Gid"] != strings.Repeat(u+" ", 3)+u {
				t.Errorf("pid %d: Uid %q Gid %q, want %s everywhere", c.pid, st["Uid"], st["Gid"], u)
			}
			if st["Groups"] != "" {
				t.Errorf("pid %d: supplementary groups %q", c.pid, st["Groups"])
			}
			if st["Seccomp"] != "2" || st["NoNewPrivs"] != "1" {
				t.Errorf("pid %d: Seccomp %q NoNewPrivs %q, want 2 and 1", c.pid, st["Seccomp"], st["NoNewPrivs"])
			}
			if st["CapEff"] != "0000000000000000" || st["CapPrm"] != "0000000000000000" {
				t.Errorf("pid %d: capabilities eff %s prm %s", c.pid, st["CapEff"], st["CapPrm"])
			}
		}
	})

	t.Run("no network", func(t *testing.T) {
		own, _ := os.Readlink("/proc/self/ns/net")
		ns, err := os.Readlink("/proc/" + strconv.Itoa(a.Pid()) + "/ns/net")
		if err != nil || ns == own {
			t.Fatalf("qemu's netns %q (%v), the test's %q", ns, err, own)
		}
		dev, err := os.ReadFile("/proc/" + strconv.Itoa(a.Pid()) + "/net/dev")
		if err != nil {
			t.Fatal(err)
		}
		var ifs []string
		for _, line := range strings.Split(string(dev), "\n")[2:] {
			if name, _, ok := strings.Cut(strings.TrimSpace(line), ":"); ok {
				ifs = append(ifs, name)
			}
		}
		if len(ifs) != 1 || ifs[0] != "lo" {
			t.Errorf("interfaces in qemu's netns: %v, want only lo", ifs)
		}
	})

	t.Run("cgroup and limits", func(t *testing.T) {
		cg, _ := m.Open("confa")
		if ok, err := cg.Has(a.Pid()); !ok || err != nil {
			t.Fatalf("qemu of a not in its cgroup: %v %v", ok, err)
		}
		lim, err := cg.Limits()
		want := b.limits(specA)
		if err != nil || lim != want || lim.MemoryBytes != 256<<20+MemoryOverhead {
			t.Errorf("limits %+v (%v), want %+v", lim, err, want)
		}
		b, _ := os.ReadFile("/proc/" + strconv.Itoa(a.Pid()) + "/cgroup")
		for _, h := range m.Layout().Hierarchies {
			if !bytes.Contains(b, []byte(":/"+cg.Path()+"\n")) {
				t.Errorf("/proc/pid/cgroup lacks %s in %s:\n%s", cg.Path(), h.Mount, b)
			}
		}
		if ok, _ := cg.Has(bb.Pid()); ok {
			t.Error("b's qemu is in a's cgroup")
		}
	})

	t.Run("files", func(t *testing.T) {
		c, err := chain(specB.Dir)
		if err != nil || len(c) != 2 {
			t.Fatalf("b's disk chain: %v %v", c, err)
		}
		top := c[len(c)-1]
		for _, f := range []string{top, specB.SerialLog} {
			var st syscall.Stat_t
			if err := syscall.Stat(f, &st); err != nil {
				t.Fatal(err)
			}
			if st.Uid != uidB || st.Gid != uidB || st.Mode&0o777 != 0o600 {
				t.Errorf("%s: owner %d:%d mode %o, want %d:%d 0600", f, st.Uid, st.Gid, st.Mode&0o777, uidB, uidB)
			}
		}
		// a's uid cannot open b's disk: not by its path, not through b's
		// open fds in /proc.
		if msg, ok := catAs(t, uidA, top); ok || !strings.Contains(msg, "Permission denied") {
			t.Errorf("uid of a reading b's disk: ok=%v %q", ok, msg)
		}
		fds, _ := os.ReadDir("/proc/" + strconv.Itoa(bb.Pid()) + "/fd")
		tried := 0
		for _, fd := range fds {
			p := "/proc/" + strconv.Itoa(bb.Pid()) + "/fd/" + fd.Name()
			if dst, _ := os.Readlink(p); dst == top {
				tried++
				if msg, ok := catAs(t, uidA, p); ok {
					t.Errorf("uid of a read b's disk through %s: %q", p, msg)
				}
			}
		}
		if tried == 0 {
			t.Error("b's qemu holds no fd of its disk")
		}
		// Nor its own files by path: the data dir is not traversable.
		if _, ok := catAs(t, uidA, specA.Disk); ok {
			t.Error("uid of a opened a path under the data dir")
		}
		// Control: the file modes alone also keep a out (b's disk, copied
		// to a traversable place with its owner and mode), and b's uid
		// can read it, so the checks above can fail.
		open, err := os.MkdirTemp("", "noid-control-")
		if err != nil {
			t.Fatal(err)
		}
		defer os.RemoveAll(open)
		os.Chmod(open, 0o755)
		cp := filepath.Join(open, "disk")
		if err := os.WriteFile(cp, []byte("secret"), 0o600); err != nil {
			t.Fatal(err)
		}
		os.Chown(cp, int(uidB), int(uidB))
		if _, ok := catAs(t, uidA, cp); ok {
			t.Error("uid of a read a 0600 file of b's uid")
		}
		if msg, ok := catAs(t, uidB, cp); !ok {
			t.Errorf("control: b's uid cannot read its own file: %s", msg)
		}
	})

	t.Run("guest works", func(t *testing.T) {
		if out := agentRun(t, a, "sh", "-c", "echo hello > /root/x && cat /root/x"); out != "hello\n" {
			t.Errorf("exec in a: %q", out)
		}
		// What a booted tiny guest costs, against the limits.
		cg, _ := m.Open("confa")
		for _, d := range cg.Dirs() {
			for _, f := range []string{"memory.max_usage_in_bytes", "memory.peak", "pids.current"} {
				if b, err := os.ReadFile(filepath.Join(d, f)); err == nil {
					t.Logf("%s: %s", f, strings.TrimSpace(string(b)))
				}
			}
		}
		t.Logf("threads: %s", procStatus(t, a.Pid())["Threads"])
	})

	t.Run("frozen layers", func(t *testing.T) {
		// Two checkpoints freeze the first top and then the second: QEMU
		// keeps a writable fd of the current top only, and the frozen
		// layers go back to root, so the VMM's uid can write none of
		// what checkpoints and clones share.
		cp := &storage.Copier{}
		for n := range 2 {
			snap := filepath.Join(root, fmt.Sprintf("cp%d", n))
			if err := os.Mkdir(snap, 0o700); err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			_, err := a.Checkpoint(ctx, snap, cp)
			cancel()
			if err != nil {
				t.Fatalf("checkpoint %d: %v", n, err)
			}
		}
		c, err := chain(specA.Dir)
		if err != nil || len(c) != 4 {
			t.Fatalf("a's disk chain after two checkpoints: %v %v", c, err)
		}
		top := c[len(c)-1]
		writable := map[string]int{}
		fds, _ := os.ReadDir("/proc/" + strconv.Itoa(a.Pid()) + "/fd")
		for _, fd := range fds {
			dst, _ := os.Readlink("/proc/" + strconv.Itoa(a.Pid()) + "/fd/" + fd.Name())
			info, err := os.ReadFile("/proc/" + strconv.Itoa(a.Pid()) + "/fdinfo/" + fd.Name())
			if err != nil {
				continue
			}
			var flags int64
			for _, line := range strings.Split(string(info), "\n") {
				if v, ok := strings.CutPrefix(line, "flags:"); ok {
					flags, _ = strconv.ParseInt(strings.TrimSpace(v), 8, 64)
				}
			}
			if flags&syscall.O_ACCMODE != syscall.O_RDONLY {
				writable[dst]++
			}
		}
		if writable[top] == 0 {
			t.Errorf("qemu holds no writable fd of its top %s: %v", top, writable)
		}
		for _, l := range c[:len(c)-1] {
			if writable[l] > 0 {
				t.Errorf("qemu holds %d writable fds of the frozen layer %s", writable[l], l)
			}
			var st syscall.Stat_t
			if err := syscall.Stat(l, &st); err != nil {
				t.Fatal(err)
			}
			if st.Uid != 0 || st.Gid != 0 {
				t.Errorf("frozen layer %s owned by %d:%d, want root", l, st.Uid, st.Gid)
			}
		}
		if out := agentRun(t, a, "sh", "-c", "echo after > /root/y && sync && cat /root/y"); out != "after\n" {
			t.Errorf("exec in a after the checkpoints: %q", out)
		}
	})

	t.Run("command line", func(t *testing.T) {
		b, err := os.ReadFile("/proc/" + strconv.Itoa(a.Pid()) + "/cmdline")
		if err != nil {
			t.Fatal(err)
		}
		cmd := string(bytes.ReplaceAll(b, []byte{0}, []byte(" ")))
		if !strings.Contains(cmd, "data="+specA.Dir) || strings.Contains(cmd, "-runas") || !strings.Contains(cmd, "/proc/self/fd/") {
			t.Errorf("cmdline %s", cmd)
		}
	})

	t.Run("kill releases", func(t *testing.T) {
		cg, _ := m.Open("confb")
		if err := bb.Kill(context.Background()); err != nil {
			t.Fatal(err)
		}
		for _, d := range cg.Dirs() {
			if _, err := os.Stat(d); !os.IsNotExist(err) {
				t.Errorf("cgroup %s left after kill", d)
			}
		}
		if _, ok := pool.Lookup("confb"); ok {
			t.Error("uid lease of b left after kill")
		}
	})

	// A QEMU that dies on its own (here SIGKILL from outside, after a
	// server restart re-adopted it) releases its cgroup and uid without a
	// Kill: found by the chaos soak (issue 16), where a dead VM kept both
	// until it was destroyed or rewound.
	t.Run("unexpected exit releases", func(t *testing.T) {
		cg, _ := m.Open("confa")
		pid := a.Pid()
		a.Close() // as a server that stops: the VMM runs on
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		adopted, err := b.Adopt(ctx, specA, pid)
		if err != nil {
			t.Fatalf("adopting a: %v", err)
		}
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		select {
		case <-adopted.Done():
		case <-ctx.Done():
			t.Fatal("the adopted instance did not see its VMM exit")
		}
		var left []string
		for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(50 * time.Millisecond) {
			left = nil
			for _, d := range cg.Dirs() {
				if _, err := os.Stat(d); !os.IsNotExist(err) {
					left = append(left, d)
				}
			}
			if _, ok := pool.Lookup("confa"); ok {
				left = append(left, "uid lease of confa")
			}
			if len(left) == 0 || time.Now().After(deadline) {
				break
			}
		}
		if len(left) > 0 {
			t.Errorf("30s after its VMM was killed from outside, still there: %v", left)
		}
	})
}

// TestArgsConfined checks the command line of a confined QEMU: no -runas
// (it would die of SIGSYS under elevateprivileges=deny), the NIC as an fd,
// the disk chain through fd sets, the marker naming the VM's directory,
// and no change for unconfined VMs; and that guest RAM is never a shared
// file unless a VM from before copy-on-write RAM brings one.
func TestArgsConfined(t *testing.T) {
	spec := vmm.Spec{ID: "x", Name: "x", Dir: "/data/users/1/vms/x", MemoryMiB: 128, VCPUs: 1, Kernel: "/k", Initrd: "/i",
		SerialLog: "/proc/self/fd/9",
		Net:       &vmm.NetSpec{Tap: "noidt1", MAC: "02:00:00:00:00:01"}, Sandbox: &vmm.Sandbox{Seccomp: true, UID: 1234, GID: 1234}}
	files := VMFiles{Disks: []DiskFile{{Path: "/dev/fdset/1"}, {Path: "/dev/fdset/2", Qcow2: true}}, Mem: "/proc/self/fd/8"}
	conf := strings.Join(args(spec, files, false, argOpts{tapFD: 10, filesDir: "/data,x", tbSizeMiB: 256,
		fdSets: []fdSet{{fd: 6, set: 1}, {fd: 7, set: 2}}}), " ")
	for _, want := range []string{"-netdev tap,id=net0,fd=10 ", "-accel tcg,tb-size=256 ", "secret,id=noid-files,format=raw,data=/data,,x", "-sandbox on,obsolete=deny,elevateprivileges=deny",
		"memory-backend-file,id=ram,size=128M,mem-path=/proc/self/fd/8,share=off ", "-add-fd fd=6,set=1 -add-fd fd=7,set=2 ",
		`"driver":"raw","file":{"aio":"threads","driver":"file","filename":"/dev/fdset/1","locking":"off","read-only":true},"node-name":"layer0","read-only":true`,
		`"backing":"layer0","cache":{"direct":false,"no-flush":false},"discard":"unmap","driver":"qcow2","file":{"aio":"threads","driver":"file","filename":"/dev/fdset/2","locking":"off"},"node-name":"root"`,
		"-device virtio-blk-device,drive=root "} {
		if !strings.Contains(conf, want) {
			t.Errorf("confined args lack %q:\n%s", want, conf)
		}
	}
	plain := strings.Join(Args(spec, VMFiles{Disks: []DiskFile{{Path: "/d/disk.ext4"}}}, false), " ")
	for _, bad := range []string{"-runas", "secret", "fd=10", "tb-size", "share=on", "-add-fd"} {
		if strings.Contains(conf, "-runas") || strings.Contains(plain, bad) {
			t.Errorf("args contain %q:\nconfined: %s\nplain: %s", bad, conf, plain)
		}
	}
	for _, want := range []string{"ifname=noidt1,script=no,downscript=no,vnet_hdr=on", "-object memory-backend-ram,id=ram,size=128M ", `"filename":"/d/disk.ext4"`} {
		if !strings.Contains(plain, want) {
			t.Errorf("plain args lack %q: %s", want, plain)
		}
	}
	legacy := strings.Join(Args(spec, VMFiles{Disks: []DiskFile{{Path: "/d/disk.ext4"}}, Mem: "/d/mem.raw", MemShared: true}, false), " ")
	if !strings.Contains(legacy, "mem-path=/d/mem.raw,share=on") {
		t.Errorf("a VM with a shared RAM file from before lost it: %s", legacy)
	}
}

// benchSpawn measures Boot (spawn up to QMP ready) and Kill.
func benchSpawn(b *testing.B, be *Backend, sb *vmm.Sandbox) {
	testutil.RequireRoot(b)
	img := testutil.TinyImage(b)
	root := b.TempDir()
	accel, _, _ := vmm.ResolveAccel(vmm.AccelAuto, vmm.ProbeKVM())
	for i := 0; b.Loop(); i++ {
		b.StopTimer()
		id := fmt.Sprintf("bench%d", i)
		dir := vmDirIn(b, root, id)
		spec := vmm.Spec{ID: id, Name: id, Dir: dir, RunDir: filepath.Join(root, "run"), VCPUs: 1, MemoryMiB: 256,
			Kernel: img.Kernel, Initrd: img.Initrd, Accel: accel, SerialLog: filepath.Join(dir, "serial.log"), Sandbox: sb}
		if err := be.NewDisk(context.Background(), dir, img.Rootfs, 0, &storage.Copier{}); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		inst, err := be.Boot(context.Background(), spec)
		if err != nil {
			b.Fatal(err)
		}
		if err := inst.Kill(context.Background()); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkSpawnSeccompOnly is the spawn cost before confinement: seccomp
// only, root, no cgroup.
func BenchmarkSpawnSeccompOnly(b *testing.B) {
	benchSpawn(b, New(Options{}), &vmm.Sandbox{Seccomp: true})
}

// BenchmarkSpawnConfined adds the per-VM uid, the fds and the cgroup.
func BenchmarkSpawnConfined(b *testing.B) {
	be, _, _ := confinedBackend(b)
	benchSpawn(b, be, &vmm.Sandbox{Seccomp: true})
}
