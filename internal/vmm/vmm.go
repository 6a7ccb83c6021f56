// Package vmm defines the interface every virtual machine monitor backend
// implements (QEMU, Firecracker) and the types they share.
//
// A backend turns a Spec into a running VMM process (cold boot or restore from
// a snapshot), re-adopts processes left running by an earlier server, and
// captures running VMs into snapshot directories. Backends never touch the
// database; the server owns all state transitions.
package vmm

import (
	"context"
	"errors"
	"net"
	"time"
)

// Snapshot file names inside a checkpoint or golden directory. Every backend
// writes and reads these names, so a checkpoint directory is self-contained.
const (
	// SnapMemory is the guest RAM image.
	SnapMemory = "memory.snap"
	// SnapState is the VMM's device and vCPU state.
	SnapState = "vmstate.snap"
	// SnapDisk is the root disk image of a snapshot whose disk is one
	// file (Firecracker's, and QEMU snapshots of format 1). Layered
	// snapshots hold their chain of disk images instead (see Layered).
	SnapDisk = "rootfs.ext4"
	// SnapMeta is the JSON metadata (SnapshotMeta).
	SnapMeta = "meta.json"
)

// Accel is a CPU acceleration mode.
type Accel string

// The acceleration modes.
const (
	AccelAuto Accel = "auto"
	AccelKVM  Accel = "kvm"
	AccelTCG  Accel = "tcg"
)

// NetSpec describes a VM's network interface on the host side.
type NetSpec struct {
	// Tap is the host TAP device name.
	Tap string `json:"tap"`
	// MAC is the guest MAC address.
	MAC string `json:"mac"`
}

// Spec is everything a backend needs to start one VM. Paths are absolute.
type Spec struct {
	// ID is the VM's unique id (also used in process names and socket paths).
	ID string `json:"id"`
	// Name is the user-visible VM name (used for logging only).
	Name string `json:"name"`
	// Dir is the VM's private directory; the backend may create files in it.
	Dir string `json:"dir"`
	// RunDir is a short directory for unix sockets (path length limit).
	RunDir string `json:"run_dir"`
	// VCPUs is the number of virtual CPUs.
	VCPUs int `json:"vcpus"`
	// MemoryMiB is the guest RAM size.
	MemoryMiB int `json:"memory_mib"`
	// Kernel is the kernel image (bzImage for QEMU, ELF vmlinux for Firecracker).
	Kernel string `json:"kernel"`
	// Initrd is the initramfs holding the agent.
	Initrd string `json:"initrd"`
	// Cmdline is extra kernel command line appended to the backend's own.
	Cmdline string `json:"cmdline,omitempty"`
	// Disk is the VM's own writable root disk image. Backends with layered
	// disks (see Layered) ignore it: they find the VM's chain of disk
	// images in Dir.
	Disk string `json:"disk"`
	// MemFile is the snapshot memory file the VM's RAM starts from (mapped
	// copy-on-write), for backends that are given one. Backends with
	// layered disks ignore it and find their memory file in Dir.
	MemFile string `json:"mem_file"`
	// Net is the network interface, or nil for no NIC.
	Net *NetSpec `json:"net,omitempty"`
	// Accel is the resolved acceleration mode (never auto).
	Accel Accel `json:"accel"`
	// SerialLog receives the guest's serial console.
	SerialLog string `json:"serial_log"`
	// Sandbox confines the VMM process (seccomp, uid, cgroup) when set.
	Sandbox *Sandbox `json:"sandbox,omitempty"`
}

// Sandbox describes how a VMM process is confined.
type Sandbox struct {
	// UID and GID to run the VMM as; 0 keeps root.
	UID int `json:"uid"`
	GID int `json:"gid"`
	// CgroupPath is the cgroup (relative to the hierarchy root) to place the VMM in.
	CgroupPath string `json:"cgroup_path,omitempty"`
	// Seccomp enables the VMM's own syscall filter.
	Seccomp bool `json:"seccomp"`
}

