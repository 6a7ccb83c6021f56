// Package api defines noid's REST and WebSocket wire types: request and
// response bodies, the JSON error envelope and the exec stream messages. Both
// the server and the public client package use these types, so the JSON field
// names here are the stable API.
package api

import (
	"time"
)

// Version is the API version string served at /version; the major number
// changes only with incompatible changes.
const Version = "1.0"

// ErrorBody is the envelope of every error response:
// {"error": {"code": "...", "message": "...", "hint": "...", "request_id": "..."}}.
type ErrorBody struct {
	Error ErrorDetail `json:"error"`
}

// ErrorDetail describes one error.
type ErrorDetail struct {
	Code      string `json:"code"`
	Message   string `json:"message"`
	Hint      string `json:"hint,omitempty"`
	RequestID string `json:"request_id,omitempty"`
}

// VersionInfo is served at /version without authentication.
type VersionInfo struct {
	Server     string `json:"server"`
	API        string `json:"api"`
	GoVersion  string `json:"go_version"`
	VMM        string `json:"vmm"`
	VMMVersion string `json:"vmm_version,omitempty"`
	Accel      string `json:"accel"`
}

// WhoAmI tells a caller who the server thinks they are.
type WhoAmI struct {
	User    string `json:"user"`
	Admin   bool   `json:"admin"`
	Via     string `json:"via"` // "unix" or "token"
	Server  string `json:"server"`
	Version string `json:"version"`
}

// CreateVMRequest is the body of POST /v1/vms.
type CreateVMRequest struct {
	Name      string `json:"name"`
	VCPUs     int    `json:"vcpus,omitempty"`
	MemoryMiB int    `json:"memory_mib,omitempty"`
	// DiskSize is a size like "4G"; empty keeps the image's size.
	DiskSize string `json:"disk_size,omitempty"`
	// Network is "default" (or empty) for a NIC, "none" for no NIC.
	Network string `json:"network,omitempty"`
	// AllowPeers lets this VM talk to the same user's VMs that also allow it.
	AllowPeers bool `json:"allow_peers,omitempty"`
	// NoWait returns as soon as the VMM runs, before the agent answers.
	NoWait bool `json:"no_wait,omitempty"`
	// ColdBoot skips golden snapshots.
	ColdBoot bool `json:"cold_boot,omitempty"`
}

// VM is a VM as reported by list and info. Field names are stable.
type VM struct {
	Name        string    `json:"name"`
	ID          string    `json:"id"`
	State       string    `json:"state"`
	StateReason string    `json:"state_reason,omitempty"`
	PID         int       `json:"pid"`
	VCPUs       int       `json:"vcpus"`
	MemoryMiB   int       `json:"memory_mib"`
	DiskBytes   int64     `json:"disk_bytes"`
	CreatedAt   time.Time `json:"created_at"`
	StartedAt   time.Time `json:"started_at,omitempty"`
	IP          string    `json:"ip"`
	MAC         string    `json:"mac,omitempty"`
	// Tap is the VM's host network interface, when it has a NIC.
	Tap     string `json:"tap,omitempty"`
	Network string `json:"network"`
	// RuntimeID names the VM's current VMM process (noid-<runtime_id> in
	// ps, and its cgroup). It equals ID until a rewind moves the VM to a
	// VMM prepared ahead of time.
	RuntimeID string `json:"runtime_id"`
	VMM       string `json:"vmm"`
	Accel     string `json:"accel"`
	// BootPath is cold, golden, restore or clone.
	BootPath string `json:"boot_path"`
	// BootReason explains the boot path (for example why golden was not used).
	BootReason string `json:"boot_reason,omitempty"`
	// UptimeSeconds counts from the last start or restore.
	UptimeSeconds float64 `json:"uptime_seconds"`
	Source        string  `json:"source,omitempty"`
	Owner         string  `json:"owner,omitempty"`
	Checkpoints   int     `json:"checkpoints"`
	// Warnings are one-line notices for the user about the operation that
	// returned this VM (for example a stale golden snapshot).
	Warnings []string `json:"warnings,omitempty"`
	// Timings of the operation that returned this VM, when it was a create or restore.
	Timings *Timings `json:"timings,omitempty"`
	// Pulled says what a clone from the remote store fetched.
	Pulled *RemoteTransfer `json:"pulled,omitempty"`
}

// Timings reports where an operation spent its time, in milliseconds.
type Timings struct {
	TotalMs float64 `json:"total_ms"`
	PauseMs float64 `json:"pause_ms,omitempty"`
	CopyMs  float64 `json:"copy_ms,omitempty"`
	SpawnMs float64 `json:"spawn_ms,omitempty"`
	LoadMs  float64 `json:"load_ms,omitempty"`
	AgentMs float64 `json:"agent_ms,omitempty"`
	NetMs   float64 `json:"net_ms,omitempty"`
	// WarmSpare is set when the operation took a VMM prepared ahead of
	// time, so no process was started on its path.
	WarmSpare bool `json:"warm_spare,omitempty"`
}

