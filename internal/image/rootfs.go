package image

import (
	"archive/tar"
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/klauspost/compress/zstd"

	"github.com/noid-vm/noid/internal/errdefs"
)

// rootfsSource is what a rootfs is built from.
type rootfsSource struct {
	info    rootfsInfo
	busybox string // tiny: static busybox binary
	tarball string // debian: cached debootstrap tarball (created on demand)
}

// busyboxCandidates are where busybox-static installs its binary.
var busyboxCandidates = []string{"/bin/busybox", "/usr/bin/busybox"}

// rootfsSource resolves the rootfs inputs without building anything, so the
// cache key is known before deciding whether to rebuild.
func (b *builder) rootfsSource(ctx context.Context) (*rootfsSource, error) {
	if b.opts.Tiny {
		bb, err := b.findBusybox(ctx)
		if err != nil {
			return nil, err
		}
		sum, err := sha256File(bb)
		if err != nil {
			return nil, err
		}
		return &rootfsSource{busybox: bb, info: rootfsInfo{Kind: "busybox", Source: sum, Size: b.opts.RootfsSize}}, nil
	}
	pkgs := sortedCopy(b.opts.Packages)
	if err := CheckPackageNames(pkgs); err != nil {
		return nil, err
	}
	key := hashStrings("debootstrap", fmt.Sprint(FormatVersion), b.opts.Suite, "minbase", "amd64", strings.Join(pkgs, ","))
	tarball := filepath.Join(b.root, "cache", fmt.Sprintf("debootstrap-%s-%s.tar.zst", b.opts.Suite, key[:16]))
	return &rootfsSource{
		tarball: tarball,
		info:    rootfsInfo{Kind: "debootstrap", Suite: b.opts.Suite, Packages: pkgs, Source: key, Size: b.opts.RootfsSize},
	}, nil
}

// packageRE is what Debian policy allows in a package name (lower case
// letters, digits, + - .; at least two characters, starting alphanumeric),
// optionally with an architecture qualifier.
var packageRE = regexp.MustCompile(`^[a-z0-9][a-z0-9+.-]+(:[a-z0-9-]+)?$`)

// CheckPackageNames checks that every name is a valid Debian package name.
// The error wraps errdefs.ErrInvalidArgument.
func CheckPackageNames(names []string) error {
	for _, n := range names {
		if !packageRE.MatchString(n) {
			return fmt.Errorf("%w: bad package name %q (Debian package names are lower case: a-z, 0-9, +, -, .)", errdefs.ErrInvalidArgument, n)
		}
	}
	return nil
}