// SnapshotMeta is stored as meta.json in every snapshot directory.
type SnapshotMeta struct {
	// Backend is the VMM that wrote the snapshot ("qemu", "firecracker").
	Backend string `json:"backend"`
	// VMMVersion is the VMM's version string at snapshot time.
	VMMVersion string `json:"vmm_version"`
	// VCPUs and MemoryMiB are the spec the snapshot requires.
	VCPUs     int `json:"vcpus"`
	MemoryMiB int `json:"memory_mib"`
	// Accel is the acceleration mode the snapshot was taken under.
	Accel Accel `json:"accel"`
	// HasNet records whether the VM had a NIC (the device set must match).
	HasNet bool `json:"has_net"`
	// Kernel and Initrd fingerprints (sha256) of the boot files.
	KernelSHA256 string `json:"kernel_sha256,omitempty"`
	InitrdSHA256 string `json:"initrd_sha256,omitempty"`
	// CreatedAt is when the snapshot was taken.
	CreatedAt time.Time `json:"created_at"`
	// Format is the backend's snapshot format: 0 for the first one
	// (QEMU: RAM as a flat file loaded with x-ignore-shared, one disk
	// file), which backends keep restoring; 2 for QEMU's layered one (RAM
	// as a flat file split from a live migration, a chain of disk images).
	Format int `json:"format,omitempty"`
	// Files holds the size and content checksum of every file of the
	// snapshot but its metadata, recorded when the snapshot was written,
	// so that a damaged or truncated snapshot is refused before anything
	// is done with it. Snapshots written before noid recorded them have
	// none (and hold SnapshotFiles).
	Files map[string]FileSum `json:"files,omitempty"`
}

// FileSum is the size and content checksum of one snapshot file.
type FileSum struct {
	// Size is the file's size in bytes.
	Size int64 `json:"size"`
	// Sum is storage.Checksum's checksum of its content.
	Sum string `json:"sum"`
}

// SnapshotFiles are the files of a snapshot that records no Files: one
// written before noid recorded checksums.
var SnapshotFiles = []string{SnapMemory, SnapState, SnapDisk}

// Timings reports where time went during a checkpoint or restore.
type Timings struct {
	// Pause is how long the vCPUs were stopped (checkpoint).
	Pause time.Duration `json:"pause_ns"`
	// Spawn is the time to start the VMM process (restore).
	Spawn time.Duration `json:"spawn_ns"`
	// Load is the time to load state and resume (restore).
	Load time.Duration `json:"load_ns"`
	// Copy is time spent copying memory and disk files.
	Copy time.Duration `json:"copy_ns"`
	// Total is the whole operation.
	Total time.Duration `json:"total_ns"`
}

// Copier copies a file into a new file, with reflink where possible and a
// sparse-aware copy otherwise. storage.Copier implements it.
type Copier interface {
	CopyFile(ctx context.Context, src, dst string) error
}

// FlushFirster is implemented by Copiers whose copies are cheaper when the
// source's dirty pages are already on disk (reflinks): backends then write
// the RAM file back before pausing the vCPUs, not during the pause.
type FlushFirster interface {
	FlushFirst() bool
}

// Backend is a VMM implementation. It is safe for concurrent use.
type Backend interface {
	// Name returns the backend's short name ("qemu", "firecracker").
	Name() string
	// Version returns the VMM binary's version string, for snapshot fingerprints.
	Version(ctx context.Context) (string, error)
	// Check verifies that the backend can run here and explains what to
	// install or configure when it cannot.
	Check(ctx context.Context) error
	// Boot cold-boots a VM described by spec. The process outlives the server.
	Boot(ctx context.Context, spec Spec) (Instance, error)
	// Restore starts a VM from the snapshot in dir. The backend copies the
	// snapshot's memory and disk into spec.MemFile and spec.Disk with cp
	// (or maps them copy-on-write), loads the state and resumes the vCPUs.
	Restore(ctx context.Context, spec Spec, dir string, cp Copier) (Instance, Timings, error)
	// Adopt reattaches to a VMM process started by an earlier server.
	// It returns ErrGone when the process no longer exists.
	Adopt(ctx context.Context, spec Spec, pid int) (Instance, error)
}

