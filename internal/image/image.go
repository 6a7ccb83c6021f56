// Package image builds and caches the files a noid guest boots from: the
// Debian cloud kernel (bzImage, plus the ELF vmlinux extracted from it for
// Firecracker), an initramfs whose /init is the noid agent together with the
// virtio and vsock modules it loads, and an ext4 root filesystem (a busybox
// one that builds in seconds, or Debian from debootstrap).
//
// Everything is built in Go except the root filesystem, which uses
// debootstrap and mkfs.ext4. Outputs live in <DataDir>/images/<name>/ with a
// manifest.json recording input keys and output hashes; each output is
// rebuilt only when its inputs change, and an image directory only ever
// appears complete (it is assembled in a temporary directory and renamed).
//
// Layout under <DataDir>/images/:
//
//	tiny/, debian/         the images: vmlinuz, vmlinux, initrd.img, rootfs.ext4, manifest.json
//	kernel/<pkg-ver>/      unpacked kernel packages (vmlinuz, vmlinux, config, modules, kernel.json)
//	kernel/debs/           downloaded kernel .debs
//	cache/                 debootstrap tarballs, busybox
//	.lock                  serialises builds across processes
package image

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"time"

	"github.com/noid-vm/noid/internal/errdefs"
)

// FormatVersion is the version of the image layout and of the build recipes.
// Changing it makes every cached output stale.
const FormatVersion = 1

// DefaultSuite is the Debian suite debootstrap installs when
// BuildOptions.Suite is empty.
const DefaultSuite = "bookworm"

// DefaultKernelPackage is the Debian metapackage whose concrete dependency
// (linux-image-<abi>-cloud-amd64) provides the guest kernel.
const DefaultKernelPackage = "linux-image-cloud-amd64"

// DefaultPackages are the packages added to the Debian rootfs on top of
// debootstrap's minbase variant when BuildOptions.Packages is nil: what the
// common uses of a VM need without an apt-get inside it (python3 with its
// whole standard library, curl, ping, ip, ps, less, an editor, sudo for the
// guest user). debootstrap installs their dependencies but not their
// recommendations.
var DefaultPackages = []string{"ca-certificates", "curl", "iproute2", "iputils-ping", "less", "nano", "procps", "python3", "sudo"}

// The account every image has besides root: GuestUser (uid and gid
// GuestUID) with its home in /home, and on the Debian image passwordless
// sudo (/etc/sudoers.d/noid) and membership of the sudo group.
const (
	GuestUser        = "noid"
	GuestUID         = 1000
	GuestSudoersLine = GuestUser + " ALL=(ALL:ALL) NOPASSWD: ALL\n"
)

// rootfsRecipe versions what customizeTree and populateBusybox put into a
// root tree. It is part of the rootfs cache key: change it whenever they
// change.
const rootfsRecipe = 2

// Default root filesystem image sizes (sparse files; the guest sees this much
// space). They grow when the tree does not fit comfortably.
const (
	DefaultTinyRootfsSize   int64 = 256 << 20
	DefaultDebianRootfsSize int64 = 2 << 30
)

// Image names, which are also the directory names under <DataDir>/images.
const (
	NameTiny   = "tiny"
	NameDebian = "debian"
)

// File names inside an image directory.
const (
	FileKernel   = "vmlinuz"
	FileVmlinux  = "vmlinux"
	FileInitrd   = "initrd.img"
	FileRootfs   = "rootfs.ext4"
	FileManifest = "manifest.json"
)

// KernelDebEnv names the environment variable that points at a
// pre-downloaded kernel .deb, used instead of apt when BuildOptions.KernelDeb
// is empty.
const KernelDebEnv = "NOID_KERNEL_DEB"

// BuildOptions configures Build.
type BuildOptions struct {
	// DataDir is noid's data directory; images go to <DataDir>/images.
	DataDir string
	// Tiny selects the busybox rootfs (image "tiny") instead of Debian ("debian").
	Tiny bool
	// AgentBinary is the path of the static noid-agent binary. It becomes /init
	// in the initramfs and /usr/local/bin/noid-agent in the rootfs.
	AgentBinary string
	// Progress receives short human-readable progress lines; may be nil.
	Progress io.Writer
	// Suite is the Debian suite for debootstrap; DefaultSuite when empty.
	Suite string
	// Mirror is the Debian mirror URL for debootstrap; debootstrap's default
	// when empty. It is not part of the cache key.
	Mirror string
	// Packages are extra packages for the Debian rootfs (debootstrap
	// --include). nil means DefaultPackages; an empty non-nil slice means none.
	// Ignored for Tiny.
	Packages []string
	// KernelDeb is a pre-downloaded linux-image .deb to use instead of asking
	// apt (offline builds). When empty, the NOID_KERNEL_DEB environment
	// variable is consulted.
	KernelDeb string
	// KernelPackage is the apt package that provides the kernel;
	// DefaultKernelPackage when empty. A metapackage is resolved to its
	// linux-image-* dependency.
	KernelPackage string
	// RootfsSize is the size of the sparse rootfs.ext4 in bytes; 0 means
	// DefaultTinyRootfsSize or DefaultDebianRootfsSize.
	RootfsSize int64
}

