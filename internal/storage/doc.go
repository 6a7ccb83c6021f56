// Package storage holds noid's file-level storage primitives: copying VM
// images and snapshot files cheaply, telling whether a directory supports
// reflinks, putting the store on a loop-mounted XFS so that it does, and
// measuring and syncing directories.
//
// # Copies
//
// Every VM and every checkpoint is a directory of large, mostly sparse files
// (guest RAM, root disk). [Copier] copies them with the FICLONE ioctl
// (a reflink: the new file shares the old one's extents copy-on-write, so a
// copy of any size takes a few milliseconds) when source and destination are
// on the same reflink-capable filesystem (XFS with reflink=1, btrfs). On
// anything else it falls back to a sparse-aware copy: it walks the source's
// data extents with lseek(SEEK_DATA/SEEK_HOLE), copies each with
// copy_file_range(2), and leaves holes as holes, so a 512 MiB RAM file with
// 100 MiB touched costs 100 MiB of I/O and 100 MiB of disk.
//
// [Probe] reports which of the two a directory gets. [Decide] resolves the
// [storage] mode setting (auto, copy or reflink) with it into a [Decision]:
// how copies are made in the storage root and why, which the server logs
// at start-up and `noid-server storage` prints.
//
// # Reflink storage on ext4 hosts
//
// A host whose disk is ext4 (as on the development machines) can still get
// reflink copies by keeping noid's store on a loop-mounted XFS image:
// [SetupReflinkLoop] creates a sparse image file, formats it with
// `mkfs.xfs -m reflink=1` (Debian/Ubuntu package xfsprogs, Fedora/RHEL
// xfsprogs), attaches it to a free loop device through /dev/loop-control and
// mounts it, with no /etc/fstab entry. The loop device is configured with
// LO_FLAGS_AUTOCLEAR, so unmounting (see [TeardownReflinkLoop]) also
// detaches it; nothing is left behind. The mount does not survive a reboot:
// call SetupReflinkLoop again at start-up (it is idempotent).
package storage
