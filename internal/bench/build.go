package bench

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/noid-vm/noid/internal/image"
)

// Artifacts are the binaries and guest image a benchmark run uses.
type Artifacts struct {
	Server, Agent string
	// Image is the tiny image; Debian the default one (nil unless a
	// section that uses it runs).
	Image, Debian *image.Image
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
// the server through the Go client, not the CLI) from the source tree and
// builds (or reuses) the tiny image, and the default (Debian) image when the
// default section runs.
//
// Several engineers may run noid-bench from different trees at once with
// the same cache, so nothing a run uses is ever replaced under it: the
// binaries go to cache/bin/<hash of both>/ and the images to
// cache/images/<hash of the agent>/ (the agent is inside the initramfs),
// each written once and then only read. Image outputs are keyed by their
// inputs, so an unchanged agent reuses the cached images; a new agent
// reuses the downloaded kernel .deb and debootstrap tarball of earlier
// ones.
func buildArtifacts(ctx context.Context, o *Options) (*Artifacts, error) {
	root, err := repoRoot(o)
	if err != nil {
		return nil, err
	}
	binRoot := filepath.Join(o.Cache, "bin")
	if err := os.MkdirAll(binRoot, 0o755); err != nil {
		return nil, err
	}
	tmp, err := os.MkdirTemp(binRoot, ".tmp-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)
	start := time.Now()
	for _, b := range []struct{ out, pkg string }{{"noid-server", "./cmd/noid-server"}, {"noid-agent", "./cmd/noid-agent"}} {
		cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-o", filepath.Join(tmp, b.out), b.pkg)
		cmd.Dir = root
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			return nil, fmt.Errorf("go build %s: %v\n%s", b.pkg, err, out)
		}
	}
	binHash, err := hashFiles(filepath.Join(tmp, "noid-server"), filepath.Join(tmp, "noid-agent"))
	if err != nil {
		return nil, err
	}
	agentHash, err := hashFiles(filepath.Join(tmp, "noid-agent"))
	if err != nil {
		return nil, err
	}
	bin := filepath.Join(binRoot, binHash[:16])
	if err := os.Rename(tmp, bin); err != nil && !errors.Is(err, fs.ErrExist) && !errors.Is(err, syscall.ENOTEMPTY) {
		return nil, err
	}
	a := &Artifacts{Server: filepath.Join(bin, "noid-server"), Agent: filepath.Join(bin, "noid-agent")}
	now := time.Now()
	os.Chtimes(bin, now, now) // marks it used, for pruneCache
	o.logf("built noid-server and noid-agent from %s in %.1fs (%s)", root, time.Since(start).Seconds(), bin)

	dataDir := filepath.Join(o.Cache, "images", agentHash[:16])
	if err := seedImageCache(o.Cache, dataDir); err != nil {
		o.logf("could not reuse earlier downloads for the images: %v", err)
	}
	os.Chtimes(dataDir, now, now)
	start = time.Now()
	var progress strings.Builder
	img, err := image.Build(ctx, image.BuildOptions{
		DataDir:     dataDir,
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
	if o.Only["default"] || (o.Only["remote"] && o.RemoteImage != "tiny") {
		// The default image, as `noid-server image build` makes it for
		// the quickstart: Debian from debootstrap (a minute or more the
		// first time; cached like the tiny one).
		start = time.Now()
		progress.Reset()
		deb, err := image.Build(ctx, image.BuildOptions{
			DataDir:     dataDir,
			Tiny:        false,
			AgentBinary: a.Agent,
			Progress:    &progress,
			KernelDeb:   cachedKernelDeb(o.Cache),
		})
		if err != nil {
			return nil, fmt.Errorf("building the default (Debian) image: %w\n%s", err, progress.String())
		}
		a.Debian = deb
		o.logf("default (Debian) image ready in %.1fs (%s)", time.Since(start).Seconds(), deb.Dir)
	}
	pruneCache(o, bin, dataDir)
	return a, nil
}

// hashFiles is the hex SHA-256 of the files' contents, in order.
func hashFiles(paths ...string) (string, error) {
	h := sha256.New()
	for _, p := range paths {
		f, err := os.Open(p)
		if err != nil {
			return "", err
		}
		_, err = io.Copy(h, f)
		f.Close()
		if err != nil {
			return "", err
		}
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// seedImageCache hard-links into dataDir the kernel .debs and debootstrap
// tarballs that earlier image builds in the cache downloaded (they are
// keyed by the package and the suite, not by the agent), so that a new
// agent does not fetch them again.
func seedImageCache(cache, dataDir string) error {
	var errs []error
	for _, sub := range []string{"kernel/debs", "cache"} {
		dst := filepath.Join(dataDir, "images", sub)
		var found []string
		for _, g := range []string{
			filepath.Join(cache, "data", "images", sub, "*"), // the layout before per-agent image dirs
			filepath.Join(cache, "images", "*", "images", sub, "*"),
		} {
			m, _ := filepath.Glob(g)
			found = append(found, m...)
		}
		for _, src := range found {
			name := filepath.Base(src)
			if !strings.HasSuffix(name, ".deb") && !strings.HasPrefix(name, "debootstrap-") {
				continue
			}
			if _, err := os.Stat(filepath.Join(dst, name)); err == nil {
				continue
			}
			if err := os.MkdirAll(dst, 0o755); err != nil {
				return err
			}
			if err := os.Link(src, filepath.Join(dst, name)); err != nil && !errors.Is(err, fs.ErrExist) {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// pruneCache removes binaries and image dirs of the cache that no run has
// used for a week (a run marks the ones it uses).
func pruneCache(o *Options, keep ...string) {
	cutoff := time.Now().Add(-7 * 24 * time.Hour)
	for _, pattern := range []string{filepath.Join(o.Cache, "bin", "*"), filepath.Join(o.Cache, "images", "*")} {
		m, _ := filepath.Glob(pattern)
		for _, d := range m {
			fi, err := os.Stat(d)
			if err != nil || !fi.IsDir() || fi.ModTime().After(cutoff) || contains(keep, d) || strings.HasPrefix(filepath.Base(d), ".tmp-") {
				continue
			}
			if err := os.RemoveAll(d); err == nil {
				o.logf("removed %s from the cache (unused for a week)", d)
			}
		}
	}
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
		for _, g := range []string{
			filepath.Join(c, "data", "images", "kernel", "debs", "linux-image-*.deb"),
			filepath.Join(c, "images", "*", "images", "kernel", "debs", "linux-image-*.deb"),
		} {
			m, _ := filepath.Glob(g)
			debs = append(debs, m...)
		}
	}
	if len(debs) == 0 {
		return ""
	}
	// The newest package version, wherever it is.
	sort.SliceStable(debs, func(i, j int) bool { return filepath.Base(debs[i]) < filepath.Base(debs[j]) })
	return debs[len(debs)-1]
}