// findBusybox returns a static busybox: the host's busybox-static if
// installed, otherwise one fetched with apt-get download busybox-static and
// unpacked into the cache.
func (b *builder) findBusybox(ctx context.Context) (string, error) {
	for _, c := range busyboxCandidates {
		if checkStaticELF(c) == nil {
			return c, nil
		}
	}
	cached := filepath.Join(b.root, "cache", "busybox")
	if checkStaticELF(cached) == nil {
		return cached, nil
	}
	if err := os.MkdirAll(filepath.Dir(cached), 0o755); err != nil {
		return "", err
	}
	tmp, err := os.MkdirTemp(filepath.Dir(cached), ".tmp-busybox-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(tmp)
	b.p.Printf("rootfs: downloading busybox-static")
	if err := aptDownload(ctx, tmp, "busybox-static"); err != nil {
		return "", fmt.Errorf("no static busybox on the host and %w (install busybox-static)", err)
	}
	debs, _ := filepath.Glob(filepath.Join(tmp, "*.deb"))
	if len(debs) != 1 {
		return "", errors.New("apt-get download busybox-static produced no .deb")
	}
	var data []byte
	err = walkDebTar(ctx, debs[0], "data.tar", func(name string, hdr *tar.Header, r io.Reader) error {
		if hdr.Typeflag == tar.TypeReg && (name == "/bin/busybox" || name == "/usr/bin/busybox") {
			var err error
			data, err = io.ReadAll(r)
			if err != nil {
				return err
			}
			return errStopWalk
		}
		return nil
	})
	if err != nil {
		return "", err
	}
	if data == nil {
		return "", fmt.Errorf("%s has no busybox binary", filepath.Base(debs[0]))
	}
	if err := writeFileAtomic(cached, data, 0o755); err != nil {
		return "", err
	}
	return cached, checkStaticELF(cached)
}

// buildRootfs assembles the root tree and makes dst, an ext4 image, from it.
func (b *builder) buildRootfs(ctx context.Context, src *rootfsSource, dst string) error {
	tree, err := os.MkdirTemp(b.root, ".tmp-tree-")
	if err != nil {
		return err
	}
	defer removeAllSafe(tree)
	if err := os.Chmod(tree, 0o755); err != nil {
		return err
	}
	t := time.Now()
	switch src.info.Kind {
	case "busybox":
		if err := populateBusybox(ctx, tree, src.busybox); err != nil {
			return err
		}
	case "debootstrap":
		if _, err := os.Stat(src.tarball); err != nil {
			if err := b.debootstrap(ctx, src); err != nil {
				return err
			}
		}
		t = time.Now()
		if err := extractTarball(ctx, src.tarball, tree); err != nil {
			if ctx.Err() == nil {
				// A damaged cache entry must not wedge every later build.
				os.Remove(src.tarball)
				return fmt.Errorf("%w (removed the cached tarball; the next build runs debootstrap again)", err)
			}
			return err
		}
	}
	if err := customizeTree(tree, b.opts.AgentBinary, src.info.Kind == "busybox"); err != nil {
		return err
	}
	used, err := dirSize(tree)
	if err != nil {
		return err
	}
	size := b.opts.RootfsSize
	if need := used*3/2 + 64<<20; need > size {
		size = (need + 1<<20 - 1) &^ (1<<20 - 1)
		b.p.Printf("rootfs: tree is %d MiB, growing the image to %d MiB", used>>20, size>>20)
	}
	if err := mkfsExt4(ctx, tree, dst, size); err != nil {
		return err
	}
	kind := map[string]string{"busybox": "busybox", "debootstrap": "Debian " + src.info.Suite}[src.info.Kind]
	b.p.Printf("rootfs: %s ext4, %d MiB of files in a %d MiB sparse image (%s)", kind, used>>20, size>>20, since(t))
	return nil
}

// populateBusybox installs busybox with a symlink for every applet, plus the
// directories and /etc files a small system needs.
func populateBusybox(ctx context.Context, tree, busybox string) error {
	for _, d := range []string{"bin", "sbin", "usr/bin", "usr/sbin", "usr/local/bin", "etc", "dev", "proc", "sys",
		"run", "mnt", "var/log", "var/lib", "lib", "home"} {
		if err := os.MkdirAll(filepath.Join(tree, d), 0o755); err != nil {
			return err
		}
	}
	for _, d := range []string{"tmp", "var/tmp"} {
		if err := os.MkdirAll(filepath.Join(tree, d), 0o755); err != nil {
			return err
		}
		if err := os.Chmod(filepath.Join(tree, d), 0o777|os.ModeSticky); err != nil {
			return err
		}
	}
	if err := os.Mkdir(filepath.Join(tree, "root"), 0o700); err != nil {
		return err
	}
	if err := copyFileSparse(busybox, filepath.Join(tree, "bin/busybox")); err != nil {
		return fmt.Errorf("install busybox: %w", err)
	}
	if err := os.Chmod(filepath.Join(tree, "bin/busybox"), 0o755); err != nil {
		return err
	}
	list, err := runCmd(ctx, busybox, "--list-full")
	if err != nil {
		return fmt.Errorf("list busybox applets: %w", err)
	}
	n := 0
	for _, applet := range strings.Fields(list) {
		applet = strings.TrimPrefix(filepath.Clean("/"+applet), "/")
		if !strings.Contains(applet, "/") || applet == "bin/busybox" { // skip /linuxrc
			continue
		}
		p := filepath.Join(tree, applet)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return err
		}
		if err := os.Symlink("/bin/busybox", p); err != nil && !os.IsExist(err) {
			return fmt.Errorf("applet link: %w", err)
		}
		n++
	}
	if n < 50 {
		return fmt.Errorf("busybox lists only %d applets", n)
	}
	files := map[string]string{
		"etc/passwd": "root:x:0:0:root:/root:/bin/sh\n" +
			"nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
		"etc/group":      "root:x:0:\nnogroup:x:65534:\n",
		"etc/shadow":     "root:*:19000:0:99999:7:::\nnobody:*:19000:0:99999:7:::\n",
		"etc/os-release": "NAME=\"noid tiny\"\nID=noid-tiny\nPRETTY_NAME=\"noid tiny (busybox)\"\n",
		"etc/profile":    "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\nexport PS1='\\h:\\w\\$ '\n",
		"etc/shells":     "/bin/sh\n/bin/ash\n",
	}
	for name, content := range files {
		mode := os.FileMode(0o644)
		if name == "etc/shadow" {
			mode = 0o640
		}
		if err := os.WriteFile(filepath.Join(tree, name), []byte(content), mode); err != nil {
			return err
		}
	}
	return nil
}

