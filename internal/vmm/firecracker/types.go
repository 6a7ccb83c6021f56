package firecracker

// Request and response bodies of the Firecracker API, written by hand from
// the v1.16.1 swagger definitions (the names in comments are the
// definitions'). Optional fields use omitempty, so a zero value is never sent
// where Firecracker would read it as a setting. Firecracker rejects unknown
// fields, so only fields that exist in the supported versions appear here;
// the contract test checks every body against the schema.

// MachineConfig is the body of PUT /machine-config (MachineConfiguration).
type MachineConfig struct {
	// VCPUCount is the number of vCPUs, 1 to 32 (1 or even with SMT).
	VCPUCount int `json:"vcpu_count"`
	// MemSizeMiB is the guest RAM size.
	MemSizeMiB int `json:"mem_size_mib"`
	// SMT enables simultaneous multithreading (x86 only).
	SMT bool `json:"smt,omitempty"`
	// TrackDirtyPages enables KVM dirty page tracking, needed for Diff
	// snapshots.
	TrackDirtyPages bool `json:"track_dirty_pages,omitempty"`
	// HugePages is "None" (default) or "2M".
	HugePages string `json:"huge_pages,omitempty"`
}

// BootSource is the body of PUT /boot-source (BootSource).
type BootSource struct {
	// KernelImagePath is the uncompressed ELF vmlinux (x86_64).
	KernelImagePath string `json:"kernel_image_path"`
	// BootArgs is the kernel command line.
	BootArgs string `json:"boot_args,omitempty"`
	// InitrdPath is the initramfs.
	InitrdPath string `json:"initrd_path,omitempty"`
}

// Drive is the body of PUT /drives/{drive_id} (Drive), for a virtio-block
// device backed by a file.
type Drive struct {
	// DriveID names the drive; it is also the last path element.
	DriveID string `json:"drive_id"`
	// PathOnHost is the backing file, as the Firecracker process sees it.
	PathOnHost string `json:"path_on_host"`
	// IsRootDevice makes Firecracker add root=/dev/vdX to the command line.
	IsRootDevice bool `json:"is_root_device"`
	// IsReadOnly opens the file read-only.
	IsReadOnly bool `json:"is_read_only"`
	// PartUUID is the root partition's UUID (root device only).
	PartUUID string `json:"partuuid,omitempty"`
	// CacheType is "Unsafe" (default: flushes are ignored) or "Writeback".
	CacheType string `json:"cache_type,omitempty"`
	// IOEngine is "Sync" (default) or "Async" (io_uring).
	IOEngine string `json:"io_engine,omitempty"`
	// RateLimiter limits the drive's bandwidth and operations.
	RateLimiter *RateLimiter `json:"rate_limiter,omitempty"`
}

// NetworkInterface is the body of PUT /network-interfaces/{iface_id}
// (NetworkInterface).
type NetworkInterface struct {
	// IfaceID names the interface; it is also the last path element.
	IfaceID string `json:"iface_id"`
	// HostDevName is the host TAP device.
	HostDevName string `json:"host_dev_name"`
	// GuestMAC is the guest's MAC address.
	GuestMAC string `json:"guest_mac,omitempty"`
	// MTU is advertised to the guest when set (68 to 65535).
	MTU int `json:"mtu,omitempty"`
	// RxRateLimiter and TxRateLimiter limit traffic.
	RxRateLimiter *RateLimiter `json:"rx_rate_limiter,omitempty"`
	TxRateLimiter *RateLimiter `json:"tx_rate_limiter,omitempty"`
}

// Vsock is the body of PUT /vsock (Vsock).
type Vsock struct {
	// GuestCID is the guest's context id (≥ 3).
	GuestCID uint32 `json:"guest_cid"`
	// UDSPath is the unix socket Firecracker listens on for host-initiated
	// connections (see DialVsock).
	UDSPath string `json:"uds_path"`
}

// EntropyDevice is the body of PUT /entropy (EntropyDevice): a virtio-rng
// device fed from the host.
type EntropyDevice struct {
	// RateLimiter limits the bytes the guest may draw.
	RateLimiter *RateLimiter `json:"rate_limiter,omitempty"`
}

// RateLimiter is a pair of token buckets (RateLimiter).
type RateLimiter struct {
	// Bandwidth counts bytes; Ops counts operations.
	Bandwidth *TokenBucket `json:"bandwidth,omitempty"`
	Ops       *TokenBucket `json:"ops,omitempty"`
}

// TokenBucket is one bucket of a RateLimiter (TokenBucket).
type TokenBucket struct {
	// Size is the bucket's capacity in tokens.
	Size int64 `json:"size"`
	// OneTimeBurst is an initial extra budget.
	OneTimeBurst int64 `json:"one_time_burst,omitempty"`
	// RefillTime is the milliseconds the bucket takes to refill.
	RefillTime int64 `json:"refill_time"`
}

