package image

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/noid-vm/noid/internal/errdefs"
)

func inode(t testing.TB, path string) uint64 {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return st.Sys().(*syscall.Stat_t).Ino
}

func mtime(t testing.TB, path string) time.Time {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return st.ModTime()
}

// checkTinyImage verifies a built tiny image in depth.
func checkTinyImage(t *testing.T, img *Image, agent string) {
	t.Helper()
	if err := img.Verify(); err != nil {
		t.Fatal(err)
	}
	if rel, err := KernelVersionFromBzImage(img.Kernel); err != nil || rel != img.KernelRelease {
		t.Errorf("kernel release %q (%v), manifest says %q", rel, err, img.KernelRelease)
	}
	// ext4 is consistent and holds busybox, its applets and the agent.
	if out, err := exec.Command("e2fsck", "-fn", img.Rootfs).CombinedOutput(); err != nil {
		t.Errorf("e2fsck: %v\n%s", err, out)
	}
	bin := debugfs(t, img.Rootfs, "ls -l /bin")
	if !strings.Contains(bin, " busybox") || !strings.Contains(bin, "100755") {
		t.Errorf("/bin lacks an executable busybox:\n%s", bin)
	}
	if sh := debugfs(t, img.Rootfs, "stat /bin/sh"); !strings.Contains(sh, `Fast link dest: "/bin/busybox"`) {
		t.Errorf("/bin/sh is not a link to busybox:\n%s", sh)
	}
	ag := debugfs(t, img.Rootfs, "stat /usr/local/bin/noid-agent")
	if !strings.Contains(ag, "Mode:  0755") || !strings.Contains(ag, "User:     0") {
		t.Errorf("agent inode:\n%s", ag)
	}
	dumped := filepath.Join(t.TempDir(), "agent")
	debugfs(t, img.Rootfs, "dump /usr/local/bin/noid-agent "+dumped)
	want, _ := sha256File(agent)
	if got, _ := sha256File(dumped); got != want {
		t.Errorf("agent in rootfs has sha256 %s, want %s", got, want)
	}
	for _, f := range []string{"/etc/passwd", "/etc/group", "/etc/hosts", "/etc/resolv.conf", "/etc/hostname"} {
		if out := debugfs(t, img.Rootfs, "stat "+f); !strings.Contains(out, "Type: regular") {
			t.Errorf("%s missing:\n%s", f, out)
		}
	}
	for _, d := range []string{"/root", "/tmp", "/proc", "/sys", "/dev", "/run"} {
		if out := debugfs(t, img.Rootfs, "stat "+d); !strings.Contains(out, "Type: directory") {
			t.Errorf("%s missing:\n%s", d, out)
		}
	}
	if out := debugfs(t, img.Rootfs, "stat /tmp"); !strings.Contains(out, "Mode:  01777") {
		t.Errorf("/tmp is not 1777:\n%s", out)
	}
	if out := debugfs(t, img.Rootfs, "cat /etc/passwd"); !strings.Contains(out, "\nnoid:x:1000:1000:noid:/home/noid:/bin/sh\n") {
		t.Errorf("/etc/passwd lacks the noid user:\n%s", out)
	}
	if out := debugfs(t, img.Rootfs, "stat /home/noid"); !strings.Contains(out, "Type: directory") || !strings.Contains(out, "User:  1000") {
		t.Errorf("/home/noid:\n%s", out)
	}
	// The rootfs is sparse and sized as asked.
	st, _ := os.Stat(img.Rootfs)
	if st.Size() != DefaultTinyRootfsSize {
		t.Errorf("rootfs is %d bytes, want %d", st.Size(), DefaultTinyRootfsSize)
	}
	if used := st.Sys().(*syscall.Stat_t).Blocks * 512; used > 64<<20 {
		t.Errorf("rootfs uses %d bytes on disk; not sparse?", used)
	}
	// The initramfs lists the modules and carries the agent as /init.
	f, err := os.Open(img.Initrd)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	ents, err := readCpio(f)
	if err != nil {
		t.Fatal(err)
	}
	var initSHA, modules string
	for _, e := range ents {
		switch e.Name {
		case "init":
			p := filepath.Join(t.TempDir(), "init")
			os.WriteFile(p, e.Data, 0o644)
			initSHA, _ = sha256File(p)
		case "etc/noid/modules":
			modules = string(e.Data)
		}
	}
	if initSHA != want {
		t.Errorf("/init is not the agent")
	}
	m, err := readManifest(img.Dir)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(m.Modules, "\n")+"\n" != modules {
		t.Errorf("manifest modules %q differ from /etc/noid/modules %q", m.Modules, modules)
	}
	if m.AgentSHA256 != want {
		t.Errorf("manifest agent sha %s, want %s", m.AgentSHA256, want)
	}
}