// customizeTree adds what every noid rootfs has: the agent at
// /usr/local/bin/noid-agent and hosts/hostname/resolv.conf placeholders that
// the agent rewrites when it applies the VM's identity.
func customizeTree(tree, agent string, tiny bool) error {
	if err := os.MkdirAll(filepath.Join(tree, "usr/local/bin"), 0o755); err != nil {
		return err
	}
	dst := filepath.Join(tree, "usr/local/bin/noid-agent")
	if err := copyFileSparse(agent, dst); err != nil {
		return fmt.Errorf("install agent: %w", err)
	}
	if err := os.Chmod(dst, 0o755); err != nil {
		return err
	}
	files := map[string]string{
		"etc/hostname":    "noid\n",
		"etc/hosts":       "127.0.0.1\tlocalhost\n127.0.1.1\tnoid\n::1\tlocalhost ip6-localhost ip6-loopback\n",
		"etc/resolv.conf": "# noid-agent writes the VM's name servers here.\n",
		"etc/fstab":       "# The root filesystem is mounted by noid-agent (PID 1).\n",
	}
	for name, content := range files {
		p := filepath.Join(tree, name)
		os.Remove(p) // may be a symlink (e.g. to systemd-resolved's file)
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			return err
		}
	}
	if err := addGuestUser(tree); err != nil {
		return fmt.Errorf("adding the %s user: %w", GuestUser, err)
	}
	if !tiny {
		if err := slimTree(tree); err != nil {
			return err
		}
		// Leftovers of debootstrap that should not ship in every VM.
		for _, glob := range []string{"var/cache/apt/archives/*.deb", "var/cache/apt/*.bin", "var/lib/apt/lists/*_*",
			"var/log/bootstrap.log", "etc/machine-id"} {
			matches, _ := filepath.Glob(filepath.Join(tree, glob))
			for _, m := range matches {
				os.Remove(m)
			}
		}
	}
	return nil
}

// slimDpkgConfig keeps documentation, manual pages and translations out of
// the Debian image, as Debian's slim container images do: packages
// installed later in the VM skip them too. Copyright files stay.
const slimDpkgConfig = `# noid: no documentation, manual pages or translations in the guest image.
# Delete this file to get them with the packages you install from now on.
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/groff/*
path-exclude=/usr/share/lintian/*
path-exclude=/usr/share/locale/*
path-include=/usr/share/locale/locale.alias
`

// slimTree removes from a Debian tree what slimDpkgConfig excludes and
// installs that configuration as /etc/dpkg/dpkg.cfg.d/noid-slim.
func slimTree(tree string) error {
	for _, dir := range []string{"usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/groff", "usr/share/lintian", "usr/share/locale"} {
		root := filepath.Join(tree, dir)
		err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				if os.IsNotExist(err) && p == root {
					return filepath.SkipDir
				}
				return err
			}
			if d.IsDir() {
				return nil
			}
			rel, _ := filepath.Rel(tree, p)
			keep := (dir == "usr/share/doc" && d.Name() == "copyright" && strings.Count(rel, "/") == 4) ||
				rel == "usr/share/locale/locale.alias"
			if keep {
				return nil
			}
			return os.Remove(p)
		})
		if err != nil {
			return fmt.Errorf("slimming %s: %w", dir, err)
		}
		if err := removeEmptyDirs(root); err != nil {
			return err
		}
	}
	cfg := filepath.Join(tree, "etc/dpkg/dpkg.cfg.d")
	if err := os.MkdirAll(cfg, 0o755); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(cfg, "noid-slim"), []byte(slimDpkgConfig), 0o644)
}

