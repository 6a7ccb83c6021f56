package bench

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/noid-vm/noid/internal/image"
)

// Artifacts are the binaries and guest image a benchmark run uses.
type Artifacts struct {
	Server, Agent string
	Image         *image.Image
}

// findRepoRoot walks up from dir to the noid module root.
func findRepoRoot(dir string) (string, error) {
	for {
		b, err := os.ReadFile(filepath.Join(dir, "go.mod"))
		if err == nil && strings.Contains(string(b), "module github.com/noid-vm/noid\n") {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", fmt.Errorf("the noid source tree (go.mod of github.com/noid-vm/noid) was not found above the current directory; run from the repo or pass --repo")
		}
		dir = parent
	}
}

// buildArtifacts compiles noid-server and noid-agent (the benchmark talks to
// the server through the Go client, not the CLI) from the source
// tree into cache/bin and builds (or reuses) the tiny image in cache/data.
// Image outputs are keyed by their inputs, so an unchanged agent reuses the
// cached image.
func buildArtifacts(ctx context.Context, o *Options) (*Artifacts, error) {
	root, err := repoRoot(o)
	if err != nil {
		return nil, err
	}
	bin := filepath.Join(o.Cache, "bin")
	if err := os.MkdirAll(bin, 0o755); err != nil {
		return nil, err
	}
	a := &Artifacts{Server: filepath.Join(bin, "noid-server"), Agent: filepath.Join(bin, "noid-agent")}
	start := time.Now()
	for _, b := range []struct{ out, pkg string }{{a.Server, "./cmd/noid-server"}, {a.Agent, "./cmd/noid-agent"}} {
		tmp := b.out + ".tmp"
		cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-o", tmp, b.pkg)
		cmd.Dir = root
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			return nil, fmt.Errorf("go build %s: %v\n%s", b.pkg, err, out)
		}
		if err := os.Rename(tmp, b.out); err != nil {
			return nil, err
		}
	}
	o.logf("built noid-server and noid-agent from %s in %.1fs", root, time.Since(start).Seconds())
	start = time.Now()
	var progress strings.Builder
	img, err := image.Build(ctx, image.BuildOptions{
		DataDir:     filepath.Join(o.Cache, "data"),
		Tiny:        true,
		AgentBinary: a.Agent,
		Progress:    &progress,
		KernelDeb:   cachedKernelDeb(o.Cache),
	})
	if err != nil {
		return nil, fmt.Errorf("building the tiny image: %w\n%s", err, progress.String())
	}
	a.Image = img
	o.logf("tiny image ready in %.1fs (%s)", time.Since(start).Seconds(), img.Dir)
	return a, nil
}

// repoRoot is --repo, or the noid source tree above the current directory.
func repoRoot(o *Options) (string, error) {
	if o.Repo != "" {
		return o.Repo, nil
	}
	wd, _ := os.Getwd()
	return findRepoRoot(wd)
}

// cachedKernelDeb returns a linux-image .deb already downloaded into this
// cache or the test suite's cache, so the benchmark does not fetch it again.
// "" lets image.Build ask apt as usual. $NOID_KERNEL_DEB wins.
func cachedKernelDeb(cache string) string {
	if v := os.Getenv(image.KernelDebEnv); v != "" {
		return v
	}
	var debs []string
	for _, c := range []string{cache, os.Getenv("NOID_TEST_CACHE"), "/var/tmp/noid-test-cache"} {
		if c == "" {
			continue
		}
		m, _ := filepath.Glob(filepath.Join(c, "data", "images", "kernel", "debs", "linux-image-*.deb"))
		debs = append(debs, m...)
	}
	if len(debs) == 0 {
		return ""
	}
	sort.Strings(debs)
	return debs[len(debs)-1]
}