// TestBuildTiny builds the tiny image end to end, then checks that a second
// Build does no work, that changing the agent rebuilds only what contains it,
// and that Load finds the result.
func TestBuildTiny(t *testing.T) {
	requireRoot(t)
	requireTool(t, "mkfs.ext4", "debugfs", "e2fsck")
	dataDir := seedDataDir(t, false)
	agent := standinAgent(t)
	ctx := context.Background()

	log := &testLogWriter{t: t}
	start := time.Now()
	img, err := Build(ctx, BuildOptions{DataDir: dataDir, Tiny: true, AgentBinary: agent, Progress: log})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("tiny build (kernel cached): %s", time.Since(start))
	if !img.Tiny || img.Name != NameTiny || img.Dir != filepath.Join(dataDir, "images", "tiny") {
		t.Errorf("image: %+v", img)
	}
	checkTinyImage(t, img, agent)

	loaded, err := Load(dataDir, true)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(loaded, img) {
		t.Errorf("Load = %+v\nBuild = %+v", loaded, img)
	}
	if _, err := Load(dataDir, false); !errors.Is(err, errdefs.ErrNotFound) || !strings.Contains(err.Error(), "noid-server image build") {
		t.Errorf("Load(debian) before building it: %v", err)
	}

	// Second build: a cache hit that touches nothing.
	files := []string{FileManifest, FileKernel, FileVmlinux, FileInitrd, FileRootfs}
	inodes, mtimes := map[string]uint64{}, map[string]time.Time{}
	for _, f := range files {
		inodes[f] = inode(t, filepath.Join(img.Dir, f))
		mtimes[f] = mtime(t, filepath.Join(img.Dir, f))
	}
	dirIno := inode(t, img.Dir)
	log2 := &testLogWriter{t: t}
	start = time.Now()
	img2, err := Build(ctx, BuildOptions{DataDir: dataDir, Tiny: true, AgentBinary: agent, Progress: log2})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("cached build: %s", time.Since(start))
	if !reflect.DeepEqual(img2, img) {
		t.Errorf("cached Build returned %+v, want %+v", img2, img)
	}
	if inode(t, img.Dir) != dirIno {
		t.Error("cached Build replaced the image directory")
	}
	for _, f := range files {
		if inode(t, filepath.Join(img.Dir, f)) != inodes[f] || !mtime(t, filepath.Join(img.Dir, f)).Equal(mtimes[f]) {
			t.Errorf("cached Build rewrote %s", f)
		}
	}
	if !strings.Contains(log2.String(), "up to date") || strings.Contains(log2.String(), "kernel:") {
		t.Errorf("cached Build progress: %q", log2.String())
	}

	// A new agent: initramfs and rootfs are rebuilt, the kernel is carried over.
	agent2 := variantAgent(t, agent, "2")
	log3 := &testLogWriter{t: t}
	start = time.Now()
	img3, err := Build(ctx, BuildOptions{DataDir: dataDir, Tiny: true, AgentBinary: agent2, Progress: log3})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("rebuild after agent change: %s", time.Since(start))
	checkTinyImage(t, img3, agent2)
	if img3.InitrdSHA256 == img.InitrdSHA256 || img3.RootfsSHA256 == img.RootfsSHA256 {
		t.Error("initramfs or rootfs unchanged after the agent changed")
	}
	if img3.KernelSHA256 != img.KernelSHA256 || inode(t, img3.Kernel) != inodes[FileKernel] {
		t.Error("kernel was not carried over (same inode) after an agent-only change")
	}
	if strings.Contains(log3.String(), "kernel: unpacking") || strings.Contains(log3.String(), "downloading") {
		t.Errorf("agent change redid kernel work: %q", log3.String())
	}

	// A different rootfs size rebuilds only the rootfs.
	img4, err := Build(ctx, BuildOptions{DataDir: dataDir, Tiny: true, AgentBinary: agent2, RootfsSize: 300 << 20})
	if err != nil {
		t.Fatal(err)
	}
	if inode(t, img4.Initrd) != inode(t, img3.Initrd) && img4.InitrdSHA256 != img3.InitrdSHA256 {
		t.Error("initramfs rebuilt for a rootfs size change")
	}
	if st, _ := os.Stat(img4.Rootfs); st.Size() != 300<<20 {
		t.Errorf("rootfs size %d, want %d", st.Size(), 300<<20)
	}
	// No temporary directories are left behind.
	leftovers, _ := filepath.Glob(filepath.Join(dataDir, "images", ".tmp-*"))
	leftovers2, _ := filepath.Glob(filepath.Join(dataDir, "images", ".old-*"))
	if len(leftovers)+len(leftovers2) > 0 {
		t.Errorf("left behind: %v %v", leftovers, leftovers2)
	}
}