// removeEmptyDirs removes the empty directories below root (not root).
func removeEmptyDirs(root string) error {
	var dirs []string
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if os.IsNotExist(err) && p == root {
				return filepath.SkipDir
			}
			return err
		}
		if d.IsDir() && p != root {
			dirs = append(dirs, p)
		}
		return nil
	})
	if err != nil {
		return err
	}
	for i := len(dirs) - 1; i >= 0; i-- { // deepest first
		if ents, err := os.ReadDir(dirs[i]); err == nil && len(ents) == 0 {
			if err := os.Remove(dirs[i]); err != nil {
				return err
			}
		}
	}
	return nil
}

// mkfsExt4 makes a sparse ext4 image of size bytes at dst holding tree.
func mkfsExt4(ctx context.Context, tree, dst string, size int64) error {
	f, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	// -b 4096 -T default: 4 KiB blocks and the normal inode ratio even for
	// small images (mke2fs would pick its "small" profile with 1 KiB blocks).
	// -m 0: no blocks reserved for root in a single-purpose VM disk.
	// root_owner: the tree may be owned by whoever built it; / must be root's.
	// The image is a sparse file, whose discard (hole punching) reads back as
	// zeros, so mke2fs marks the inode tables zeroed and the guest never runs
	// ext4lazyinit.
	_, err = runCmd(ctx, "mkfs.ext4", "-q", "-F", "-L", "noid-root", "-m", "0", "-b", "4096", "-T", "default",
		"-E", "root_owner=0:0", "-d", tree, dst)
	if err != nil {
		return fmt.Errorf("mkfs.ext4: %w", err)
	}
	return nil
}

// tarFlags are the GNU tar options that carry a root tree faithfully.
var tarFlags = []string{"--numeric-owner", "--xattrs", "--xattrs-include=*"}

// debootstrap runs debootstrap into a temporary directory and stores the
// result as a zstd-compressed tarball at src.tarball.
func (b *builder) debootstrap(ctx context.Context, src *rootfsSource) error {
	if os.Geteuid() != 0 {
		return errors.New("debootstrap needs root")
	}
	if _, err := exec.LookPath("debootstrap"); err != nil {
		return errors.New("debootstrap is not installed (apt-get install debootstrap)")
	}
	if err := os.MkdirAll(filepath.Dir(src.tarball), 0o755); err != nil {
		return err
	}
	target, err := os.MkdirTemp(b.root, ".tmp-debootstrap-")
	if err != nil {
		return err
	}
	defer removeAllSafe(target)
	if err := os.Chmod(target, 0o755); err != nil {
		return err
	}
	args := []string{"--variant=minbase", "--arch=amd64"}
	if len(src.info.Packages) > 0 {
		args = append(args, "--include="+strings.Join(src.info.Packages, ","))
	}
	args = append(args, src.info.Suite, target)
	if b.opts.Mirror != "" {
		args = append(args, b.opts.Mirror)
	}
	t := time.Now()
	extra := ""
	if len(src.info.Packages) > 0 {
		extra = " + " + strings.Join(src.info.Packages, ", ")
	}
	b.p.Printf("rootfs: running debootstrap %s minbase%s (1 to 3 min)…", src.info.Suite, extra)
	if err := runDebootstrap(ctx, args, b.p); err != nil {
		return err
	}
	b.p.Printf("rootfs: debootstrap done (%s)", since(t))
	// Trim caches before archiving: downloaded .debs and apt lists are large
	// and stale by the time a VM boots.
	for _, glob := range []string{"var/cache/apt/archives/*.deb", "var/cache/apt/*.bin", "var/lib/apt/lists/*_*"} {
		matches, _ := filepath.Glob(filepath.Join(target, glob))
		for _, m := range matches {
			os.Remove(m)
		}
	}
	if mps, _ := mountsUnder(target); len(mps) > 0 {
		return fmt.Errorf("debootstrap left mounts behind: %v", mps)
	}
	t = time.Now()
	if err := createTarball(ctx, target, src.tarball); err != nil {
		return err
	}
	if st, err := os.Stat(src.tarball); err == nil {
		b.p.Printf("rootfs: cached the tree as %s (%d MiB, %s)", filepath.Base(src.tarball), st.Size()>>20, since(t))
	}
	return nil
}