// DestroyResult reports what a destroy removed.
type DestroyResult struct {
	Name        string `json:"name"`
	Checkpoints int    `json:"checkpoints_removed"`
}

// CheckpointRequest is the body of POST /v1/vms/{name}/checkpoints.
type CheckpointRequest struct {
	Name  string `json:"name,omitempty"`
	Label string `json:"label,omitempty"`
}

// Checkpoint describes one checkpoint. Field names are stable.
type Checkpoint struct {
	ID        string    `json:"id"`
	Name      string    `json:"name"`
	Label     string    `json:"label,omitempty"`
	VM        string    `json:"vm"`
	CreatedAt time.Time `json:"created_at"`
	SizeBytes int64     `json:"size_bytes"`
	VCPUs     int       `json:"vcpus"`
	MemoryMiB int       `json:"memory_mib"`
	Backend   string    `json:"backend"`
	PauseMs   float64   `json:"pause_ms"`
	Timings   *Timings  `json:"timings,omitempty"`
}

// RestoreRequest is the body of POST /v1/vms/{name}/restore.
type RestoreRequest struct {
	Checkpoint string `json:"checkpoint"`
	// As clones into a new VM with this name instead of rewinding in place.
	As string `json:"as,omitempty"`
}

// Golden describes one golden snapshot.
type Golden struct {
	VCPUs      int       `json:"vcpus"`
	MemoryMiB  int       `json:"memory_mib"`
	CreatedAt  time.Time `json:"created_at"`
	SizeBytes  int64     `json:"size_bytes"`
	Backend    string    `json:"backend"`
	Stale      bool      `json:"stale"`
	StaleWhy   string    `json:"stale_reason,omitempty"`
	Source     string    `json:"source,omitempty"`
	Owner      string    `json:"owner,omitempty"`
	KernelHash string    `json:"kernel_sha256,omitempty"`
	// Spares is the number of VMMs prepared from it and waiting (warm pool).
	Spares int `json:"spares"`
	// Remote names the remote golden it was pulled from, if it was.
	Remote string `json:"remote,omitempty"`
	// Pulled says what the pull that returned it fetched.
	Pulled *RemoteTransfer `json:"pulled,omitempty"`
}

// GoldenPromoteRequest is the body of POST /v1/golden.
type GoldenPromoteRequest struct {
	VM         string `json:"vm"`
	Checkpoint string `json:"checkpoint"`
}

// ExecRequest starts a process in a VM. It is the first message on the exec
// WebSocket.
type ExecRequest struct {
	Argv      []string          `json:"argv"`
	Env       map[string]string `json:"env,omitempty"`
	Cwd       string            `json:"cwd,omitempty"`
	TTY       bool              `json:"tty,omitempty"`
	Rows      int               `json:"rows,omitempty"`
	Cols      int               `json:"cols,omitempty"`
	TimeoutMs int64             `json:"timeout_ms,omitempty"`
	// Stdin says the client will send input; without it stdin is empty.
	Stdin bool `json:"stdin,omitempty"`
	// User is the guest user to run as (a name or uid from the guest's
	// /etc/passwd); empty means the server's [exec] default_user, root
	// unless configured.
	User string `json:"user,omitempty"`
}

// Exec stream channels: the first byte of every binary WebSocket message.
const (
	ChanStdin  byte = 0
	ChanStdout byte = 1
	ChanStderr byte = 2
)

// StreamMsg is a text (JSON) message on the exec WebSocket.
//
// Client to server: {"type":"stdin_eof"}, {"type":"signal","signal":2},
// {"type":"resize","rows":R,"cols":C}.
// Server to client: {"type":"started"}, {"type":"exit","code":N,...},
// {"type":"error","error":{...}}.
type StreamMsg struct {
	Type     string       `json:"type"`
	Signal   int          `json:"signal,omitempty"`
	Rows     int          `json:"rows,omitempty"`
	Cols     int          `json:"cols,omitempty"`
	Code     int          `json:"code"`
	ExitSig  int          `json:"exit_signal,omitempty"`
	TimedOut bool         `json:"timed_out,omitempty"`
	Error    *ErrorDetail `json:"error,omitempty"`
	// Reason, on an exit whose command never ran, says why: ExitNotFound
	// (code 127) or ExitNotExecutable (code 126).
	Reason string `json:"reason,omitempty"`
	// Message, with Reason, is a one-line description for the user, such
	// as "nosuchcmd: command not found".
	Message string `json:"message,omitempty"`
}

// Exit reasons (StreamMsg.Reason) of a command that could not be run, with
// the exit codes a shell gives them.
const (
	// ExitNotFound: the command does not exist (exit code 127).
	ExitNotFound = "command_not_found"
	// ExitNotExecutable: the command exists but cannot be executed:
	// permission denied, a directory, an unknown format (exit code 126).
	ExitNotExecutable = "command_not_executable"
)

// Stream message types.
const (
	MsgStarted  = "started"
	MsgExit     = "exit"
	MsgError    = "error"
	MsgStdinEOF = "stdin_eof"
	MsgSignal   = "signal"
	MsgResize   = "resize"
)
