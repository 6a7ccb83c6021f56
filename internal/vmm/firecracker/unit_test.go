package firecracker

import (
	"errors"
	"os"
	"strings"
	"testing"

	"github.com/noid-vm/noid/internal/errdefs"
	"github.com/noid-vm/noid/internal/vmm"
)

func TestVersions(t *testing.T) {
	for in, want := range map[string]Semver{
		"Firecracker v1.16.1":     {1, 16, 1},
		"1.16.1-dev":              {1, 16, 1},
		"Firecracker v2.0.0\nfoo": {2, 0, 0},
	} {
		got, err := ParseVersion(in)
		if err != nil || got != want {
			t.Errorf("ParseVersion(%q) = %v, %v", in, got, err)
		}
	}
	if _, err := ParseVersion("garbage"); err == nil {
		t.Error("garbage parsed")
	}
	for v, ok := range map[Semver]bool{
		{1, 16, 1}: true, {1, 17, 0}: true, {1, 99, 9}: true,
		{1, 16, 0}: false, {1, 15, 1}: false, {0, 25, 0}: false, {2, 0, 0}: false,
	} {
		if err := SupportedVersion(v); (err == nil) != ok {
			t.Errorf("SupportedVersion(%v) = %v", v, err)
		}
	}
}

func TestFCID(t *testing.T) {
	if got := fcID("vm_01.a/b"); got != "vm-01-a-b" {
		t.Fatal(got)
	}
	if got := fcID(strings.Repeat("x", 100)); len(got) != 64 {
		t.Fatal(len(got))
	}
	if got := fcID("550e8400-e29b-41d4-a716-446655440000"); got != "550e8400-e29b-41d4-a716-446655440000" {
		t.Fatal(got)
	}
}

func TestValidateSpec(t *testing.T) {
	good := vmm.Spec{ID: "a", Dir: "/d", Disk: "/d/disk", VCPUs: 1, MemoryMiB: 128, Accel: vmm.AccelKVM}
	if err := validateSpec(good); err != nil {
		t.Fatal(err)
	}
	bad := good
	bad.VCPUs, bad.Dir, bad.Net = 64, "rel", &vmm.NetSpec{}
	err := validateSpec(bad)
	if !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), "64 vCPUs") ||
		!strings.Contains(err.Error(), `dir "rel"`) || !strings.Contains(err.Error(), "without a TAP") {
		t.Fatalf("got %v", err)
	}
}

func TestJailerCommand(t *testing.T) {
	b := New(Config{Binary: "/usr/local/bin/firecracker", JailerMode: JailerAlways, CgroupVersion: 1,
		JailerCgroups: []string{"cpu.shares=512", "cpuset.cpus=0-1", "cpu.cfs_quota_us=50000"}})
	spec := vmm.Spec{ID: "vm_7", Dir: "/var/lib/noid/vms/vm_7",
		Sandbox: &vmm.Sandbox{UID: 1007, GID: 900, CgroupPath: "noid/vm-7"}}
	l := b.layoutFor(spec)
	if l.Root != "/var/lib/noid/vms/vm_7/jail/firecracker/vm-7/root" || l.UID != 1007 || l.GID != 900 {
		t.Fatalf("layout %+v", l)
	}
	wantCg := []string{"/sys/fs/cgroup/cpu/noid/vm-7", "/sys/fs/cgroup/cpuset/noid/vm-7"}
	if strings.Join(l.Cgroups, ",") != strings.Join(wantCg, ",") {
		t.Fatalf("cgroups %v", l.Cgroups)
	}
	cmd := b.command(spec, l)
	got := strings.Join(cmd.Args[1:], " ")
	want := "--id vm-7 --exec-file /usr/local/bin/firecracker --uid 1007 --gid 900 " +
		"--chroot-base-dir /var/lib/noid/vms/vm_7/jail --cgroup-version 1 --parent-cgroup noid " +
		"--cgroup cpu.shares=512 --cgroup cpuset.cpus=0-1 --cgroup cpu.cfs_quota_us=50000 -- --api-sock api.sock"
	if cmd.Path != "/usr/local/bin/jailer" || got != want {
		t.Fatalf("jailer command:\n got %s %s\nwant /usr/local/bin/jailer %s", cmd.Path, got, want)
	}

	// A cgroup path not ending in the id is the parent; v2 has one root.
	spec.Sandbox.CgroupPath = "/machines"
	b2 := New(Config{JailerMode: JailerAlways, CgroupVersion: 2, ChrootBaseDir: "/srv/jailer"})
	l2 := b2.layoutFor(spec)
	if l2.Root != "/srv/jailer/firecracker/vm-7/root" || strings.Join(l2.Cgroups, ",") != "/sys/fs/cgroup/machines/vm-7" {
		t.Fatalf("layout %+v", l2)
	}
	// Without a sandbox the config's uid and gid apply, and no cgroup.
	b3 := New(Config{JailerMode: JailerAlways, JailUID: 500, JailGID: 500})
	l3 := b3.layoutFor(vmm.Spec{ID: "x", Dir: "/d"})
	if l3.UID != 500 || len(l3.Cgroups) != 0 || strings.Contains(strings.Join(b3.command(vmm.Spec{ID: "x", Dir: "/d"}, l3).Args, " "), "cgroup ") {
		t.Fatalf("layout %+v", l3)
	}
	// Non-jailed: firecracker directly, in <Dir>/fc.
	b4 := New(Config{JailerMode: JailerNever})
	l4 := b4.layoutFor(vmm.Spec{ID: "x", Dir: "/d", MemFile: ""})
	c4 := b4.command(vmm.Spec{ID: "x", Dir: "/d"}, l4)
	if l4.Jailed || l4.Root != "/d/fc" || l4.Base != "/d/fc-base.mem" || c4.Dir != "/d/fc" ||
		strings.Join(c4.Args[1:], " ") != "--api-sock api.sock --id x" {
		t.Fatalf("plain layout %+v %v", l4, c4.Args)
	}
}

func TestAdoptable(t *testing.T) {
	if err := adoptable(0, "x"); !errors.Is(err, vmm.ErrGone) {
		t.Fatal(err)
	}
	if err := adoptable(os.Getpid(), "not-me"); !errors.Is(err, vmm.ErrGone) {
		t.Fatal(err)
	}
	if err := adoptable(1<<22+12345, "x"); !errors.Is(err, vmm.ErrGone) {
		t.Fatal(err)
	}
}

func TestCheckMetaMessages(t *testing.T) {
	spec := vmm.Spec{VCPUs: 1, MemoryMiB: 256}
	if err := CheckMeta(vmm.SnapshotMeta{Backend: "firecracker", VCPUs: 1, MemoryMiB: 256}, spec); err != nil {
		t.Fatal(err)
	}
	err := CheckMeta(vmm.SnapshotMeta{VCPUs: 1, MemoryMiB: 256}, spec)
	if !errors.Is(err, ErrWrongBackend) || !strings.Contains(err.Error(), "unknown backend") {
		t.Fatal(err)
	}
}