// Image describes a built image. All paths are absolute.
type Image struct {
	// Name is "tiny" or "debian".
	Name string
	// Dir is the image directory, <DataDir>/images/<Name>.
	Dir string
	// Kernel is the bzImage (vmlinuz) for QEMU.
	Kernel string
	// Vmlinux is the uncompressed ELF kernel extracted from Kernel, for Firecracker.
	Vmlinux string
	// Initrd is the initramfs (newc cpio) whose /init is the agent.
	Initrd string
	// Rootfs is the ext4 root filesystem image. Treat it as read-only: VMs
	// boot from copies of it (reflink or sparse copy, never a hard link).
	// All files of an image may be hard links shared with noid's caches and
	// with other images, so none may ever be modified in place.
	Rootfs string
	// KernelRelease is the guest's `uname -r`, e.g. "6.1.0-48-cloud-amd64".
	KernelRelease string
	// KernelSHA256 is the hex SHA-256 of Kernel.
	KernelSHA256 string
	// VmlinuxSHA256 is the hex SHA-256 of Vmlinux.
	VmlinuxSHA256 string
	// InitrdSHA256 is the hex SHA-256 of Initrd.
	InitrdSHA256 string
	// RootfsSHA256 is the hex SHA-256 of Rootfs.
	RootfsSHA256 string
	// Tiny reports whether this is the busybox image.
	Tiny bool
}

// manifest is manifest.json in an image directory.
type manifest struct {
	Format        int                     `json:"format"`
	Name          string                  `json:"name"`
	Tiny          bool                    `json:"tiny"`
	Created       time.Time               `json:"created"`
	KernelRelease string                  `json:"kernel_release"`
	KernelPackage string                  `json:"kernel_package"`
	KernelVersion string                  `json:"kernel_version"`
	KernelDeb     string                  `json:"kernel_deb_sha256"`
	Modules       []string                `json:"modules"` // load order, as in /etc/noid/modules
	AgentSHA256   string                  `json:"agent_sha256"`
	Rootfs        rootfsInfo              `json:"rootfs"`
	Files         map[string]manifestFile `json:"files"`
}

// manifestFile records one output: the key of the inputs it was built from
// and its content hash.
type manifestFile struct {
	InputKey string `json:"input_key"`
	SHA256   string `json:"sha256"`
	Size     int64  `json:"size"`
}

// rootfsInfo describes what the rootfs was built from.
type rootfsInfo struct {
	Kind     string   `json:"kind"` // "busybox" or "debootstrap"
	Suite    string   `json:"suite,omitempty"`
	Packages []string `json:"packages,omitempty"`
	Source   string   `json:"source_sha256"` // busybox binary or debootstrap key
	Size     int64    `json:"size"`
}

var suiteRE = regexp.MustCompile(`^[a-z0-9][a-z0-9.-]*$`)

func imageName(tiny bool) string {
	if tiny {
		return NameTiny
	}
	return NameDebian
}

func imagesRoot(dataDir string) string { return filepath.Join(dataDir, "images") }

// Load returns the image already built under dataDir (tiny or debian). It
// checks that the manifest and the files it names are present with their
// recorded sizes; it does not rehash them (see Image.Verify). If there is no
// complete image the error wraps errdefs.ErrNotFound and says how to build one.
func Load(dataDir string, tiny bool) (*Image, error) {
	if dataDir == "" {
		return nil, fmt.Errorf("load image: %w: empty data dir", errdefs.ErrInvalidArgument)
	}
	abs, err := filepath.Abs(dataDir)
	if err != nil {
		return nil, fmt.Errorf("load image: %w", err)
	}
	name := imageName(tiny)
	dir := filepath.Join(imagesRoot(abs), name)
	m, err := readManifest(dir)
	if err != nil {
		hint := "noid-server image build"
		if tiny {
			hint += " --tiny"
		}
		return nil, fmt.Errorf("load image %q from %s: %w (run `%s` first): %v", name, dir, errdefs.ErrNotFound, hint, err)
	}
	if err := m.checkFiles(dir); err != nil {
		return nil, fmt.Errorf("load image %q: %w: %v (rebuild with `noid-server image build`)", name, errdefs.ErrNotFound, err)
	}
	return m.image(dir), nil
}

