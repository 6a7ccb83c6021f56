// Package testutil holds helpers shared by noid's root and VM tests: building
// the binaries and the tiny guest image once per cache, and requiring root.
package testutil

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/noid-vm/noid/internal/image"
)

// RequireRoot skips the test with a clear message when not running as root.
// The README's test command runs as root, so these tests always run there.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (network namespaces, TAP or loop devices); the README test command runs as root")
	}
}

// CacheDir is where built artifacts are cached across test runs
// ($NOID_TEST_CACHE, default /var/tmp/noid-test-cache).
func CacheDir() string {
	if d := os.Getenv("NOID_TEST_CACHE"); d != "" {
		return d
	}
	return "/var/tmp/noid-test-cache"
}

// RepoRoot finds the module root from the test's working directory.
func RepoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", fmt.Errorf("go.mod not found above %s", dir)
		}
		dir = parent
	}
}

// lock takes an exclusive flock on name in the cache dir, so parallel test
// binaries don't build the same artifact at once.
func lock(name string) (func(), error) {
	if err := os.MkdirAll(CacheDir(), 0o755); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(filepath.Join(CacheDir(), name+".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		f.Close()
		return nil, err
	}
	return func() { syscall.Flock(int(f.Fd()), syscall.LOCK_UN); f.Close() }, nil
}

// Binaries are freshly built noid executables.
type Binaries struct {
	Noid, Server, Agent string
}

var (
	binOnce sync.Once
	bins    Binaries
	binErr  error
)

// Build compiles noid, noid-server and noid-agent once per test process.
func Build(t testing.TB) Binaries {
	t.Helper()
	binOnce.Do(func() {
		root, err := RepoRoot()
		if err != nil {
			binErr = err
			return
		}
		dir, err := os.MkdirTemp("", "noid-bin-")
		if err != nil {
			binErr = err
			return
		}
		bins = Binaries{Noid: filepath.Join(dir, "noid"), Server: filepath.Join(dir, "noid-server"), Agent: filepath.Join(dir, "noid-agent")}
		for _, b := range []struct{ out, pkg string }{{bins.Noid, "./cmd/noid"}, {bins.Server, "./cmd/noid-server"}, {bins.Agent, "./cmd/noid-agent"}} {
			cmd := exec.Command("go", "build", "-trimpath", "-o", b.out, b.pkg)
			cmd.Dir = root
			cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
			if out, err := cmd.CombinedOutput(); err != nil {
				binErr = fmt.Errorf("go build %s: %v\n%s", b.pkg, err, out)
				return
			}
		}
	})
	if binErr != nil {
		t.Fatal(binErr)
	}
	return bins
}

// RemoveBinaries deletes what Build compiled (a temporary directory per
// test process) and this process's pinned copy of the tiny image. A
// TestMain calls it after m.Run.
func RemoveBinaries() {
	if bins.Noid != "" {
		os.RemoveAll(filepath.Dir(bins.Noid))
	}
	if img != nil {
		os.RemoveAll(img.Dir)
	}
}

// Main runs a package's tests and then removes what Build compiled.
func Main(m *testing.M) int {
	code := m.Run()
	RemoveBinaries()
	return code
}

var (
	imgOnce sync.Once
	img     *image.Image
	imgErr  error
)

// TinyImage builds (or reuses) the tiny busybox guest image with the current
// agent, in the shared cache, and returns a copy pinned for this process:
// its files are hard links in a directory of its own. The cache's image
// directory is replaced whenever a test process with another agent (another
// checkout) builds it, and VMs booted later must still get this process's
// agent.
func TinyImage(t testing.TB) *image.Image {
	t.Helper()
	b := Build(t)
	imgOnce.Do(func() {
		unlock, err := lock("image-tiny")
		if err != nil {
			imgErr = err
			return
		}
		defer unlock()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
		defer cancel()
		var progress strings.Builder
		built, err := image.Build(ctx, image.BuildOptions{DataDir: filepath.Join(CacheDir(), "data"), Tiny: true, AgentBinary: b.Agent, Progress: &progress})
		if err != nil {
			imgErr = fmt.Errorf("building tiny image: %w\n%s", err, progress.String())
			return
		}
		// Still under the lock, so no other test process replaces the files
		// before they are linked.
		img, imgErr = pinImage(built)
	})
	if imgErr != nil {
		t.Fatal(imgErr)
	}
	return img
}

// pinImage hard-links the files of img into a new directory under the cache
// (the same file system, so links always work) and returns img with its
// paths there. Pinned copies older than a day are left-overs of killed test
// processes and are removed.
func pinImage(built *image.Image) (*image.Image, error) {
	root := filepath.Join(CacheDir(), "pinned")
	if err := os.MkdirAll(root, 0o755); err != nil {
		return nil, err
	}
	if ents, err := os.ReadDir(root); err == nil {
		for _, e := range ents {
			if fi, err := e.Info(); err == nil && time.Since(fi.ModTime()) > 24*time.Hour {
				os.RemoveAll(filepath.Join(root, e.Name()))
			}
		}
	}
	dir, err := os.MkdirTemp(root, "tiny-")
	if err != nil {
		return nil, err
	}
	pinned := *built
	pinned.Dir = dir
	for _, p := range []*string{&pinned.Kernel, &pinned.Vmlinux, &pinned.Initrd, &pinned.Rootfs} {
		dst := filepath.Join(dir, filepath.Base(*p))
		if err := os.Link(*p, dst); err != nil {
			os.RemoveAll(dir)
			return nil, fmt.Errorf("pinning the tiny image: %w", err)
		}
		*p = dst
	}
	return &pinned, nil
}

// NumCPU is the host's CPU count (for sizing parallel tests).
func NumCPU() int { return runtime.NumCPU() }

// LogBuffer collects log output written from several goroutines, for a
// test to read.
type LogBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

// Write appends p.
func (l *LogBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

// String is everything written so far.
func (l *LogBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
