package api

// Capabilities is GET /v1/capabilities: the server's defaults for a new
// VM, the limits a request must keep to, the caller's quota and usage,
// and the features the server has. The fields named as the Rust noid's
// (api_version, default_cpus, default_mem_mib, max_vm_name_length,
// exec_timeout_secs, console_timeout_secs, max_exec_output_bytes) keep
// that server's names for its clients and scripts.
type Capabilities struct {
	// Server is noid-server's version; API is the API version ("1.0").
	Server string `json:"server"`
	API    string `json:"api"`
	// VMM is the backend (qemu or firecracker) and Accel its acceleration
	// (kvm or tcg).
	VMM   string `json:"vmm"`
	Accel string `json:"accel"`
	// Defaults are what a create that names nothing gets.
	Defaults CapabilityDefaults `json:"defaults"`
	// Limits are the bounds of one request, the same for every user.
	Limits CapabilityLimits `json:"limits"`
	// Quota is the caller's own quota and what they use of it.
	Quota CapabilityQuota `json:"quota"`
	// Features names what this server does, one word each (see
	// the Feature* constants); a client checks for a name before it
	// relies on it.
	Features []string `json:"features"`

	// APIVersion is the API major version as a number (the Rust noid's).
	APIVersion int `json:"api_version"`
	// DefaultCPUs and DefaultMemMiB repeat Defaults (the Rust noid's names).
	DefaultCPUs   int `json:"default_cpus"`
	DefaultMemMiB int `json:"default_mem_mib"`
	// MaxVMNameLength repeats Limits.MaxNameLength (the Rust noid's name).
	MaxVMNameLength int `json:"max_vm_name_length"`
	// ExecTimeoutSecs, ConsoleTimeoutSecs and MaxExecOutputBytes are 0:
	// this server puts no cap on a command's run time, a console's
	// length or an exec's output (it is streamed); a command can have a
	// timeout of its own (ExecRequest.TimeoutMs).
	ExecTimeoutSecs    int   `json:"exec_timeout_secs"`
	ConsoleTimeoutSecs int   `json:"console_timeout_secs"`
	MaxExecOutputBytes int64 `json:"max_exec_output_bytes"`
}

// CapabilityDefaults are the server's defaults for a new VM.
type CapabilityDefaults struct {
	VCPUs     int `json:"vcpus"`
	MemoryMiB int `json:"memory_mib"`
	// DiskSize is default_disk_size; empty keeps the image's size.
	DiskSize string `json:"disk_size,omitempty"`
	// Network is "default" (a NIC) or "none" (networking is off).
	Network string `json:"network"`
	// ExecUser is the guest user exec and console run as; empty is root.
	ExecUser string `json:"exec_user,omitempty"`
}

// CapabilityLimits are the bounds of one request.
type CapabilityLimits struct {
	// MaxVCPUs and MaxMemoryMiB bound one VM (this host's CPUs and RAM);
	// MinMemoryMiB is the least memory a VM may have.
	MaxVCPUs     int `json:"max_vcpus"`
	MinMemoryMiB int `json:"min_memory_mib"`
	MaxMemoryMiB int `json:"max_memory_mib"`
	// MaxNameLength bounds VM and checkpoint names.
	MaxNameLength int `json:"max_name_length"`
	// SessionsPerUser bounds the exec and console sessions a user has
	// open at once.
	SessionsPerUser int `json:"sessions_per_user"`
	// SerialLogBytes bounds each VM's console log.
	SerialLogBytes int64 `json:"serial_log_bytes"`
}

// CapabilityQuota is the caller's quota (0: unlimited) and usage.
type CapabilityQuota struct {
	MaxVMs             int64 `json:"max_vms"`
	MaxVCPUs           int64 `json:"max_vcpus"`
	MaxMemoryMiB       int64 `json:"max_memory_mib"`
	MaxCheckpointBytes int64 `json:"max_checkpoint_bytes"`
	// MaxDiskBytes bounds the root disk of one VM.
	MaxDiskBytes int64 `json:"max_disk_bytes"`
	// Used is what the caller's VMs and checkpoints take now.
	Used QuotaUsage `json:"used"`
}

// QuotaUsage is what a user's VMs and checkpoints take.
type QuotaUsage struct {
	VMs             int   `json:"vms"`
	VCPUs           int   `json:"vcpus"`
	MemoryMiB       int   `json:"memory_mib"`
	CheckpointBytes int64 `json:"checkpoint_bytes"`
}

// The names in Capabilities.Features.
const (
	// FeatureCheckpoint: checkpoints of a running VM, rewind and clone
	// (restore --as).
	FeatureCheckpoint = "checkpoint"
	// FeatureGolden: golden snapshots that new VMs start from.
	FeatureGolden = "golden"
	// FeatureFiles: file copies in and out of a VM (noid cp).
	FeatureFiles = "files"
	// FeatureExecUser: exec and console as a user of the guest.
	FeatureExecUser = "exec_user"
	// FeatureConsoleEnv: a console gets the request's environment
	// (noid exec VM -e K=V with no command).
	FeatureConsoleEnv = "console_env"
	// FeatureNetwork: VMs get a NIC, an address and DNS.
	FeatureNetwork = "network"
	// FeatureUsers: users, tokens and quotas managed over the API.
	FeatureUsers = "users"
	// FeatureMetrics: Prometheus metrics at /metrics.
	FeatureMetrics = "metrics"
	// FeatureRemote: a remote object store ([remote]) to push checkpoints
	// and goldens to and clone or pull them from.
	FeatureRemote = "remote"
)