func readManifest(dir string) (*manifest, error) {
	b, err := os.ReadFile(filepath.Join(dir, FileManifest))
	if err != nil {
		return nil, err
	}
	var m manifest
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("parse %s: %w", FileManifest, err)
	}
	if m.Format != FormatVersion {
		return nil, fmt.Errorf("manifest format %d, this noid uses %d", m.Format, FormatVersion)
	}
	return &m, nil
}

// checkFiles verifies that every output is present with its recorded size.
func (m *manifest) checkFiles(dir string) error {
	for _, name := range []string{FileKernel, FileVmlinux, FileInitrd, FileRootfs} {
		f, ok := m.Files[name]
		if !ok {
			return fmt.Errorf("manifest lists no %s", name)
		}
		st, err := os.Stat(filepath.Join(dir, name))
		if err != nil {
			return err
		}
		if st.Size() != f.Size {
			return fmt.Errorf("%s is %d bytes, manifest says %d", name, st.Size(), f.Size)
		}
	}
	return nil
}

func (m *manifest) image(dir string) *Image {
	return &Image{
		Name:          m.Name,
		Dir:           dir,
		Kernel:        filepath.Join(dir, FileKernel),
		Vmlinux:       filepath.Join(dir, FileVmlinux),
		Initrd:        filepath.Join(dir, FileInitrd),
		Rootfs:        filepath.Join(dir, FileRootfs),
		KernelRelease: m.KernelRelease,
		KernelSHA256:  m.Files[FileKernel].SHA256,
		VmlinuxSHA256: m.Files[FileVmlinux].SHA256,
		InitrdSHA256:  m.Files[FileInitrd].SHA256,
		RootfsSHA256:  m.Files[FileRootfs].SHA256,
		Tiny:          m.Tiny,
	}
}

// Verify rehashes the image's files and compares them with the SHA-256 sums
// recorded at build time.
func (img *Image) Verify() error {
	for path, want := range map[string]string{
		img.Kernel: img.KernelSHA256, img.Vmlinux: img.VmlinuxSHA256,
		img.Initrd: img.InitrdSHA256, img.Rootfs: img.RootfsSHA256,
	} {
		got, err := sha256File(path)
		if err != nil {
			return fmt.Errorf("verify image %s: %w", img.Name, err)
		}
		if got != want {
			return fmt.Errorf("verify image %s: %s has sha256 %s, manifest says %s", img.Name, path, got, want)
		}
	}
	return nil
}

// progress writes human progress lines.
type progress struct{ w io.Writer }

func (p progress) Printf(format string, args ...any) {
	if p.w == nil {
		return
	}
	s := fmt.Sprintf(format, args...)
	if !strings.HasSuffix(s, "\n") {
		s += "\n"
	}
	io.WriteString(p.w, s)
}