// runDebootstrap runs debootstrap in its own process group (so cancelling
// ctx kills it and every child) and reports its phases as progress lines.
func runDebootstrap(ctx context.Context, args []string, p progress) error {
	cmd := exec.CommandContext(ctx, "debootstrap", args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 10 * time.Second
	pr, pw := io.Pipe()
	cmd.Stdout, cmd.Stderr = pw, pw
	var (
		mu   sync.Mutex
		tail []string
		wg   sync.WaitGroup
	)
	wg.Add(1)
	go func() {
		defer wg.Done()
		sc := bufio.NewScanner(pr)
		// debootstrap prints a Retrieving/Validating/Extracting line per
		// package; report the first of each kind and every other step.
		perPackage := map[string]bool{"Retrieving": true, "Validating": true, "Extracting": true, "Unpacking": true, "Configuring": true, "Installing": true}
		seen := map[string]bool{}
		for sc.Scan() {
			line := sc.Text()
			mu.Lock()
			tail = append(tail, line)
			if len(tail) > 20 {
				tail = tail[1:]
			}
			mu.Unlock()
			if msg, ok := strings.CutPrefix(line, "I: "); ok {
				verb, _, _ := strings.Cut(msg, " ")
				if perPackage[verb] {
					if seen[verb] {
						continue
					}
					seen[verb] = true
					msg += " …"
				}
				p.Printf("rootfs:   %s", msg)
			}
		}
		io.Copy(io.Discard, pr)
	}()
	err := cmd.Start()
	if err == nil {
		err = cmd.Wait()
	}
	pw.Close()
	wg.Wait()
	if err != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("debootstrap: %w", ctx.Err())
		}
		mu.Lock()
		defer mu.Unlock()
		return fmt.Errorf("debootstrap %s: %w: %s", strings.Join(args, " "), err, strings.Join(tail, " | "))
	}
	return nil
}

// createTarball archives dir with GNU tar (ownership, modes, device nodes,
// hard links and xattrs preserved) and compresses it with zstd in Go,
// writing atomically to dst.
func createTarball(ctx context.Context, dir, dst string) error {
	tmp, err := os.CreateTemp(filepath.Dir(dst), ".tmp-"+filepath.Base(dst)+"-")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	zw, err := zstd.NewWriter(tmp, zstd.WithEncoderLevel(zstd.SpeedDefault))
	if err != nil {
		tmp.Close()
		return err
	}
	cmd := exec.CommandContext(ctx, "tar", append(append([]string{"-C", dir}, tarFlags...), "-cf", "-", ".")...)
	cmd.Stdout = zw
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		tmp.Close()
		return fmt.Errorf("tar -c %s: %w: %s", dir, err, lastLines(stderr.String(), 5))
	}
	if err := zw.Close(); err != nil {
		tmp.Close()
		return fmt.Errorf("zstd: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), dst); err != nil {
		return err
	}
	return syncDir(filepath.Dir(dst))
}

// extractTarball unpacks a tarball made by createTarball into dir.
func extractTarball(ctx context.Context, tarball, dir string) error {
	f, err := os.Open(tarball)
	if err != nil {
		return err
	}
	defer f.Close()
	zr, err := zstd.NewReader(bufio.NewReaderSize(f, 1<<20))
	if err != nil {
		return fmt.Errorf("zstd %s: %w", tarball, err)
	}
	defer zr.Close()
	cmd := exec.CommandContext(ctx, "tar", append(append([]string{"-C", dir}, tarFlags...), "-xpf", "-")...)
	cmd.Stdin = zr
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("tar -x %s: %w: %s", tarball, err, lastLines(stderr.String(), 5))
	}
	return nil
}