// TestBuildAtomic checks that a build that fails at the last moment leaves
// no image that Load accepts, keeps an existing image intact, and that the
// debris of a crashed build is ignored by Load and cleaned by the next Build.
func TestBuildAtomic(t *testing.T) {
	requireRoot(t)
	requireTool(t, "mkfs.ext4")
	dataDir := seedDataDir(t, false)
	agent := standinAgent(t)
	ctx := context.Background()
	injected := errors.New("injected failure")
	var sawTmp string
	testHookBeforeInstall = func(tmp string) error {
		sawTmp = tmp
		// Everything, manifest included, is complete at this point.
		if _, err := os.Stat(filepath.Join(tmp, FileManifest)); err != nil {
			t.Errorf("hook: %v", err)
		}
		return injected
	}
	defer func() { testHookBeforeInstall = nil }()

	// 1. First build fails: nothing to load, nothing left over.
	if _, err := Build(ctx, BuildOptions{DataDir: dataDir, Tiny: true, AgentBinary: agent}); !errors.Is(err, injected) {
		t.Fatalf("Build: %v, want the injected failure", err)
	}
	if _, err := os.Stat(sawTmp); !os.IsNotExist(err) {
		t.Errorf("temporary dir %s left behind (%v)", sawTmp, err)
	}
	if _, err := Load(dataDir, true); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("Load after a failed build: %v", err)
	}

	// 2. A good build, then a failed rebuild: the old image survives.
	testHookBeforeInstall = nil
	good, err := Build(ctx, BuildOptions{DataDir: dataDir, Tiny: true, AgentBinary: agent})
	if err != nil {
		t.Fatal(err)
	}
	testHookBeforeInstall = func(string) error { return injected }
	if _, err := Build(ctx, BuildOptions{DataDir: dataDir, Tiny: true, AgentBinary: variantAgent(t, agent, "x")}); !errors.Is(err, injected) {
		t.Fatalf("rebuild: %v", err)
	}
	testHookBeforeInstall = nil
	loaded, err := Load(dataDir, true)
	if err != nil || !reflect.DeepEqual(loaded, good) {
		t.Fatalf("after a failed rebuild Load = %+v, %v; want the old image", loaded, err)
	}
	if err := loaded.Verify(); err != nil {
		t.Error(err)
	}

	// 3. A crash mid-build leaves a .tmp- directory that even holds a
	// manifest; Load does not look at it and the next Build removes it.
	crash := filepath.Join(dataDir, "images", ".tmp-tiny-crashed")
	if err := os.Mkdir(crash, 0o755); err != nil {
		t.Fatal(err)
	}
	mb, _ := os.ReadFile(filepath.Join(good.Dir, FileManifest))
	os.WriteFile(filepath.Join(crash, FileManifest), mb, 0o644)
	os.WriteFile(filepath.Join(crash, FileRootfs), make([]byte, 1234), 0o644) // half-written
	if _, err := Build(ctx, BuildOptions{DataDir: dataDir, Tiny: true, AgentBinary: agent}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(crash); !os.IsNotExist(err) {
		t.Errorf("stale %s not cleaned (%v)", crash, err)
	}

	// 4. An image whose file does not match the manifest is not loaded.
	if err := os.Truncate(good.Rootfs, 4096); err != nil {
		t.Fatal(err)
	}
	if _, err := Load(dataDir, true); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("Load of a damaged image: %v", err)
	}
	// ...and Build repairs it.
	img, err := Build(ctx, BuildOptions{DataDir: dataDir, Tiny: true, AgentBinary: agent})
	if err != nil {
		t.Fatal(err)
	}
	if err := img.Verify(); err != nil {
		t.Error(err)
	}
}