// Build builds the image selected by opts.Tiny under <DataDir>/images, or
// returns the cached one when none of its inputs changed. Each output is
// keyed by its inputs (kernel package and version, module list, agent
// SHA-256, rootfs recipe and source, FormatVersion); unchanged outputs are
// carried over by hard link, changed ones rebuilt, and the new image
// directory replaces the old one atomically. Concurrent Builds on the same
// DataDir are serialised with a lock file. Build must run as root to create a
// Debian rootfs (debootstrap) and to give rootfs files root ownership.
func Build(ctx context.Context, opts BuildOptions) (*Image, error) {
	if opts.DataDir == "" {
		return nil, fmt.Errorf("build image: %w: DataDir is empty", errdefs.ErrInvalidArgument)
	}
	if opts.AgentBinary == "" {
		return nil, fmt.Errorf("build image: %w: AgentBinary is empty", errdefs.ErrInvalidArgument)
	}
	dataDir, err := filepath.Abs(opts.DataDir)
	if err != nil {
		return nil, fmt.Errorf("build image: %w", err)
	}
	opts.DataDir = dataDir
	if opts.Suite == "" {
		opts.Suite = DefaultSuite
	}
	if opts.Packages == nil {
		opts.Packages = DefaultPackages
	}
	if opts.KernelPackage == "" {
		opts.KernelPackage = DefaultKernelPackage
	}
	if opts.KernelDeb == "" {
		opts.KernelDeb = os.Getenv(KernelDebEnv)
	}
	if opts.RootfsSize == 0 {
		opts.RootfsSize = DefaultDebianRootfsSize
		if opts.Tiny {
			opts.RootfsSize = DefaultTinyRootfsSize
		}
	}
	if !suiteRE.MatchString(opts.Suite) {
		return nil, fmt.Errorf("build image: %w: bad suite name %q", errdefs.ErrInvalidArgument, opts.Suite)
	}
	if opts.RootfsSize < 32<<20 {
		return nil, fmt.Errorf("build image: %w: RootfsSize %d is below 32 MiB", errdefs.ErrInvalidArgument, opts.RootfsSize)
	}
	p := progress{opts.Progress}
	name := imageName(opts.Tiny)
	root := imagesRoot(dataDir)
	if err := os.MkdirAll(root, 0o755); err != nil {
		return nil, fmt.Errorf("build image: %w", err)
	}
	lock, err := lockFile(ctx, filepath.Join(root, ".lock"), func() {
		p.Printf("waiting for another image build to finish")
	})
	if err != nil {
		return nil, fmt.Errorf("build image: %w", err)
	}
	defer lock.Unlock()
	cleanStale(root)

	b := &builder{opts: opts, p: p, root: root, name: name, dir: filepath.Join(root, name)}
	img, err := b.build(ctx)
	if err != nil {
		return nil, fmt.Errorf("build image %q: %w", name, err)
	}
	return img, nil
}

// cleanStale removes temporary directories and files of builds that died.
// The caller holds the build lock, so nothing else is using them.
func cleanStale(root string) {
	for _, dir := range []string{root, filepath.Join(root, "kernel"), filepath.Join(root, "kernel", "debs"), filepath.Join(root, "cache")} {
		ents, err := os.ReadDir(dir)
		if err != nil {
			continue
		}
		for _, e := range ents {
			if strings.HasPrefix(e.Name(), ".tmp-") || strings.HasPrefix(e.Name(), ".old-") {
				removeAllSafe(filepath.Join(dir, e.Name()))
			}
		}
	}
}

// builder carries one Build.
type builder struct {
	opts BuildOptions
	p    progress
	root string // <DataDir>/images
	name string // tiny or debian
	dir  string // final image directory
}

