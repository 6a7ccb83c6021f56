package image

import (
	"archive/tar"
	"bufio"
	"bytes"
	"context"
	"debug/elf"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/ulikunitz/xz"
)

// kernelEntry is one unpacked kernel package in <DataDir>/images/kernel/<pkg>_<ver>/.
type kernelEntry struct {
	Format    int      `json:"format"`
	Key       string   `json:"key"` // identifies package, version, .deb content and module set
	Package   string   `json:"package"`
	Version   string   `json:"version"`
	DebSHA256 string   `json:"deb_sha256"`
	Release   string   `json:"release"`
	Wanted    []string `json:"wanted_modules"`
	Modules   []string `json:"modules"` // load order, paths relative to /lib/modules/<release>/

	dir     string
	Vmlinuz string `json:"-"`
	Vmlinux string `json:"-"`
}

// loadPaths returns the modules' absolute guest paths in load order, as
// written to /etc/noid/modules.
func (k *kernelEntry) loadPaths() []string {
	out := make([]string, len(k.Modules))
	for i, m := range k.Modules {
		out[i] = path.Join("/lib/modules", k.Release, m)
	}
	return out
}

// hostPath returns where module m (relative to /lib/modules/<release>/) is
// stored in the kernel cache.
func (k *kernelEntry) hostPath(m string) string {
	return filepath.Join(k.dir, "modules", filepath.FromSlash(m))
}

func (k *kernelEntry) setDir(dir string) {
	k.dir = dir
	k.Vmlinuz = filepath.Join(dir, "vmlinuz")
	k.Vmlinux = filepath.Join(dir, "vmlinux")
}

// kernelKey identifies the content of a kernel cache entry.
func kernelKey(pkg, ver, debSHA string) string {
	return hashStrings("kernel-entry", fmt.Sprint(FormatVersion), pkg, ver, debSHA, strings.Join(GuestModules, ","))
}

func kernelEntryDir(root, pkg, ver string) string {
	name := strings.TrimPrefix(pkg, "linux-image-") + "_" + ver
	name = strings.NewReplacer(":", "%3a", "/", "_").Replace(name)
	return filepath.Join(root, "kernel", name)
}

// readKernelEntry loads the kernel.json of an entry directory.
func readKernelEntry(dir string) (*kernelEntry, error) {
	b, err := os.ReadFile(filepath.Join(dir, "kernel.json"))
	if err != nil {
		return nil, err
	}
	var k kernelEntry
	if err := json.Unmarshal(b, &k); err != nil {
		return nil, fmt.Errorf("parse %s/kernel.json: %w", dir, err)
	}
	k.setDir(dir)
	return &k, nil
}

// kernel returns the kernel cache entry for this build, downloading and
// unpacking the kernel package when needed.
func (b *builder) kernel(ctx context.Context) (*kernelEntry, error) {
	if b.opts.KernelDeb != "" {
		return b.kernelFromDeb(ctx, b.opts.KernelDeb)
	}
	pkg, ver, err := resolveKernelPackage(ctx, b.root, b.opts.KernelPackage)
	if err != nil {
		// No apt (or no package lists): fall back to the newest unpacked kernel.
		if k := newestKernelEntry(b.root); k != nil {
			b.p.Printf("kernel: cannot ask apt (%v); using cached %s %s", err, k.Package, k.Version)
			return k, nil
		}
		return nil, fmt.Errorf("%w (run `apt-get update`, or set %s to a linux-image .deb)", err, KernelDebEnv)
	}
	dir := kernelEntryDir(b.root, pkg, ver)
	if k, err := readKernelEntry(dir); err == nil && k.Format == FormatVersion && k.Key == kernelKey(pkg, ver, k.DebSHA256) {
		return k, nil
	}
	deb, err := b.downloadKernel(ctx, pkg, ver)
	if err != nil {
		// Offline, or the lists name a version the mirror no longer has.
		if k := newestKernelEntry(b.root); k != nil && ctx.Err() == nil {
			b.p.Printf("kernel: download failed (%v); using cached %s %s", err, k.Package, k.Version)
			return k, nil
		}
		return nil, fmt.Errorf("%w (or set %s to a linux-image .deb)", err, KernelDebEnv)
	}
	return b.kernelFromDeb(ctx, deb)
}

