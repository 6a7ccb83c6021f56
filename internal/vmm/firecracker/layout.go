package firecracker

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/noid-vm/noid/internal/storage"
	"github.com/noid-vm/noid/internal/vmm"
)

// Names inside a VM's root, as Firecracker sees them (relative to its
// working directory; see the package documentation).
const (
	fcAPISock = "api.sock"
	fcVsock   = "v.sock"
	fcDisk    = "rootfs.ext4"
	fcKernel  = "vmlinux"
	fcInitrd  = "initrd"
	fcLog     = "firecracker.log"
	fcStderr  = "firecracker.stderr"
	fcMem     = "memory.snap"  // restore source inside a jail
	fcState   = "vmstate.snap" // restore source inside a jail
	fcStage   = "snapshot"     // checkpoint staging directory inside a jail
	// stateFile, in Spec.Dir, records the layout of a running VM for Adopt.
	stateFile = "firecracker.json"
	// defaultBase is the memory base image when Spec.MemFile is empty.
	defaultBase = "fc-base.mem"
)

// layout is where one VM's files are, on the host and for Firecracker.
type layout struct {
	// ID is the id given to Firecracker and the jailer.
	ID string `json:"id"`
	// Jailed tells whether the VM runs under the jailer.
	Jailed bool `json:"jailed"`
	// Root is the host directory that is Firecracker's working directory
	// (the chroot when jailed).
	Root string `json:"root"`
	// JailDir is <chroot base>/<exec name>/<id>, removed by Kill (jailed).
	JailDir string `json:"jail_dir,omitempty"`
	// UID and GID own the jail's files (jailed).
	UID int `json:"uid"`
	GID int `json:"gid"`
	// Cgroups are the cgroup directories the jailer creates, removed by
	// Kill.
	Cgroups []string `json:"cgroups,omitempty"`
	// Base is the host path of the memory base image (Spec.MemFile).
	Base string `json:"base"`
	// TrackDirty records whether the process tracks dirty pages.
	TrackDirty bool `json:"track_dirty"`
}

// host returns the host path of a name inside the root.
func (l layout) host(name string) string { return filepath.Join(l.Root, name) }

// layoutFor computes the layout of a new VM.
func (b *Backend) layoutFor(spec vmm.Spec) layout {
	l := layout{ID: fcID(spec.ID), Base: spec.MemFile, TrackDirty: !b.cfg.DisableDiffSnapshots}
	if l.Base == "" {
		l.Base = filepath.Join(spec.Dir, defaultBase)
	}
	if !b.useJailer() {
		l.Root = filepath.Join(spec.Dir, "fc")
		return l
	}
	l.Jailed = true
	l.UID, l.GID = b.cfg.JailUID, b.cfg.JailGID
	if spec.Sandbox != nil {
		l.UID, l.GID = spec.Sandbox.UID, spec.Sandbox.GID
	}
	base := b.cfg.ChrootBaseDir
	if base == "" {
		base = filepath.Join(spec.Dir, "jail")
	}
	l.JailDir = filepath.Join(base, filepath.Base(b.cfg.Binary), l.ID)
	l.Root = filepath.Join(l.JailDir, "root")
	if spec.Sandbox != nil && spec.Sandbox.CgroupPath != "" {
		parent := b.parentCgroup(spec, l.ID)
		for _, c := range cgroupDirs(b.cgroupVersion(), b.cfg.JailerCgroups) {
			l.Cgroups = append(l.Cgroups, filepath.Join(c, parent, l.ID))
		}
	}
	return l
}

// parentCgroup is the jailer's --parent-cgroup for spec: the jailer always
// appends the id, so CgroupPath ".../<id>" maps to its parent.
func (b *Backend) parentCgroup(spec vmm.Spec, id string) string {
	p := strings.Trim(spec.Sandbox.CgroupPath, "/")
	if filepath.Base(p) == id {
		p = filepath.Dir(p)
	}
	if p == "." {
		p = ""
	}
	return p
}

// cgroupVersion is the configured or detected cgroup version.
func (b *Backend) cgroupVersion() int {
	if b.cfg.CgroupVersion != 0 {
		return b.cfg.CgroupVersion
	}
	if _, err := os.Stat("/sys/fs/cgroup/cgroup.controllers"); err == nil {
		return 2
	}
	return 1
}

// cgroupDirs lists the hierarchy roots the jailer writes to for the given
// settings: the unified root for v2, one controller directory per setting
// for v1 ("cpu.shares=10" → /sys/fs/cgroup/cpu).
func cgroupDirs(version int, settings []string) []string {
	if version == 2 {
		return []string{"/sys/fs/cgroup"}
	}
	seen := map[string]bool{}
	var out []string
	for _, s := range settings {
		ctrl, _, _ := strings.Cut(s, ".")
		if ctrl != "" && !seen[ctrl] {
			seen[ctrl] = true
			out = append(out, filepath.Join("/sys/fs/cgroup", ctrl))
		}
	}
	return out
}