func (b *builder) build(ctx context.Context) (*Image, error) {
	start := time.Now()
	agentSHA, err := sha256File(b.opts.AgentBinary)
	if err != nil {
		return nil, fmt.Errorf("agent binary: %w", err)
	}
	if err := checkStaticELF(b.opts.AgentBinary); err != nil {
		return nil, fmt.Errorf("agent binary %s: %w", b.opts.AgentBinary, err)
	}

	k, err := b.kernel(ctx)
	if err != nil {
		return nil, fmt.Errorf("kernel: %w", err)
	}
	src, err := b.rootfsSource(ctx)
	if err != nil {
		return nil, fmt.Errorf("rootfs: %w", err)
	}

	kernelKey := hashStrings("kernel", fmt.Sprint(FormatVersion), k.Key)
	initrdKey := hashStrings("initrd", fmt.Sprint(FormatVersion), k.Key, agentSHA, initrdCompression)
	rootfsKey := hashStrings("rootfs", fmt.Sprint(FormatVersion), fmt.Sprint(rootfsRecipe), src.info.Kind, src.info.Source,
		fmt.Sprint(b.opts.RootfsSize), agentSHA)
	keys := map[string]string{FileKernel: kernelKey, FileVmlinux: kernelKey, FileInitrd: initrdKey, FileRootfs: rootfsKey}

	old, oldErr := readManifest(b.dir)
	if oldErr == nil && old.checkFiles(b.dir) == nil {
		same := true
		for f, key := range keys {
			if old.Files[f].InputKey != key {
				same = false
			}
		}
		if same {
			b.p.Printf("image %s: up to date (%s)", b.name, b.dir)
			return old.image(b.dir), nil
		}
	} else {
		old = nil
	}

	tmp, err := os.MkdirTemp(b.root, ".tmp-"+b.name+"-")
	if err != nil {
		return nil, err
	}
	defer removeAllSafe(tmp) // a no-op after the rename succeeded
	if err := os.Chmod(tmp, 0o755); err != nil {
		return nil, err
	}

	m := &manifest{
		Format: FormatVersion, Name: b.name, Tiny: b.opts.Tiny,
		KernelRelease: k.Release, KernelPackage: k.Package, KernelVersion: k.Version, KernelDeb: k.DebSHA256,
		Modules: k.loadPaths(), AgentSHA256: agentSHA, Rootfs: src.info,
		Files: map[string]manifestFile{},
	}
	reuse := func(file string) bool {
		if old == nil || old.Files[file].InputKey != keys[file] {
			return false
		}
		if err := linkOrCopy(filepath.Join(b.dir, file), filepath.Join(tmp, file)); err != nil {
			return false
		}
		m.Files[file] = old.Files[file]
		return true
	}
	record := func(file string) error {
		path := filepath.Join(tmp, file)
		sum, err := sha256File(path)
		if err != nil {
			return err
		}
		st, err := os.Stat(path)
		if err != nil {
			return err
		}
		if err := syncFile(path); err != nil {
			return err
		}
		m.Files[file] = manifestFile{InputKey: keys[file], SHA256: sum, Size: st.Size()}
		return nil
	}

	// Kernel files come from the shared kernel cache.
	for file, src := range map[string]string{FileKernel: k.Vmlinuz, FileVmlinux: k.Vmlinux} {
		if err := linkOrCopy(src, filepath.Join(tmp, file)); err != nil {
			return nil, fmt.Errorf("kernel: %w", err)
		}
		if err := record(file); err != nil {
			return nil, fmt.Errorf("kernel: %w", err)
		}
	}

	if !reuse(FileInitrd) {
		t := time.Now()
		if err := writeInitramfs(filepath.Join(tmp, FileInitrd), k, b.opts.AgentBinary); err != nil {
			return nil, fmt.Errorf("initramfs: %w", err)
		}
		if err := record(FileInitrd); err != nil {
			return nil, fmt.Errorf("initramfs: %w", err)
		}
		b.p.Printf("initramfs: %d modules + agent, %d KiB (%s)", len(k.Modules), m.Files[FileInitrd].Size>>10, since(t))
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}

	if !reuse(FileRootfs) {
		if err := b.buildRootfs(ctx, src, filepath.Join(tmp, FileRootfs)); err != nil {
			return nil, fmt.Errorf("rootfs: %w", err)
		}
		if err := record(FileRootfs); err != nil {
			return nil, fmt.Errorf("rootfs: %w", err)
		}
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}

	m.Created = time.Now().UTC()
	mb, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return nil, err
	}
	if err := writeFileSync(filepath.Join(tmp, FileManifest), append(mb, '\n'), 0o644); err != nil {
		return nil, err
	}
	if testHookBeforeInstall != nil {
		if err := testHookBeforeInstall(tmp); err != nil {
			return nil, err
		}
	}
	if err := replaceDir(tmp, b.dir); err != nil {
		return nil, fmt.Errorf("install %s: %w", b.dir, err)
	}
	b.p.Printf("image %s: ready in %s (%s)", b.name, b.dir, since(start))
	return m.image(b.dir), nil
}

// testHookBeforeInstall, when set by tests, runs with the complete temporary
// image directory just before it is renamed into place.
var testHookBeforeInstall func(tmpDir string) error

// ensureKernel makes sure the kernel cache under opts.DataDir holds the
// kernel Build would use, and returns it. Tests use it to fill a shared cache.
func ensureKernel(ctx context.Context, opts BuildOptions) (*kernelEntry, error) {
	root := imagesRoot(opts.DataDir)
	if err := os.MkdirAll(root, 0o755); err != nil {
		return nil, err
	}
	if opts.KernelPackage == "" {
		opts.KernelPackage = DefaultKernelPackage
	}
	if opts.KernelDeb == "" {
		opts.KernelDeb = os.Getenv(KernelDebEnv)
	}
	p := progress{opts.Progress}
	lock, err := lockFile(ctx, filepath.Join(root, ".lock"), nil)
	if err != nil {
		return nil, err
	}
	defer lock.Unlock()
	b := &builder{opts: opts, p: p, root: root}
	return b.kernel(ctx)
}

func since(t time.Time) string {
	d := time.Since(t)
	if d < time.Second {
		return d.Round(time.Millisecond).String()
	}
	return d.Round(100 * time.Millisecond).String()
}

// sortedCopy returns a sorted copy of ss without duplicates.
func sortedCopy(ss []string) []string {
	out := append([]string(nil), ss...)
	sort.Strings(out)
	j := 0
	for i, s := range out {
		if i == 0 || s != out[j-1] {
			out[j] = s
			j++
		}
	}
	return out[:j]
}