// kernelFromDeb returns the cache entry for the kernel package in debPath,
// unpacking it if the cache does not already hold exactly this .deb.
func (b *builder) kernelFromDeb(ctx context.Context, debPath string) (*kernelEntry, error) {
	debSHA, err := sha256File(debPath)
	if err != nil {
		return nil, err
	}
	ctl, err := debControl(ctx, debPath)
	if err != nil {
		return nil, err
	}
	pkg, ver := ctl["Package"], ctl["Version"]
	if !strings.HasPrefix(pkg, "linux-image-") || ver == "" {
		return nil, fmt.Errorf("%s is not a linux-image package (Package %q)", debPath, pkg)
	}
	dir := kernelEntryDir(b.root, pkg, ver)
	key := kernelKey(pkg, ver, debSHA)
	if k, err := readKernelEntry(dir); err == nil && k.Format == FormatVersion && k.Key == key {
		return k, nil
	}
	t := time.Now()
	b.p.Printf("kernel: unpacking %s %s", pkg, ver)
	if err := os.MkdirAll(filepath.Dir(dir), 0o755); err != nil {
		return nil, err
	}
	tmp, err := os.MkdirTemp(filepath.Dir(dir), ".tmp-"+filepath.Base(dir)+"-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)
	if err := os.Chmod(tmp, 0o755); err != nil {
		return nil, err
	}
	k, err := unpackKernelDeb(ctx, debPath, tmp)
	if err != nil {
		return nil, err
	}
	k.Format, k.Key, k.Package, k.Version, k.DebSHA256 = FormatVersion, key, pkg, ver, debSHA
	kb, err := json.MarshalIndent(k, "", "  ")
	if err != nil {
		return nil, err
	}
	if err := writeFileSync(filepath.Join(tmp, "kernel.json"), append(kb, '\n'), 0o644); err != nil {
		return nil, err
	}
	if err := replaceDir(tmp, dir); err != nil {
		return nil, err
	}
	k.setDir(dir)
	b.p.Printf("kernel: %s ready, %d modules (%s)", k.Release, len(k.Modules), since(t))
	return k, nil
}

// unpackKernelDeb extracts the bzImage, config and the guest modules (with
// their dependencies) from a linux-image .deb into dir, and the ELF vmlinux
// from the bzImage. It reads the data archive once.
func unpackKernelDeb(ctx context.Context, debPath, dir string) (*kernelEntry, error) {
	var (
		vmlinuz, config []byte
		release         string
		builtin         = map[string]bool{}
		mods            = map[string]*modInfo{}
	)
	setRelease := func(r, from string) error {
		if release != "" && r != release {
			return fmt.Errorf("package holds more than one kernel release (%s, %s)", release, r)
		}
		release = r
		return nil
	}
	err := walkDebTar(ctx, debPath, "data.tar", func(name string, hdr *tar.Header, r io.Reader) error {
		if hdr.Typeflag != tar.TypeReg {
			return nil
		}
		switch {
		case strings.HasPrefix(name, "/boot/vmlinuz-"):
			if err := setRelease(strings.TrimPrefix(name, "/boot/vmlinuz-"), name); err != nil {
				return err
			}
			b, err := io.ReadAll(r)
			vmlinuz = b
			return err
		case strings.HasPrefix(name, "/boot/config-"):
			b, err := io.ReadAll(r)
			config = b
			return err
		case strings.HasPrefix(name, "/lib/modules/") || strings.HasPrefix(name, "/usr/lib/modules/"):
			rest := strings.TrimPrefix(strings.TrimPrefix(name, "/usr"), "/lib/modules/")
			rel, file, ok := strings.Cut(rest, "/")
			if !ok {
				return nil
			}
			if file == "modules.builtin" {
				b, err := io.ReadAll(r)
				for n := range parseModulesBuiltin(b) {
					builtin[n] = true
				}
				return err
			}
			ko, comp := strings.CutSuffix(file, ".xz")
			if !comp {
				ko, comp = strings.CutSuffix(file, ".zst")
			}
			if !comp {
				ko, comp = strings.CutSuffix(file, ".gz")
			}
			if !strings.HasSuffix(ko, ".ko") {
				return nil
			}
			if err := setRelease(rel, name); err != nil {
				return err
			}
			data, err := readModule(file, r)
			if err != nil {
				return fmt.Errorf("%s: %w", name, err)
			}
			m, err := newModInfo(ko, data)
			if err != nil {
				return err
			}
			mods[m.Name] = m
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	if vmlinuz == nil {
		return nil, fmt.Errorf("%s has no /boot/vmlinuz-*", debPath)
	}
	order, err := moduleLoadOrder(GuestModules, mods, builtin)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", debPath, err)
	}
	k := &kernelEntry{Release: release, Wanted: append([]string(nil), GuestModules...)}
	k.setDir(dir)
	if err := writeFileSync(k.Vmlinuz, vmlinuz, 0o644); err != nil {
		return nil, err
	}
	if r, err := KernelVersionFromBzImage(k.Vmlinuz); err != nil {
		return nil, err
	} else if r != release {
		return nil, fmt.Errorf("bzImage says release %s, package paths say %s", r, release)
	}
	if config != nil {
		if err := writeFileSync(filepath.Join(dir, "config"), config, 0o644); err != nil {
			return nil, err
		}
	}
	for _, m := range order {
		p := k.hostPath(m.Path)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return nil, err
		}
		if err := writeFileSync(p, m.Data, 0o644); err != nil {
			return nil, err
		}
		k.Modules = append(k.Modules, m.Path)
	}
	if err := writeVmlinux(k.Vmlinuz, k.Vmlinux); err != nil {
		return nil, err
	}
	return k, nil
}

// writeVmlinux extracts the ELF kernel from bzImage into dst.
func writeVmlinux(bzImage, dst string) error {
	f, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	w := bufio.NewWriterSize(f, 1<<20)
	if err := ExtractVmlinux(bzImage, w); err != nil {
		f.Close()
		return err
	}
	if err := w.Flush(); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// readModule reads a kernel module from a package, decompressing .ko.xz,
// .ko.zst and .ko.gz so the guest can load it with finit_module without
// in-kernel decompression support.
func readModule(name string, r io.Reader) ([]byte, error) {
	switch {
	case strings.HasSuffix(name, ".xz"):
		xr, err := xz.NewReader(r)
		if err != nil {
			return nil, err
		}
		return io.ReadAll(xr)
	case strings.HasSuffix(name, ".zst"):
		zr, err := zstd.NewReader(r, zstd.WithDecoderConcurrency(1))
		if err != nil {
			return nil, err
		}
		defer zr.Close()
		return io.ReadAll(zr)
	case strings.HasSuffix(name, ".gz"):
		dr, closeFn, err := decompressByName(name, r)
		if err != nil {
			return nil, err
		}
		defer closeFn()
		return io.ReadAll(dr)
	}
	return io.ReadAll(r)
}

// resolveKernelPackage turns pkg (a metapackage such as
// linux-image-cloud-amd64, or a concrete linux-image-<abi>-<flavour>) into the
// concrete package name and its apt candidate version. It only reads apt's
// local package lists, and remembers the answer in <root>/kernel/resolved.json
// until those lists change (apt-cache takes about a second where apt keeps no
// binary cache, as in Debian's container images).
func resolveKernelPackage(ctx context.Context, root, pkg string) (name, version string, err error) {
	type resolved struct {
		Package, Stamp, Name, Version string
	}
	memo := filepath.Join(root, "kernel", "resolved.json")
	stamp := aptListsStamp()
	var r resolved
	if b, err := os.ReadFile(memo); err == nil && json.Unmarshal(b, &r) == nil &&
		stamp != "" && r.Package == pkg && r.Stamp == stamp && r.Name != "" && r.Version != "" {
		return r.Name, r.Version, nil
	}
	name, version, err = aptCandidate(ctx, pkg)
	if err != nil {
		return "", "", err
	}
	if !strings.HasPrefix(name, "linux-image-") {
		return "", "", fmt.Errorf("resolve %s: %s is not a linux-image package", pkg, name)
	}
	if stamp != "" {
		b, _ := json.Marshal(resolved{Package: pkg, Stamp: stamp, Name: name, Version: version})
		if os.MkdirAll(filepath.Dir(memo), 0o755) == nil {
			writeFileAtomic(memo, b, 0o644) // best effort
		}
	}
	return name, version, nil
}

// aptCandidate asks apt-cache for pkg's candidate record. When pkg depends on
// exactly one linux-image-* package (a metapackage), that dependency is
// resolved instead; Debian's metapackages pin it with (= version).
func aptCandidate(ctx context.Context, pkg string) (name, version string, err error) {
	for depth := 0; depth < 3; depth++ {
		out, err := runCmd(ctx, "apt-cache", "show", "--no-all-versions", pkg)
		if err != nil {
			return "", "", fmt.Errorf("resolve %s: %w", pkg, err)
		}
		fields := parseControl([]byte(strings.SplitN(out, "\n\n", 2)[0]))
		if fields["Package"] == "" || fields["Version"] == "" {
			return "", "", fmt.Errorf("resolve %s: apt-cache show printed no package record", pkg)
		}
		var dep, depVer string
		for _, alt := range strings.Split(fields["Depends"], ",") {
			d := strings.TrimSpace(strings.Split(alt, "|")[0])
			n, rest, _ := strings.Cut(d, " ")
			if strings.HasPrefix(n, "linux-image-") {
				dep = n
				if v, ok := strings.CutPrefix(strings.TrimSpace(rest), "(="); ok {
					depVer = strings.TrimSpace(strings.TrimSuffix(v, ")"))
				}
				break
			}
		}
		if dep == "" {
			return fields["Package"], fields["Version"], nil
		}
		if depVer != "" {
			return dep, depVer, nil
		}
		pkg = dep
	}
	return "", "", fmt.Errorf("resolve %s: too many levels of linux-image metapackages", pkg)
}

// aptListsStamp summarises the state of apt's package lists and sources
// (names, sizes, mtimes), or returns "" if they cannot be read.
func aptListsStamp() string {
	var parts []string
	for _, dir := range []string{"/var/lib/apt/lists", "/etc/apt/sources.list.d", "/etc/apt/preferences.d"} {
		ents, err := os.ReadDir(dir)
		if err != nil {
			if dir == "/var/lib/apt/lists" {
				return ""
			}
			continue
		}
		for _, e := range ents {
			if info, err := e.Info(); err == nil && info.Mode().IsRegular() {
				parts = append(parts, fmt.Sprintf("%s/%s %d %d", dir, e.Name(), info.Size(), info.ModTime().UnixNano()))
			}
		}
	}
	for _, f := range []string{"/etc/apt/sources.list", "/etc/apt/preferences"} {
		if info, err := os.Stat(f); err == nil {
			parts = append(parts, fmt.Sprintf("%s %d %d", f, info.Size(), info.ModTime().UnixNano()))
		}
	}
	return hashStrings(parts...)
}

// downloadKernel fetches pkg=ver with apt-get download into
// <images>/kernel/debs (kept so a changed module set can be re-derived
// offline) and returns the .deb's path.
func (b *builder) downloadKernel(ctx context.Context, pkg, ver string) (string, error) {
	debs := filepath.Join(b.root, "kernel", "debs")
	if err := os.MkdirAll(debs, 0o755); err != nil {
		return "", err
	}
	final := filepath.Join(debs, strings.ReplaceAll(pkg+"_"+ver+"_amd64.deb", ":", "%3a"))
	if ctl, err := debControl(ctx, final); err == nil && ctl["Package"] == pkg && ctl["Version"] == ver {
		return final, nil
	}
	tmp, err := os.MkdirTemp(debs, ".tmp-dl-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(tmp)
	t := time.Now()
	b.p.Printf("kernel: downloading %s (%s)", pkg, ver)
	if err := aptDownload(ctx, tmp, pkg+"="+ver); err != nil {
		return "", err
	}
	got, err := filepath.Glob(filepath.Join(tmp, "*.deb"))
	if err != nil || len(got) != 1 {
		return "", fmt.Errorf("apt-get download %s left %d .deb files", pkg, len(got))
	}
	if err := syncFile(got[0]); err != nil {
		return "", err
	}
	if err := os.Rename(got[0], final); err != nil {
		return "", err
	}
	if st, err := os.Stat(final); err == nil {
		b.p.Printf("kernel: downloaded %d MiB (%s)", st.Size()>>20, since(t))
	}
	return final, syncDir(debs)
}

// aptDownload runs `apt-get download` for the package specs inside dir. As
// root, apt drops to the _apt user for downloads, which cannot write to a
// private directory and then warns; the sandbox user is set to root instead.
func aptDownload(ctx context.Context, dir string, specs ...string) error {
	args := []string{"download", "-q"}
	if os.Geteuid() == 0 {
		args = append(args, "-o", "APT::Sandbox::User=root")
	}
	args = append(args, specs...)
	cmd := exec.CommandContext(ctx, "apt-get", args...)
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("apt-get download %s: %w: %s", strings.Join(specs, " "), err, lastLines(string(out), 5))
	}
	return nil
}

// newestKernelEntry returns the most recently unpacked valid kernel entry, or nil.
func newestKernelEntry(root string) *kernelEntry {
	ents, err := os.ReadDir(filepath.Join(root, "kernel"))
	if err != nil {
		return nil
	}
	type cand struct {
		k  *kernelEntry
		mt time.Time
	}
	var cands []cand
	for _, e := range ents {
		if !e.IsDir() || strings.HasPrefix(e.Name(), ".") || e.Name() == "debs" {
			continue
		}
		dir := filepath.Join(root, "kernel", e.Name())
		k, err := readKernelEntry(dir)
		if err != nil || k.Format != FormatVersion || k.Key != kernelKey(k.Package, k.Version, k.DebSHA256) {
			continue
		}
		st, err := os.Stat(filepath.Join(dir, "kernel.json"))
		if err != nil {
			continue
		}
		cands = append(cands, cand{k, st.ModTime()})
	}
	if len(cands) == 0 {
		return nil
	}
	sort.Slice(cands, func(i, j int) bool { return cands[i].mt.After(cands[j].mt) })
	return cands[0].k
}

// runCmd runs a command and returns its stdout; errors include stderr.
func runCmd(ctx context.Context, name string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, lastLines(stderr.String(), 5))
	}
	return stdout.String(), nil
}

// lastLines returns the last n non-empty lines of s, joined with " | ".
func lastLines(s string, n int) string {
	var lines []string
	for _, l := range strings.Split(s, "\n") {
		if l = strings.TrimSpace(l); l != "" {
			lines = append(lines, l)
		}
	}
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, " | ")
}

// checkStaticELF reports an error unless path is an x86-64 ELF executable
// without a program interpreter (the agent runs as /init before any libc
// exists).
func checkStaticELF(path string) error {
	f, err := elf.Open(path)
	if err != nil {
		return fmt.Errorf("not an ELF executable: %w", err)
	}
	defer f.Close()
	if f.Machine != elf.EM_X86_64 {
		return fmt.Errorf("built for %v, want x86-64", f.Machine)
	}
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return errors.New("dynamically linked (has PT_INTERP); build it with CGO_ENABLED=0")
		}
	}
	return nil
}