// writeState records the layout in Spec.Dir for Adopt.
func writeState(spec vmm.Spec, l layout) error {
	data, err := json.MarshalIndent(l, "", "  ")
	if err != nil {
		return err
	}
	return storage.WriteFileAtomic(filepath.Join(spec.Dir, stateFile), data, 0o600)
}

// readState reads the layout written by writeState.
func readState(spec vmm.Spec) (layout, error) {
	var l layout
	data, err := os.ReadFile(filepath.Join(spec.Dir, stateFile))
	if err != nil {
		return l, err
	}
	if err := json.Unmarshal(data, &l); err != nil {
		return l, fmt.Errorf("parsing %s: %w", stateFile, err)
	}
	return l, nil
}

// prepareRoot creates the VM's root and puts the disk (and, in a jail, the
// boot files) where Firecracker expects them. Stale sockets from an earlier
// process are removed, since Firecracker will not bind over them.
func (b *Backend) prepareRoot(spec vmm.Spec, l layout, withBootFiles bool) error {
	if err := os.MkdirAll(l.Root, 0o700); err != nil {
		return fmt.Errorf("creating %s: %w", l.Root, err)
	}
	for _, name := range []string{fcAPISock, fcVsock} {
		if err := os.Remove(l.host(name)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("removing stale socket: %w", err)
		}
	}
	if err := touch(l.host(fcLog), l); err != nil {
		return err
	}
	if !l.Jailed {
		return replaceSymlink(spec.Disk, l.host(fcDisk))
	}
	if err := os.Chown(l.Root, l.UID, l.GID); err != nil {
		return fmt.Errorf("chowning %s: %w", l.Root, err)
	}
	if err := replaceHardlink(spec.Disk, l.host(fcDisk)); err != nil {
		return fmt.Errorf("linking the disk into the jail (the chroot base must be on the disk's filesystem): %w", err)
	}
	if err := os.Chown(l.host(fcDisk), l.UID, l.GID); err != nil {
		return fmt.Errorf("chowning the disk for the jail: %w", err)
	}
	if !withBootFiles {
		return nil
	}
	if err := b.placeReadable(spec.Kernel, l, fcKernel); err != nil {
		return fmt.Errorf("placing the kernel in the jail: %w", err)
	}
	if spec.Initrd != "" {
		if err := b.placeReadable(spec.Initrd, l, fcInitrd); err != nil {
			return fmt.Errorf("placing the initramfs in the jail: %w", err)
		}
	}
	return nil
}

// placeReadable makes src readable inside the jail as name: a hard link when
// src is world-readable, otherwise (or across filesystems) a copy owned by
// the jail.
func (b *Backend) placeReadable(src string, l layout, name string) error {
	dst := l.host(name)
	fi, err := os.Stat(src)
	if err != nil {
		return err
	}
	if fi.Mode().Perm()&0o004 != 0 || l.UID == 0 {
		if err := replaceHardlink(src, dst); err == nil {
			return nil
		}
	}
	os.Remove(dst)
	if err := copyPlain(src, dst); err != nil {
		return err
	}
	return os.Chown(dst, l.UID, l.GID)
}

// fcPath is how Firecracker names a host path: relative inside the root
// when jailed (the caller must have placed the file there), absolute
// otherwise.
func (l layout) fcPath(hostPath, jailName string) string {
	if l.Jailed {
		return jailName
	}
	return hostPath
}

// touch creates an empty file if it does not exist, owned by the jail.
func touch(path string, l layout) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE, 0o600)
	if err != nil {
		return err
	}
	f.Close()
	if l.Jailed {
		return os.Chown(path, l.UID, l.GID)
	}
	return nil
}

// replaceSymlink makes link point to target, atomically.
func replaceSymlink(target, link string) error {
	tmp := link + ".tmp-" + randHex()
	if err := os.Symlink(target, tmp); err != nil {
		return err
	}
	if err := os.Rename(tmp, link); err != nil {
		os.Remove(tmp)
		return err
	}
	return nil
}

// replaceHardlink makes link another name of target, atomically.
func replaceHardlink(target, link string) error {
	tmp := link + ".tmp-" + randHex()
	if err := os.Link(target, tmp); err != nil {
		return err
	}
	if err := os.Rename(tmp, link); err != nil {
		os.Remove(tmp)
		return err
	}
	return nil
}

// copyPlain copies a small file (kernel, initramfs).
func copyPlain(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		os.Remove(dst)
		return err
	}
	return out.Close()
}

// sha256File hashes a file.
func sha256File(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

func randHex() string {
	var b [6]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}