// Logger is the body of PUT /logger (Logger).
type Logger struct {
	// LogPath is the file or named pipe for the log (noid creates it first).
	LogPath string `json:"log_path,omitempty"`
	// Level is Error, Warning, Info (default), Debug, Trace or Off.
	Level string `json:"level,omitempty"`
	// ShowLevel and ShowLogOrigin add the level and the source location.
	ShowLevel     bool `json:"show_level,omitempty"`
	ShowLogOrigin bool `json:"show_log_origin,omitempty"`
	// Module filters messages by module path.
	Module string `json:"module,omitempty"`
}

// Action types for PUT /actions.
const (
	ActionInstanceStart  = "InstanceStart"
	ActionSendCtrlAltDel = "SendCtrlAltDel"
	ActionFlushMetrics   = "FlushMetrics"
)

// InstanceActionInfo is the body of PUT /actions (InstanceActionInfo).
type InstanceActionInfo struct {
	// ActionType is one of the Action constants.
	ActionType string `json:"action_type"`
}

// VM states for PATCH /vm.
const (
	VMStatePaused  = "Paused"
	VMStateResumed = "Resumed"
)

// VM is the body of PATCH /vm (Vm).
type VM struct {
	// State is VMStatePaused or VMStateResumed.
	State string `json:"state"`
}

// Snapshot types for PUT /snapshot/create.
const (
	SnapshotFull = "Full"
	SnapshotDiff = "Diff"
)

// SnapshotCreateParams is the body of PUT /snapshot/create
// (SnapshotCreateParams).
type SnapshotCreateParams struct {
	// SnapshotType is SnapshotFull (default) or SnapshotDiff.
	SnapshotType string `json:"snapshot_type,omitempty"`
	// SnapshotPath receives the device and vCPU state.
	SnapshotPath string `json:"snapshot_path"`
	// MemFilePath receives guest memory: all of it for Full, only the pages
	// dirtied since the last snapshot (at their offsets, holes elsewhere) for
	// Diff. Firecracker truncates an existing file.
	MemFilePath string `json:"mem_file_path"`
}

// Memory backend types for PUT /snapshot/load.
const (
	// MemBackendFile maps the memory file MAP_PRIVATE: pages load lazily and
	// clean pages are shared by every VM restored from the same file.
	MemBackendFile = "File"
	// MemBackendUffd hands page faults to a userfaultfd handler process.
	MemBackendUffd = "Uffd"
)

// MemoryBackend is the mem_backend of SnapshotLoadParams (MemoryBackend).
type MemoryBackend struct {
	// BackendType is MemBackendFile or MemBackendUffd.
	BackendType string `json:"backend_type"`
	// BackendPath is the memory file (File) or the handler's socket (Uffd).
	BackendPath string `json:"backend_path"`
}

// NetworkOverride points a restored interface at another TAP
// (NetworkOverride).
type NetworkOverride struct {
	// IfaceID is the interface as named in the snapshot.
	IfaceID string `json:"iface_id"`
	// HostDevName is the TAP to use instead.
	HostDevName string `json:"host_dev_name"`
}

// VsockOverride points a restored vsock device at another unix socket
// (VsockOverride; Firecracker ≥ 1.16).
type VsockOverride struct {
	// UDSPath is the new socket path.
	UDSPath string `json:"uds_path"`
}

// SnapshotLoadParams is the body of PUT /snapshot/load (SnapshotLoadParams).
// noid always uses MemBackend, never the deprecated mem_file_path.
type SnapshotLoadParams struct {
	// SnapshotPath is the state file written by snapshot/create.
	SnapshotPath string `json:"snapshot_path"`
	// MemBackend says where guest memory comes from.
	MemBackend *MemoryBackend `json:"mem_backend,omitempty"`
	// TrackDirtyPages enables dirty page tracking (for Diff snapshots).
	TrackDirtyPages bool `json:"track_dirty_pages,omitempty"`
	// ResumeVM resumes the vCPUs once loaded; otherwise the VM is Paused.
	ResumeVM bool `json:"resume_vm,omitempty"`
	// NetworkOverrides switch interfaces to other TAP devices.
	NetworkOverrides []NetworkOverride `json:"network_overrides,omitempty"`
	// VsockOverride switches the vsock device to another unix socket.
	VsockOverride *VsockOverride `json:"vsock_override,omitempty"`
	// ClockRealtime advances kvmclock by the wall time since the snapshot
	// (x86_64).
	ClockRealtime bool `json:"clock_realtime,omitempty"`
}

// Instance states reported by GET /.
const (
	InstanceNotStarted = "Not started"
	InstanceRunning    = "Running"
	InstancePaused     = "Paused"
)

// InstanceInfo is the answer of GET / (InstanceInfo).
type InstanceInfo struct {
	// AppName is "Firecracker".
	AppName string `json:"app_name"`
	// ID is the instance id given with --id.
	ID string `json:"id"`
	// State is InstanceNotStarted, InstanceRunning or InstancePaused.
	State string `json:"state"`
	// VMMVersion is the Firecracker version.
	VMMVersion string `json:"vmm_version"`
}

// FirecrackerVersion is the answer of GET /version (FirecrackerVersion).
type FirecrackerVersion struct {
	// FirecrackerVersion is the version, such as "1.16.1".
	FirecrackerVersion string `json:"firecracker_version"`
}

// apiError is Firecracker's error body (Error).
type apiError struct {
	FaultMessage string `json:"fault_message"`
}
