package storage

import (
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/noid-vm/noid/internal/errdefs"
)

// The values of [storage] mode that Decide resolves.
const (
	// SettingAuto makes reflinks where the filesystem has them, sparse
	// copies elsewhere.
	SettingAuto = "auto"
	// SettingCopy makes sparse copies and never tries FICLONE.
	SettingCopy = "copy"
	// SettingReflink requires reflinks.
	SettingReflink = "reflink"
)

// Decision is what [storage] mode resolved to for one storage root, and
// why. The server logs it at start-up; `noid-server storage` and
// `noid-server doctor` print the same one.
type Decision struct {
	// Setting is [storage] mode: auto, copy or reflink.
	Setting string
	// Mode is how files get copied.
	Mode Mode
	// Image is the loop-mounted XFS image the root is on ([storage]
	// reflink_image_size), or "".
	Image string
	// FS names the root's filesystem ("ext4", "xfs", …).
	FS string
	// Why says in one sentence why copies are made this way.
	Why string
}

// Resolved names what the setting resolved to: "reflink", "copy", or
// "reflink-image" for reflinks on the loop-mounted image.
func (d Decision) Resolved() string {
	if d.Image != "" {
		return "reflink-image"
	}
	return d.Mode.String()
}

// String is the decision as one line: how copies are made, and why.
func (d Decision) String() string {
	what := "sparse copies"
	if d.Mode == ModeReflink {
		what = "reflinks"
	}
	return "copies are " + what + ": " + d.Why
}

// NoReflink tells a Copier for this root not to try FICLONE.
func (d Decision) NoReflink() bool { return d.Mode != ModeReflink }

// Decide resolves the [storage] mode setting for the storage root dir
// (which must exist). image is the XFS image loop-mounted on dir, or ""
// when dir is a plain directory: such a root has reflinks by
// construction and is not probed. Otherwise the filesystem of dir is
// probed with FICLONE (see Probe).
//
// A "reflink" setting on a filesystem without reflinks is an error
// (errdefs.ErrUnavailable, with a hint). When dir cannot be probed, the
// decision is sparse copies and the error says why (for "reflink" the
// decision is unusable).
func Decide(dir, setting, image string) (Decision, error) {
	d := Decision{Setting: setting, FS: fsName(dir)}
	if image != "" {
		d.Mode, d.Image, d.FS = ModeReflink, image, "xfs"
		d.Why = fmt.Sprintf("[storage] reflink_image_size keeps storage on the loop-mounted XFS image %s, which has reflinks", image)
		return d, nil
	}
	mode, err := Probe(dir)
	if err != nil {
		d.Mode = ModeCopy
		d.Why = fmt.Sprintf("%s could not be probed for reflinks", dir)
		return d, fmt.Errorf("deciding how to copy files in %s: %w", dir, err)
	}
	switch setting {
	case SettingCopy:
		d.Mode = ModeCopy
		if mode == ModeReflink {
			d.Why = fmt.Sprintf(`[storage] mode = "copy": FICLONE is never tried, although %s has reflinks`, d.FS)
		} else {
			d.Why = fmt.Sprintf(`[storage] mode = "copy" (and %s has no reflinks)`, d.FS)
		}
	case SettingReflink:
		if mode != ModeReflink {
			d.Mode = ModeCopy
			d.Why = fmt.Sprintf(`[storage] mode = "reflink", but %s has no reflinks`, d.FS)
			return d, errdefs.WithHint(fmt.Errorf(`%w: [storage] mode = "reflink" but the storage root %s (%s) has no reflinks (FICLONE)`, errdefs.ErrUnavailable, dir, d.FS),
				`put data_dir on XFS (reflink=1) or btrfs, set [storage] reflink_image_size to keep storage on a loop-mounted XFS image, or set [storage] mode = "auto"`)
		}
		d.Mode = ModeReflink
		d.Why = fmt.Sprintf(`[storage] mode = "reflink" and %s has reflinks`, d.FS)
	default:
		d.Mode = mode
		if mode == ModeReflink {
			d.Why = fmt.Sprintf("%s has reflinks (FICLONE)", d.FS)
		} else {
			d.Why = fmt.Sprintf("%s has no reflinks; checkpoints, rewinds and clones do not copy data (disk layers are hard-linked, "+
				"memory is mapped copy-on-write), so this costs only the first use of each image; "+
				"[storage] reflink_image_size puts storage on a loop XFS image", d.FS)
		}
	}
	return d, nil
}

// fsNames names filesystems by their statfs magic number.
var fsNames = map[int64]string{
	unix.EXT4_SUPER_MAGIC:      "ext4",
	unix.XFS_SUPER_MAGIC:       "xfs",
	unix.BTRFS_SUPER_MAGIC:     "btrfs",
	unix.TMPFS_MAGIC:           "tmpfs",
	unix.OVERLAYFS_SUPER_MAGIC: "overlayfs",
	unix.NFS_SUPER_MAGIC:       "nfs",
	unix.F2FS_SUPER_MAGIC:      "f2fs",
	0x2fc12fc1:                 "zfs",
	0xca451a4e:                 "bcachefs",
}

// fsName names the filesystem holding dir.
func fsName(dir string) string {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return "its filesystem"
	}
	if name, ok := fsNames[int64(st.Type)]; ok {
		return name
	}
	return fmt.Sprintf("its filesystem (type %#x)", st.Type)
}
