// Package firecracker is noid's Firecracker backend: a vmm.Backend that runs
// each VM in its own Firecracker process (under the jailer when it is
// installed; as root, not at all without it unless the JailerMode says so)
// and drives it through Firecracker's HTTP API on a unix socket,
// with a small hand-written client (Client) and the vsock host-side
// handshake (DialVsock) for the guest agent.
//
// # Supported Firecracker versions
//
// Firecracker v1.16.1 and later 1.x releases, on x86_64 with KVM. The API
// schema noid is checked against is v1.16.1's (see the contract test).
// Check refuses other versions with a message, because:
//
//   - Firecracker rejects unknown request fields (serde deny_unknown_fields),
//     and a restore sends vsock_override, which appeared in v1.16.0;
//   - v1.16.0 can leave a restored guest's vsock silent, which makes the agent
//     unreachable after every restore; v1.16.1 fixes it (upstream PR #5958);
//   - a 2.0 release may change the API incompatibly.
//
// # Files and paths
//
// Firecracker stores the paths of a VM's drive and vsock socket in its
// snapshots, and reopens them on restore. To keep those paths valid for every
// VM restored or cloned from a snapshot, noid never gives Firecracker an
// absolute path for them: each Firecracker runs with its working directory
// (its "root") set to a per-VM directory, and sees
//
//	api.sock         the API socket
//	v.sock           the vsock socket (the agent listens on guest port 1024)
//	rootfs.ext4      the VM's root disk (a symlink to Spec.Disk, or a hard link in a jail)
//	firecracker.log  Firecracker's own log (its stderr goes to firecracker.stderr)
//
// so every snapshot records the same relative names, and a clone resolves them
// in its own root. A restore also sends vsock_override and, for a VM with a
// NIC, network_overrides (eth0 → Spec.Net.Tap), so clones never share a
// socket or a TAP. The guest's serial console (Firecracker's stdout) goes to
// Spec.SerialLog. Spec.RunDir is not used: relative socket names have no
// length limit problem, and the host side connects through /proc/self/fd
// when a socket's full path is longer than a socket address allows.
//
// Without the jailer the root is <Spec.Dir>/fc. With the jailer it is the
// chroot, <chroot base>/<firecracker binary name>/<id>/root, where the chroot
// base defaults to <Spec.Dir>/jail (so it is on the same filesystem as the
// VM's files and can hold hard links to them) and <id> is the VM id reduced
// to letters, digits and hyphens (at most 64). Before starting the jailer,
// noid hard-links the disk into the chroot and chowns it to the jail's uid
// and gid (Spec.Sandbox, or Config.JailUID/JailGID), and links or copies the
// kernel and initramfs (a copy when they are not world-readable). The
// jailer, run as
//
//	jailer --id <id> --exec-file <firecracker> --uid U --gid G --chroot-base-dir B
//	       --cgroup-version 1|2 [--parent-cgroup P --cgroup k=v ...] -- --api-sock api.sock
//
// copies the binary in, creates /dev/kvm and /dev/net/tun, pivots into the
// chroot, drops to U:G and execs Firecracker in the same pid (noid never uses
// --daemonize or --new-pid-ns, so the pid it started is Firecracker's). With
// Spec.Sandbox.CgroupPath set, the jailer creates the cgroup
// <CgroupPath's parent>/<id> and writes Config.JailerCgroups into it (the
// jailer attaches the process only to controllers named there). Kill removes
// the chroot and the cgroup. Firecracker's own seccomp filter is always on.
//
// # Snapshots
//
// A checkpoint directory holds memory.snap, vmstate.snap, rootfs.ext4 and
// meta.json (vmm.Snap*); meta.json says backend "firecracker", and Restore
// refuses a snapshot from any other backend with a clear error, as well as
// one whose vCPU count, memory size or NIC presence differs from the spec.
//
// Restore loads the snapshot with the File memory backend: Firecracker maps
// the memory file MAP_PRIVATE, so pages load lazily and every clone of one
// checkpoint shares its clean pages through the page cache. The file is
// hard-linked (or copied where a link is impossible) to Spec.MemFile, which
// for a Firecracker VM is this immutable base image, never the live RAM;
// the link keeps it alive even when the checkpoint is deleted. The disk is
// copied with the Copier into Spec.Disk.
//
// With dirty page tracking on (the default; Config.DisableDiffSnapshots
// turns it off), a checkpoint of a VM whose base image is known is a Diff:
// before pausing, the base is copied into the checkpoint (a reflink where
// the store supports it); while paused, Firecracker writes only the pages
// dirtied since the base (memory.diff) and the disk is copied; after resuming,
// the dirty pages are merged onto the copy (storage.OverlayFile) and
// Spec.MemFile is re-linked to the new memory.snap, which becomes the next
// base. The pause therefore grows with the pages the guest touched, not with
// its RAM. The first checkpoint after a cold boot or an Adopt, and any
// checkpoint after a failed one, is Full.
package firecracker
