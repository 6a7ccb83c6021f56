package qemu

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"

	"github.com/noid-vm/noid/internal/errdefs"
	"github.com/noid-vm/noid/internal/storage"
	"github.com/noid-vm/noid/internal/vmm"
)

// The files of a VM directory and of a snapshot directory (format 2):
//
//	disk-0000.raw, disk-0001.qcow2, … disk-NNNN.qcow2
//	    the disk chain, bottom first. In a VM directory the last one is
//	    the writable top; in a snapshot all are frozen. Layers are hard
//	    links shared between VMs, checkpoints and golden snapshots.
//	mem.snap (VM) / memory.snap (snapshot)
//	    the memory the VM's RAM starts from, mapped copy-on-write: guest
//	    writes stay in anonymous memory and never reach the file. A VM
//	    that was cold-booted has none: its RAM is anonymous memory.
//	vmstate.snap (snapshot)
//	    the migration stream without guest RAM pages (see splitStream).
//
// VMs started by noid before layered disks have disk.ext4 (raw, the
// bottom of their chain) and mem.raw (RAM shared with the file); their
// snapshots hold rootfs.ext4 and memory.snap, loaded with x-ignore-shared.

const (
	// legacyDisk is the single raw disk of a VM started before layered
	// disks; it is the bottom of its chain.
	legacyDisk = "disk.ext4"
	// legacyMem is the shared RAM file of a VM started before anonymous
	// and copy-on-write RAM.
	legacyMem = "mem.raw"
	// vmMem is the copy-on-write RAM file of a VM restored from a
	// snapshot.
	vmMem = "mem.snap"
	// snapshotFormat is the format of the snapshots this backend writes.
	snapshotFormat = 2
)

// diskName is the file name of layer i of a chain.
func diskName(i int, qcow bool) string {
	ext := "raw"
	if qcow {
		ext = "qcow2"
	}
	return fmt.Sprintf("disk-%04d.%s", i, ext)
}

// diskIndex parses a layer's file name; ok is false for other files.
func diskIndex(name string) (int, bool) {
	rest, ok := strings.CutPrefix(name, "disk-")
	if !ok {
		return 0, false
	}
	num, ext, ok := strings.Cut(rest, ".")
	if !ok || (ext != "raw" && ext != "qcow2") || len(num) != 4 {
		return 0, false
	}
	n, err := strconv.Atoi(num)
	return n, err == nil
}

// chain lists the disk images in dir, bottom first: a legacy disk.ext4 or a
// snapshot's rootfs.ext4 at the bottom, then disk-NNNN layers by index.
func chain(dir string) ([]string, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("listing the disk of %s: %w", dir, err)
	}
	var out []string
	type layer struct {
		i    int
		name string
	}
	var layers []layer
	for _, e := range ents {
		switch name := e.Name(); {
		case name == legacyDisk || name == vmm.SnapDisk:
			out = append(out, filepath.Join(dir, name))
		default:
			if i, ok := diskIndex(name); ok {
				layers = append(layers, layer{i, name})
			}
		}
	}
	sort.Slice(layers, func(a, b int) bool { return layers[a].i < layers[b].i })
	for _, l := range layers {
		out = append(out, filepath.Join(dir, l.name))
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%w: %s holds no disk image", errdefs.ErrNotFound, dir)
	}
	return out, nil
}

// nextLayer is the file name of the layer to put on top of chain c.
func nextLayer(c []string) string {
	top := filepath.Base(c[len(c)-1])
	i, ok := diskIndex(top)
	if !ok {
		i = 0
	}
	return diskName(i+1, true)
}

// isQcow2 tells a qcow2 image from a raw one by its magic.
func isQcow2(path string) (bool, error) {
	f, err := os.Open(path)
	if err != nil {
		return false, err
	}
	defer f.Close()
	var b [4]byte
	if _, err := io.ReadFull(f, b[:]); err != nil {
		if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
			return false, nil
		}
		return false, err
	}
	return binary.BigEndian.Uint32(b[:]) == 0x514649fb, nil
}

// virtualSize is the size of the disk an image holds: a qcow2's virtual
// size from its header, a raw image's file size.
func virtualSize(path string) (int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	var h [32]byte
	n, _ := io.ReadFull(f, h[:])
	if n == len(h) && binary.BigEndian.Uint32(h[:4]) == 0x514649fb {
		return int64(binary.BigEndian.Uint64(h[24:32])), nil
	}
	fi, err := f.Stat()
	if err != nil {
		return 0, err
	}
	return fi.Size(), nil
}