func TestBuildRejectsBadOptions(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	for name, o := range map[string]BuildOptions{
		"no data dir": {AgentBinary: "/bin/true"},
		"no agent":    {DataDir: dir},
		"tiny size":   {DataDir: dir, AgentBinary: "/bin/true", RootfsSize: 1 << 20},
	} {
		if _, err := Build(ctx, o); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("%s: %v", name, err)
		}
	}
	// A dynamically linked agent cannot be /init.
	if _, err := os.Stat("/bin/true"); err == nil {
		if checkStaticELF("/bin/true") == nil {
			t.Skip("/bin/true is static here")
		}
		_, err := Build(ctx, BuildOptions{DataDir: dir, Tiny: true, AgentBinary: "/bin/true"})
		if err == nil || !strings.Contains(err.Error(), "dynamically linked") {
			t.Errorf("dynamic agent: %v", err)
		}
	}
}

func TestLoadMissing(t *testing.T) {
	_, err := Load(t.TempDir(), true)
	if !errors.Is(err, errdefs.ErrNotFound) || !strings.Contains(err.Error(), "noid-server image build --tiny") {
		t.Errorf("Load: %v", err)
	}
}

// TestKernelFromDeb unpacks the real kernel .deb through the offline path
// (BuildOptions.KernelDeb, as NOID_KERNEL_DEB would) into a fresh cache.
func TestKernelFromDeb(t *testing.T) {
	deb := sharedKernelDeb(t)
	dataDir := t.TempDir()
	log := &testLogWriter{t: t}
	start := time.Now()
	k, err := ensureKernel(context.Background(), BuildOptions{DataDir: dataDir, KernelDeb: deb, Progress: log})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("unpacked %s in %s", filepath.Base(deb), time.Since(start))
	ctl, err := debControl(context.Background(), deb)
	if err != nil {
		t.Fatal(err)
	}
	if k.Package != ctl["Package"] || k.Version != ctl["Version"] || !strings.HasPrefix(k.Package, "linux-image-") {
		t.Errorf("entry %s %s, control %s %s", k.Package, k.Version, ctl["Package"], ctl["Version"])
	}
	if !strings.HasSuffix(k.Package, k.Release) {
		t.Errorf("release %q does not match package %q", k.Release, k.Package)
	}
	if rel, err := KernelVersionFromBzImage(k.Vmlinuz); err != nil || rel != k.Release {
		t.Errorf("bzImage release %q %v", rel, err)
	}
	if _, err := os.Stat(filepath.Join(k.dir, "config")); err != nil {
		t.Error(err)
	}
	if len(k.Modules) < len(GuestModules) {
		t.Errorf("only %d modules", len(k.Modules))
	}
	var stored kernelEntry
	b, _ := os.ReadFile(filepath.Join(k.dir, "kernel.json"))
	if err := json.Unmarshal(b, &stored); err != nil || stored.Key != k.Key {
		t.Errorf("kernel.json: %v", err)
	}
	// Same deb again: a cache hit.
	log2 := &testLogWriter{t: t}
	if _, err := ensureKernel(context.Background(), BuildOptions{DataDir: dataDir, KernelDeb: deb, Progress: log2}); err != nil {
		t.Fatal(err)
	}
	if log2.String() != "" {
		t.Errorf("second unpack did work: %q", log2.String())
	}
	// The environment variable is honoured too.
	t.Setenv(KernelDebEnv, deb)
	if k2, err := ensureKernel(context.Background(), BuildOptions{DataDir: dataDir}); err != nil || k2.Key != k.Key {
		t.Errorf("via %s: %v", KernelDebEnv, err)
	}
	// Something that is not a kernel package is refused.
	if _, err := ensureKernel(context.Background(), BuildOptions{DataDir: dataDir, KernelDeb: "/etc/hostname"}); err == nil {
		t.Error("non-deb accepted")
	}
}

