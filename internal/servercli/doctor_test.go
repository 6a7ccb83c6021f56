package servercli

import (
	"bytes"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/noid-vm/noid/internal/config"
	"github.com/noid-vm/noid/internal/remote/remotetest"
	"github.com/noid-vm/noid/internal/vmm"
)

// testDoctor is a doctor for a config on a data dir of its own, seeing the
// real host except where a test replaces a probe.
func testDoctor(t *testing.T, toml string) *doctor {
	t.Helper()
	dir := t.TempDir()
	path := filepath.Join(dir, "config.toml")
	if err := os.WriteFile(path, []byte("data_dir = \""+filepath.Join(dir, "data")+"\"\n"+toml), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	return newDoctor(cfg)
}

func statusOf(t *testing.T, fs []finding) status {
	t.Helper()
	if len(fs) != 1 {
		t.Fatalf("want one finding, got %+v", fs)
	}
	return fs[0].status
}

func TestDoctorDataDir(t *testing.T) {
	d := testDoctor(t, "")
	dir := d.cfg.DataDir
	if s := statusOf(t, d.dataDir()); s != statusOK {
		t.Errorf("a data dir that serve will create: %s", s)
	}
	for mode, want := range map[os.FileMode]status{0o700: statusOK, 0o750: statusWarn, 0o755: statusWarn, 0o777: statusFail} {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(dir, mode); err != nil {
			t.Fatal(err)
		}
		fs := d.dataDir()
		if s := statusOf(t, fs); s != want {
			t.Errorf("mode %04o: %s (%s), want %s", mode, s, fs[0].msg, want)
		}
		if want != statusOK && !strings.Contains(fs[0].fix, "chmod 700 "+dir) {
			t.Errorf("mode %04o: fix %q", mode, fs[0].fix)
		}
	}
	// Another owner.
	d.euid = func() int { return os.Geteuid() + 1 }
	if err := os.Chmod(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if s := statusOf(t, d.dataDir()); s != statusFail {
		t.Errorf("a data dir of another uid: %s", s)
	}
	d.euid = os.Geteuid
	os.RemoveAll(dir)
	if err := os.WriteFile(dir, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if s := statusOf(t, d.dataDir()); s != statusFail {
		t.Errorf("a data dir that is a file: %s", s)
	}
}

func TestDoctorFreeSpace(t *testing.T) {
	d := testDoctor(t, "")
	for _, c := range []struct {
		free, size uint64 // in 4 KiB blocks
		want       status
	}{
		{free: 50 << 18, size: 100 << 18, want: statusOK},    // 50 GiB of 100
		{free: 5 << 18, size: 100 << 18, want: statusWarn},   // 5 GiB: under 10 GiB
		{free: 20 << 18, size: 1000 << 18, want: statusWarn}, // 20 GiB of 1000: under 10 %
		{free: 100 << 8, size: 100 << 18, want: statusFail},  // 100 MiB
		{free: 1000 << 18, size: 2000 << 18, want: statusOK}, // 1000 GiB of 2000
		{free: 255 << 8, size: 10 << 18, want: statusFail},   // 255 MiB of 10 GiB
	} {
		d.statfs = func(path string, st *unix.Statfs_t) error {
			st.Bsize, st.Bavail, st.Blocks = 4096, c.free, c.size
			return nil
		}
		fs := d.freeSpace()
		if s := statusOf(t, fs); s != c.want {
			t.Errorf("%d of %d blocks free: %s (%s), want %s", c.free, c.size, s, fs[0].msg, c.want)
		}
	}
	// The real filesystem of the test's temp dir answers.
	d.statfs = unix.Statfs
	if fs := d.freeSpace(); !strings.Contains(fs[0].msg, "free of") {
		t.Errorf("real statfs: %+v", fs)
	}
	// With the reflink image, the storage root is checked too.
	d = testDoctor(t, "[storage]\nreflink_image_size = \"10G\"\n")
	if fs := d.freeSpace(); len(fs) != 2 || !strings.HasPrefix(fs[1].msg, "storage:") {
		t.Errorf("with a reflink image: %+v", fs)
	}
}

func TestDoctorKVM(t *testing.T) {
	for _, c := range []struct {
		toml   string
		usable bool
		want   status
	}{
		{"", true, statusOK},
		{"", false, statusWarn},
		{"accel = \"kvm\"\n", false, statusFail},
		{"vmm = \"firecracker\"\n", false, statusFail},
		{"accel = \"tcg\"\n", false, statusWarn},
	} {
		d := testDoctor(t, c.toml)
		d.kvm = func() vmm.KVMStatus {
			if c.usable {
				return vmm.KVMStatus{Usable: true}
			}
			return vmm.KVMStatus{Reason: "/dev/kvm is not usable (no such file)"}
		}
		fs := d.kvmCheck()
		if s := statusOf(t, fs); s != c.want {
			t.Errorf("%q usable=%v: %s, want %s", c.toml, c.usable, s, c.want)
		}
		if !c.usable && fs[0].fix == "" {
			t.Errorf("%q: no fix for a missing KVM", c.toml)
		}
	}
	// This host's real answer is never a failure with accel = auto.
	if s := statusOf(t, testDoctor(t, "").kvmCheck()); s == statusFail {
		t.Errorf("this host's KVM with accel = auto: %s", s)
	}
}

func TestDoctorVMMBinary(t *testing.T) {
	if s := statusOf(t, testDoctor(t, "qemu_binary = \"/nonexistent/qemu\"\n").vmmBinary()); s != statusFail {
		t.Errorf("a missing qemu_binary: %s", s)
	}
	if s := statusOf(t, testDoctor(t, "qemu_binary = \"/bin/true\"\n").vmmBinary()); s != statusOK {
		t.Errorf("an existing qemu_binary: %s", s)
	}
	if s := statusOf(t, testDoctor(t, "vmm = \"firecracker\"\nfirecracker_binary = \"/nonexistent/fc\"\n").vmmBinary()); s != statusFail {
		t.Errorf("a missing firecracker: %s", s)
	}
}

func TestDoctorLoopAndStorage(t *testing.T) {
	d := testDoctor(t, "")
	d.loopControl = filepath.Join(t.TempDir(), "loop-control")
	if s := statusOf(t, d.loop()); s != statusWarn {
		t.Errorf("no loop device without a reflink image: %s", s)
	}
	d = testDoctor(t, "[storage]\nreflink_image_size = \"10G\"\n")
	d.loopControl = filepath.Join(t.TempDir(), "loop-control")
	if s := statusOf(t, d.loop()); s != statusFail {
		t.Errorf("no loop device with a reflink image: %s", s)
	}
	d.lookPath = func(string) (string, error) { return "", errors.New("not found") }
	if s := statusOf(t, d.storage()); s != statusFail {
		t.Errorf("a reflink image to create without mkfs.xfs: %s", s)
	}
	// A real data dir is probed for reflink or sparse copies.
	d = testDoctor(t, "")
	if err := os.MkdirAll(d.cfg.DataDir, 0o700); err != nil {
		t.Fatal(err)
	}
	fs := d.storage()
	if statusOf(t, fs) != statusOK || !(strings.Contains(fs[0].msg, "copies are reflinks") || strings.Contains(fs[0].msg, "copies are sparse copies")) {
		t.Errorf("probing %s: %+v", d.cfg.DataDir, fs)
	}
}

// TestStorageReportAgreesWithDoctor runs `noid-server storage` (no server
// runs, so it probes under the data dir's lock) for each [storage] mode on
// the test's temporary directory, which has no reflinks here (ext4), and
// checks that it prints the setting, what it resolved to and why, that
// it fails where the server would refuse to start, and that doctor's
// storage finding says the same.
func TestStorageReportAgreesWithDoctor(t *testing.T) {
	dir := t.TempDir()
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil || st.Type != unix.EXT4_SUPER_MAGIC {
		t.Skipf("the temporary directory %s is not on ext4 (%v)", dir, err)
	}
	for _, tc := range []struct {
		toml, mode, resolved, why string
		fails                     bool
	}{
		{"", "auto", "copy", "ext4 has no reflinks; checkpoints, rewinds and clones do not copy data", false},
		{"[storage]\nmode = \"copy\"\n", "copy", "copy", `[storage] mode = "copy" (and ext4 has no reflinks)`, false},
		{"[storage]\nmode = \"reflink\"\n", "reflink", "none: noid-server refuses to start", "has no reflinks", true},
		{"[storage]\nreflink_image_size = \"2G\"\n", "auto", "reflink-image", "[storage] reflink_image_size keeps storage on the loop-mounted XFS image " + filepath.Join(dir, "data", "reflink.img"), false},
	} {
		path := filepath.Join(dir, "config.toml")
		if err := os.WriteFile(path, []byte("data_dir = \""+filepath.Join(dir, "data")+"\"\n"+tc.toml), 0o600); err != nil {
			t.Fatal(err)
		}
		var out bytes.Buffer
		root := newRoot(&env{stdout: &out, stderr: &out})
		root.SetArgs([]string{"storage", "--config", path})
		err := root.Execute()
		if (err != nil) != tc.fails {
			t.Errorf("%q: storage exited with %v, want failure %v\n%s", tc.toml, err, tc.fails, out.String())
		}
		lines := map[string]string{}
		for _, l := range strings.Split(out.String(), "\n") {
			if k, v, ok := strings.Cut(l, ":"); ok {
				lines[k] = strings.TrimSpace(v)
			}
		}
		if lines["mode"] != tc.mode || lines["resolved"] != tc.resolved || !strings.Contains(lines["why"], tc.why) {
			t.Errorf("%q: storage printed mode %q, resolved %q, why %q; want %q, %q, %q\n%s", tc.toml, lines["mode"], lines["resolved"], lines["why"], tc.mode, tc.resolved, tc.why, out.String())
		}
		cfg, err := config.Load(path)
		if err != nil {
			t.Fatal(err)
		}
		f := newDoctor(cfg).storage()
		switch {
		case len(f) != 1:
			t.Errorf("%q: doctor: %+v", tc.toml, f)
		case tc.fails:
			if f[0].status != statusFail || !strings.Contains(f[0].msg, tc.why) || f[0].fix == "" {
				t.Errorf("%q: doctor does not fail as storage does: %+v", tc.toml, f[0])
			}
		case f[0].status != statusOK || !strings.Contains(f[0].msg, "resolves to "+tc.resolved+": ") || !strings.Contains(f[0].msg, lines["why"]):
			t.Errorf("%q: doctor says %+v, storage said resolved %q, why %q", tc.toml, f[0], lines["resolved"], lines["why"])
		}
	}
}

func TestDoctorCgroupsAndNetwork(t *testing.T) {
	d := testDoctor(t, "")
	d.cgroups = func() (string, error) { return "", errors.New("no memory controller") }
	if s := statusOf(t, d.cgroupsCheck()); s != statusWarn {
		t.Errorf("cgroups without controllers: %s", s)
	}
	if s := statusOf(t, testDoctor(t, "[sandbox]\ncgroups = false\n").cgroupsCheck()); s != statusOK {
		t.Errorf("cgroups off: %s", s)
	}
	d.nftables = func() error { return errors.New("protocol not supported") }
	d.link = func(string) (*net.Interface, bool, error) { return &net.Interface{Index: 3}, false, nil }
	fs := d.network()
	if len(fs) != 2 || fs[0].status != statusFail || fs[1].status != statusFail {
		t.Errorf("no nftables and a bridge name taken by another interface: %+v", fs)
	}
	d.nftables = func() error { return nil }
	d.link = func(string) (*net.Interface, bool, error) { return nil, false, errors.New("no such network interface") }
	if fs := d.network(); fs[0].status != statusOK || fs[1].status != statusOK {
		t.Errorf("nftables and a bridge to create: %+v", fs)
	}
	if fs := testDoctor(t, "[network]\nenabled = false\n").network(); len(fs) != 1 || fs[0].status != statusOK {
		t.Errorf("networking off: %+v", fs)
	}
}

// TestDoctorCommand: `noid-server doctor` checks this host for real,
// prints a line per check and exits 1 when one fails.
func TestDoctorCommand(t *testing.T) {
	dir := t.TempDir()
	run := func(toml string) (string, error) {
		path := filepath.Join(dir, "config.toml")
		if err := os.WriteFile(path, []byte("data_dir = \""+filepath.Join(dir, "data")+"\"\n"+toml), 0o600); err != nil {
			t.Fatal(err)
		}
		var out bytes.Buffer
		e := &env{stdout: &out, stderr: &out}
		root := newRoot(e)
		root.SetArgs([]string{"doctor", "--config", path})
		err := root.Execute()
		return out.String(), err
	}
	out, err := run("qemu_binary = \"/bin/true\"\n[network]\nenabled = false\n")
	if err != nil {
		t.Errorf("doctor on a usable config: %v\n%s", err, out)
	}
	for _, check := range []string{"kvm", "vmm", "image", "data dir", "disk", "storage", "loop", "cgroups", "network", "remote", "server"} {
		if !strings.Contains(out, " "+check+" ") {
			t.Errorf("doctor printed no %s line:\n%s", check, out)
		}
	}
	out, err = run("qemu_binary = \"/nonexistent/qemu\"\n[network]\nenabled = false\n")
	if err == nil || !strings.Contains(out, "FAIL  vmm") || !strings.Contains(out, "fix: apt-get install qemu-system-x86") {
		t.Errorf("doctor with no QEMU: %v\n%s", err, out)
	}
}

// TestDoctorRemote: the remote check against a real store: off, working,
// wrong secret, missing bucket, a credentials file others may read.
func TestDoctorRemote(t *testing.T) {
	if f := testDoctor(t, "").remoteStore(); statusOf(t, f) != statusOK || !strings.Contains(f[0].msg, "no remote store") {
		t.Errorf("no [remote]: %+v", f)
	}
	srv := remotetest.Start(t)
	sec := srv.TOML(t, srv.Addr, "")
	f := testDoctor(t, sec).remoteStore()
	if statusOf(t, f) != statusOK || strings.Contains(f[0].msg, remotetest.SecretKey) {
		t.Errorf("working store: %+v", f)
	}
	bad := filepath.Join(t.TempDir(), "bad")
	os.WriteFile(bad, []byte("access_key_id = \"noidtestaccess\"\nsecret_access_key = \"nope\"\n"), 0o600)
	c := srv.Config(t, srv.Addr, "")
	c.CredentialsFile = bad
	f = testDoctor(t, remotetest.RemoteTOML(c)).remoteStore()
	if statusOf(t, f) != statusFail || !strings.Contains(f[0].msg, "refused the server's credentials") || !strings.Contains(f[0].fix, "credentials_file") {
		t.Errorf("wrong secret: %+v", f)
	}
	c = srv.Config(t, srv.Addr, "")
	c.Bucket = "missing"
	f = testDoctor(t, remotetest.RemoteTOML(c)).remoteStore()
	if statusOf(t, f) != statusFail || !strings.Contains(f[0].msg, `bucket "missing" does not exist`) || !strings.Contains(f[0].fix, "create the bucket") {
		t.Errorf("missing bucket: %+v", f)
	}
	os.Chmod(bad, 0o644)
	c.CredentialsFile = bad
	f = testDoctor(t, remotetest.RemoteTOML(c)).remoteStore()
	if statusOf(t, f) != statusFail || !strings.Contains(f[0].msg, "chmod 600") {
		t.Errorf("credentials file of mode 0644: %+v", f)
	}
}