// linkOrCopy makes dst the file src: a hard link where both are on one
// filesystem, a copy (reflink where possible) otherwise.
func linkOrCopy(ctx context.Context, src, dst string, cp vmm.Copier) error {
	err := os.Link(src, dst)
	if err == nil {
		return nil
	}
	if !errors.Is(err, syscall.EXDEV) {
		return fmt.Errorf("linking %s to %s: %w", src, dst, err)
	}
	return cp.CopyFile(ctx, src, dst)
}

// NewDisk lays out the disk of a VM booting from base in dir (see
// vmm.Layered).
func (b *Backend) NewDisk(ctx context.Context, dir, base string, size int64, cp vmm.Copier) error {
	fi, err := os.Stat(base)
	if err != nil {
		return fmt.Errorf("%w: base image %s: %v", errdefs.ErrUnavailable, base, err)
	}
	bottom := filepath.Join(dir, diskName(0, false))
	if size > fi.Size() {
		if err := cp.CopyFile(ctx, base, bottom); err != nil {
			return fmt.Errorf("copying the base image: %w", err)
		}
		if err := growExt4(ctx, bottom, size); err != nil {
			return err
		}
	} else {
		if size != 0 && size < fi.Size() {
			return fmt.Errorf("%w: disk size %d is smaller than the image (%d bytes)", errdefs.ErrInvalidArgument, size, fi.Size())
		}
		if err := linkOrCopy(ctx, base, bottom, cp); err != nil {
			return err
		}
	}
	vs, err := virtualSize(bottom)
	if err != nil {
		return err
	}
	return storage.CreateQcow2(filepath.Join(dir, diskName(1, true)), vs)
}

// DiskSize is the size of the disk the VM in dir sees (see vmm.Layered).
func (b *Backend) DiskSize(dir string) (int64, error) {
	c, err := chain(dir)
	if err != nil {
		return 0, err
	}
	return virtualSize(c[len(c)-1])
}

// DiskLayers lists the disk chain in dir, bottom first (see vmm.Layered).
func (b *Backend) DiskLayers(dir string) ([]string, error) { return chain(dir) }

// growExt4 enlarges a raw ext4 image and its filesystem to size bytes.
func growExt4(ctx context.Context, path string, size int64) error {
	if err := os.Truncate(path, size); err != nil {
		return fmt.Errorf("growing disk: %w", err)
	}
	out, err := exec.CommandContext(ctx, "resize2fs", "-f", path).CombinedOutput()
	if err != nil {
		return fmt.Errorf("resizing filesystem (resize2fs from e2fsprogs): %v: %s", err, strings.TrimSpace(string(out)))
	}
	return nil
}

// layoutFromSnapshot lays out in vmDir the files of a VM restored from the
// snapshot in snapDir: the snapshot's disk chain (hard links) under a new
// empty top, and the VM's copy-on-write memory file (a hard link where
// QEMU can map it read-only, a copy otherwise, because QEMU before 8.2
// opens it for writing even to map it privately).
func (b *Backend) layoutFromSnapshot(ctx context.Context, snapDir, vmDir string, cp vmm.Copier) error {
	layers, err := chain(snapDir)
	if err != nil {
		return err
	}
	// A VM restored in place (its VMM was stopped) had a disk and memory.
	if old, err := chain(vmDir); err == nil {
		for _, f := range old {
			os.Remove(f)
		}
	}
	os.Remove(filepath.Join(vmDir, vmMem))
	os.Remove(filepath.Join(vmDir, legacyMem))
	var linked []string
	for i, l := range layers {
		name := filepath.Base(l)
		if name == vmm.SnapDisk {
			name = diskName(i, false)
		}
		dst := filepath.Join(vmDir, name)
		if err := linkOrCopy(ctx, l, dst, cp); err != nil {
			return err
		}
		linked = append(linked, dst)
	}
	vs, err := virtualSize(linked[len(linked)-1])
	if err != nil {
		return err
	}
	if err := storage.CreateQcow2(filepath.Join(vmDir, nextLayer(linked)), vs); err != nil {
		return err
	}
	mem := filepath.Join(snapDir, vmm.SnapMemory)
	if b.privateReadOnlyRAM(ctx) {
		return linkOrCopy(ctx, mem, filepath.Join(vmDir, vmMem), cp)
	}
	return cp.CopyFile(ctx, mem, filepath.Join(vmDir, vmMem))
}
