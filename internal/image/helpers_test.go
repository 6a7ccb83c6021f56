package image

import (
	"bytes"
	"context"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// The tests share one cache directory across runs, so the kernel package is
// downloaded and debootstrap runs only once per machine:
// $NOID_TEST_CACHE, default /var/tmp/noid-test-cache. Its data/ subdirectory
// is an ordinary noid DataDir filled by the same code paths Build uses.
func testCacheDir(t testing.TB) string {
	dir := os.Getenv("NOID_TEST_CACHE")
	if dir == "" {
		dir = "/var/tmp/noid-test-cache"
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

// sharedDataDir is the DataDir of the shared test cache.
func sharedDataDir(t testing.TB) string {
	return filepath.Join(testCacheDir(t), "data")
}

type testLogWriter struct {
	t  testing.TB
	mu sync.Mutex
	b  bytes.Buffer
}

func (w *testLogWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.b.Write(p)
	for _, l := range strings.Split(strings.TrimRight(string(p), "\n"), "\n") {
		w.t.Logf("progress: %s", l)
	}
	return len(p), nil
}

func (w *testLogWriter) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.String()
}

var (
	sharedKernelOnce sync.Once
	sharedKernelVal  *kernelEntry
	sharedKernelErr  error
)

// sharedKernel returns the real Debian cloud kernel, fetched (apt-get
// download, or $NOID_KERNEL_DEB) and unpacked into the shared test cache.
// Tests that need it skip when neither apt nor a .deb is available.
func sharedKernel(t testing.TB) *kernelEntry {
	t.Helper()
	sharedKernelOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
		defer cancel()
		start := time.Now()
		sharedKernelVal, sharedKernelErr = ensureKernel(ctx, BuildOptions{
			DataDir: sharedDataDir(t), Progress: &testLogWriter{t: t},
		})
		t.Logf("shared kernel ready in %s", time.Since(start))
	})
	if sharedKernelErr != nil {
		t.Skipf("no Debian kernel available (apt or %s): %v", KernelDebEnv, sharedKernelErr)
	}
	return sharedKernelVal
}

// sharedKernelDeb returns the path of the kernel .deb in the shared cache.
func sharedKernelDeb(t testing.TB) string {
	k := sharedKernel(t)
	if deb := os.Getenv(KernelDebEnv); deb != "" {
		return deb
	}
	debs, _ := filepath.Glob(filepath.Join(sharedDataDir(t), "images", "kernel", "debs",
		strings.ReplaceAll(k.Package+"_"+k.Version+"_*.deb", ":", "%3a")))
	if len(debs) == 0 {
		t.Fatalf("kernel .deb for %s %s not in the shared cache", k.Package, k.Version)
	}
	return debs[0]
}

// seedDataDir creates a fresh DataDir whose kernel cache (and, with
// withRootfsCache, debootstrap tarball cache) are hard links into the shared
// test cache, so a Build in it finds the kernel without downloading.
func seedDataDir(t testing.TB, withRootfsCache bool) string {
	t.Helper()
	sharedKernel(t)
	dataDir := t.TempDir()
	dirs := []string{"kernel"}
	if withRootfsCache {
		dirs = append(dirs, "cache")
	}
	for _, d := range dirs {
		src := filepath.Join(sharedDataDir(t), "images", d)
		dst := filepath.Join(dataDir, "images", d)
		if _, err := os.Stat(src); err != nil {
			continue
		}
		if err := linkTree(src, dst); err != nil {
			t.Fatalf("seed %s: %v", d, err)
		}
	}
	return dataDir
}

// linkTree recreates src at dst with directories copied and files hard-linked.
func linkTree(src, dst string) error {
	return filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, p)
		if strings.HasPrefix(d.Name(), ".tmp-") {
			if d.IsDir() {
				return filepath.SkipDir
			}
			return nil
		}
		target := filepath.Join(dst, rel)
		if d.IsDir() {
			return os.MkdirAll(target, 0o755)
		}
		return linkOrCopy(p, target)
	})
}

var (
	standinOnce sync.Once
	standinDir  string
	standinPath string
	standinErr  error
)

func TestMain(m *testing.M) {
	code := m.Run()
	if standinDir != "" {
		os.RemoveAll(standinDir)
	}
	os.Exit(code)
}

// standinAgent builds testdata/standin-init, a static Go program that plays
// the agent's role as /init: it loads the modules, mounts /dev/vda, prints a
// marker and powers off.
func standinAgent(t testing.TB) string {
	t.Helper()
	standinOnce.Do(func() {
		dir, err := os.MkdirTemp("", "noid-standin-")
		if err != nil {
			standinErr = err
			return
		}
		standinDir = dir
		standinPath = filepath.Join(dir, "standin-init")
		standinErr = goBuildStatic("./testdata/standin-init", standinPath)
	})
	if standinErr != nil {
		t.Fatalf("build stand-in agent: %v", standinErr)
	}
	return standinPath
}

func goBuildStatic(pkg, out string) error {
	cmd := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", out, pkg)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build %s: %w\n%s", pkg, err, b)
	}
	return nil
}

// variantAgent returns a copy of agent with extra bytes appended: still a
// valid static ELF, but with a different SHA-256.
func variantAgent(t testing.TB, agent, tag string) string {
	t.Helper()
	b, err := os.ReadFile(agent)
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "agent-"+tag)
	if err := os.WriteFile(p, append(b, []byte("\x00variant:"+tag)...), 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

func requireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
}

func requireTool(t testing.TB, names ...string) {
	t.Helper()
	for _, n := range names {
		if _, err := exec.LookPath(n); err != nil {
			t.Skipf("%s not installed", n)
		}
	}
}

// debugfs runs a debugfs request against an ext4 image read-only.
func debugfs(t testing.TB, img, request string) string {
	t.Helper()
	out, err := exec.Command("debugfs", "-R", request, img).CombinedOutput()
	if err != nil {
		t.Fatalf("debugfs -R %q: %v\n%s", request, err, out)
	}
	return string(out)
}