// Instance is one running VMM process.
type Instance interface {
	// Pid returns the VMM's process id.
	Pid() int
	// Done is closed when the VMM process has exited.
	Done() <-chan struct{}
	// DialAgent opens a byte stream to the guest agent's port.
	DialAgent(ctx context.Context) (net.Conn, error)
	// Checkpoint pauses the vCPUs, writes the state and copies memory and disk
	// into dir (which exists and is empty) with cp, writes SnapMeta, and always
	// resumes the vCPUs, even on error.
	Checkpoint(ctx context.Context, dir string, cp Copier) (Timings, error)
	// Pause stops the vCPUs.
	Pause(ctx context.Context) error
	// Resume restarts the vCPUs.
	Resume(ctx context.Context) error
	// Kill stops the VMM process and waits until it is gone.
	Kill(ctx context.Context) error
	// Close releases host-side handles without stopping the VMM.
	Close() error
}

// SpaceWaiter is implemented by instances whose VMM pauses the guest when a
// write of its disk meets a full host filesystem, and resumes it once
// there is space again (QEMU: the guest sees no error).
type SpaceWaiter interface {
	// WaitingForSpace reports whether the guest is paused for that now.
	WaitingForSpace() bool
}

// Layered is implemented by backends whose VMs run on a chain of disk
// images kept in the VM's directory: a raw base at the bottom, the frozen
// overlays of its checkpoints above it (never written again, and shared as
// hard links with the checkpoints and golden snapshots made from them) and
// a writable overlay on top. A checkpoint freezes the top and the VM goes
// on in a new one, so no disk data is copied; a restore adds an empty top
// over the snapshot's chain.
type Layered interface {
	// NewDisk lays out the disk of a VM that boots from the raw image
	// base in dir: base itself at the bottom (a hard link when dir is on
	// base's filesystem, a copy otherwise) under an empty writable top.
	// With size larger than base, the bottom is a private copy grown to
	// size, its ext4 filesystem with it.
	NewDisk(ctx context.Context, dir, base string, size int64, cp Copier) error
	// DiskSize is the size of the disk the VM in dir sees.
	DiskSize(dir string) (int64, error)
	// DiskLayers lists the files of the disk chain in dir (a VM's or a
	// snapshot's), bottom first: what a checkpoint of the VM links.
	DiskLayers(dir string) ([]string, error)
}

// Preparer is implemented by backends that can start a VMM for a snapshot
// before the VM is asked for: a warm spare that a later Load turns into a
// running VM, so that the process start and the preparation of its files
// are off the critical path of a create, clone or rewind.
type Preparer interface {
	// Prepare lays out the files of a VM restored from the snapshot in
	// dir in spec.Dir (its disk over the snapshot's and its memory) and
	// starts a VMM for spec that waits for the snapshot's device state.
	Prepare(ctx context.Context, spec Spec, dir string, cp Copier) (Prepared, error)
}

// Prepared is a VMM started by Prepare and waiting for its state.
type Prepared interface {
	Instance
	// Load streams the device state of the snapshot the VMM was prepared
	// for into it and resumes the vCPUs.
	Load(ctx context.Context) (Timings, error)
	// LoadPaused is Load without the resume: the VM has its state and
	// waits, vCPUs stopped, for Resume. A rewind loads the spare this way
	// before it stops the VM it replaces, so a snapshot that does not
	// load leaves that VM running.
	LoadPaused(ctx context.Context) (Timings, error)
	// Moved tells the instance that its files now live at spec's paths (a
	// spare's directory was renamed to the VM's); the VMM itself holds
	// open files and does not notice.
	Moved(spec Spec)
}

// ErrGone is returned by Adopt when the VMM process no longer exists.
var ErrGone = errors.New("vmm process is gone")