// TestBuildDebian builds the Debian image with debootstrap. The first run on
// a machine debootstraps (about a minute) and leaves the tarball in the
// shared test cache; later runs reuse it. It is skipped with -short; set
// NOID_TEST_DEBIAN=0 to skip it in a full run too.
func TestBuildDebian(t *testing.T) {
	if testing.Short() {
		t.Skip("debootstrap build skipped with -short")
	}
	if os.Getenv("NOID_TEST_DEBIAN") == "0" {
		t.Skip("NOID_TEST_DEBIAN=0")
	}
	requireRoot(t)
	requireTool(t, "debootstrap", "mkfs.ext4", "debugfs")
	agent := standinAgent(t)
	ctx := context.Background()

	// Fill (or reuse) the debootstrap tarball in the shared cache through the
	// normal Build path, then build in a fresh DataDir seeded from it.
	shared := &testLogWriter{t: t}
	start := time.Now()
	if _, err := Build(ctx, BuildOptions{DataDir: sharedDataDir(t), AgentBinary: agent, Progress: shared}); err != nil {
		t.Fatal(err)
	}
	t.Logf("shared debian build: %s (debootstrap ran: %v)", time.Since(start), strings.Contains(shared.String(), "debootstrap done"))

	dataDir := seedDataDir(t, true)
	log := &testLogWriter{t: t}
	start = time.Now()
	img, err := Build(ctx, BuildOptions{DataDir: dataDir, AgentBinary: agent, Progress: log})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("debian build from the cached debootstrap tarball: %s", time.Since(start))
	if strings.Contains(log.String(), "running debootstrap") {
		t.Error("debootstrap ran again although its tarball was cached")
	}
	if img.Tiny || img.Name != NameDebian {
		t.Errorf("image %+v", img)
	}
	if err := img.Verify(); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("e2fsck", "-fn", img.Rootfs).CombinedOutput(); err != nil {
		t.Errorf("e2fsck: %v\n%s", err, out)
	}
	osr := debugfs(t, img.Rootfs, "cat /usr/lib/os-release")
	if !strings.Contains(osr, "bookworm") {
		t.Errorf("os-release: %s", osr)
	}
	// The tools of DefaultPackages, and the noid user with its sudo rule.
	for _, f := range []string{"/usr/local/bin/noid-agent", "/usr/bin/apt-get", "/usr/bin/dpkg", "/usr/sbin/ip", "/usr/bin/ps",
		"/etc/ssl/certs/ca-certificates.crt", "/usr/bin/python3", "/usr/lib/python3.11/json/__init__.py",
		"/usr/lib/python3.11/urllib/request.py", "/usr/lib/python3.11/http/client.py", "/usr/bin/curl", "/usr/bin/ping",
		"/usr/bin/less", "/usr/bin/nano", "/usr/bin/sudo", "/home/noid/.bashrc", "/etc/dpkg/dpkg.cfg.d/noid-slim",
		"/usr/share/doc/curl/copyright"} {
		if out := debugfs(t, img.Rootfs, "stat "+f); strings.Contains(out, "File not found") {
			t.Errorf("%s missing from the Debian rootfs", f)
		}
	}
	if out := debugfs(t, img.Rootfs, "stat /usr/bin/sudo"); !strings.Contains(out, "Mode:  04755") {
		t.Errorf("sudo is not setuid root:\n%s", out)
	}
	if out := debugfs(t, img.Rootfs, "stat /etc/sudoers.d/noid"); !strings.Contains(out, "Mode:  0440") || !strings.Contains(out, "User:     0") {
		t.Errorf("/etc/sudoers.d/noid:\n%s", out)
	}
	if out := debugfs(t, img.Rootfs, "cat /etc/sudoers.d/noid"); !strings.Contains(out, GuestSudoersLine) {
		t.Errorf("/etc/sudoers.d/noid: %s", out)
	}
	if out := debugfs(t, img.Rootfs, "cat /etc/passwd"); !strings.Contains(out, "\nnoid:x:1000:1000:noid:/home/noid:/bin/bash\n") {
		t.Errorf("/etc/passwd: %s", out)
	}
	if out := debugfs(t, img.Rootfs, "stat /home/noid"); !strings.Contains(out, "User:  1000") || !strings.Contains(out, "Mode:  0700") {
		t.Errorf("/home/noid:\n%s", out)
	}
	// Documentation, manual pages and translations are left out.
	for _, dir := range []string{"/usr/share/man", "/usr/share/locale"} {
		if out := debugfs(t, img.Rootfs, "ls "+dir); strings.Contains(out, "man1") || strings.Contains(out, "LC_MESSAGES") || strings.Contains(out, " de ") {
			t.Errorf("%s not emptied:\n%s", dir, out)
		}
	}
	if out := debugfs(t, img.Rootfs, "ls /usr/share/doc/curl"); strings.Contains(out, "changelog") {
		t.Errorf("/usr/share/doc/curl still has more than its copyright:\n%s", out)
	}
	m, err := readManifest(img.Dir)
	if err != nil || strings.Join(m.Rootfs.Packages, ",") != strings.Join(sortedCopy(DefaultPackages), ",") {
		t.Errorf("manifest packages %v (%v), want %v", m.Rootfs.Packages, err, DefaultPackages)
	}
	if out := debugfs(t, img.Rootfs, "ls /var/cache/apt/archives"); strings.Contains(out, ".deb") {
		t.Error("downloaded .debs were left in the rootfs")
	}
	if rc := debugfs(t, img.Rootfs, "cat /etc/resolv.conf"); !strings.Contains(rc, "noid-agent") {
		t.Errorf("resolv.conf is the host's: %s", rc)
	}
	if st, _ := os.Stat(img.Rootfs); st.Size() < DefaultDebianRootfsSize {
		t.Errorf("rootfs only %d bytes", st.Size())
	}

	// An agent change rebuilds the ext4 from the tarball, without debootstrap.
	log2 := &testLogWriter{t: t}
	start = time.Now()
	img2, err := Build(ctx, BuildOptions{DataDir: dataDir, AgentBinary: variantAgent(t, agent, "deb"), Progress: log2})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("debian rebuild after an agent change: %s", time.Since(start))
	if strings.Contains(log2.String(), "running debootstrap") || img2.RootfsSHA256 == img.RootfsSHA256 {
		t.Errorf("agent change: debootstrap ran or rootfs unchanged: %q", log2.String())
	}
	// And nothing changed: a cache hit.
	start = time.Now()
	if _, err := Build(ctx, BuildOptions{DataDir: dataDir, AgentBinary: variantAgent(t, agent, "deb")}); err != nil {
		t.Fatal(err)
	}
	t.Logf("debian cached build: %s", time.Since(start))
}
