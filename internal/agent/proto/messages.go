package proto

import (
	"encoding/json"
	"fmt"
)

// Hello opens a host connection. ID is a fresh random id for every new
// connection; the agent drops all state of the previous connection when it
// sees a HELLO with a different id.
type Hello struct {
	// ID identifies this host connection (random, hex).
	ID string `json:"id"`
	// Version is the host's protocol version.
	Version int `json:"version"`
}

// HelloAck answers a Hello. The host ignores acks whose ID is not its own.
type HelloAck struct {
	// ID echoes Hello.ID.
	ID string `json:"id"`
	// Version is the agent's protocol version.
	Version int `json:"version"`
	// AgentVersion is the agent's build version string.
	AgentVersion string `json:"agent_version,omitempty"`
	// BootID is the guest kernel's boot id (identical in clones of one boot).
	BootID string `json:"boot_id,omitempty"`
	// PID is the agent's process id (1 when it runs as init).
	PID int `json:"pid"`
	// Features lists what the agent supports beyond the first release of
	// protocol version 1 (the Feature* constants). A host must not send a
	// request that needs a feature the agent does not list: older agents
	// ignore fields they do not know.
	Features []string `json:"features,omitempty"`
}

// Optional features an agent announces in HelloAck.Features.
const (
	// FeatureExecUser: the agent honours ExecRequest.User and reports
	// Exit.Reason for failed starts.
	FeatureExecUser = "exec_user"
)

// FeatureStreamList: the agent answers a ping with PingResult, the
// streams of the connection it knows, so that a host can fail requests
// whose OPEN never reached it.
const FeatureStreamList = "stream_list"

// Features are the features this package's agent implements.
var Features = []string{FeatureExecUser, FeatureStreamList}

// PingResult is the result of a ping (feature stream_list): the ids of the
// streams of this connection the agent has open, listed when it answers.
type PingResult struct {
	Streams []uint32 `json:"streams"`
}

// Stream kinds carried in Open.Kind.
const (
	KindExec    = "exec"
	KindConsole = "console"
	KindSync    = "sync"
	KindInfo    = "info"
	KindPing    = "ping"
	KindPut     = "put"
	KindGet     = "get"
)

// Open is the payload of an OPEN frame: the stream's kind and its request.
// Exactly the field that matches Kind is set.
type Open struct {
	// Kind is one of the Kind* constants.
	Kind string `json:"kind"`
	// Exec is the request for KindExec and KindConsole.
	Exec *ExecRequest `json:"exec,omitempty"`
	// Sync is the request for KindSync.
	Sync *Sync `json:"sync,omitempty"`
	// Put is the request for KindPut.
	Put *PutRequest `json:"put,omitempty"`
	// Get is the request for KindGet.
	Get *GetRequest `json:"get,omitempty"`
}

// ExecRequest asks the agent to run a process.
type ExecRequest struct {
	// Argv is the program and its arguments. Argv[0] is looked up in the
	// PATH of the resulting environment unless it contains a slash.
	// Ignored for KindConsole, which runs a login shell.
	Argv []string `json:"argv"`
	// Env holds KEY=VALUE entries added to (and overriding) the agent's
	// default environment (PATH, HOME, TERM, LANG).
	Env []string `json:"env,omitempty"`
	// Cwd is the working directory; empty means HOME (/root).
	Cwd string `json:"cwd,omitempty"`
	// TTY runs the process on a new pseudo-terminal. Output then arrives on
	// stdout only.
	TTY bool `json:"tty,omitempty"`
	// Rows is the initial terminal height when TTY is set (default 24).
	Rows uint16 `json:"rows,omitempty"`
	// Cols is the initial terminal width when TTY is set (default 80).
	Cols uint16 `json:"cols,omitempty"`
	// TimeoutMS, when positive, kills the process group with SIGKILL after
	// that many milliseconds; the exit code is then 124.
	TimeoutMS int64 `json:"timeout_ms,omitempty"`
	// Stdin says the host will send standard input. Without it the process
	// reads /dev/null (or, with TTY, a terminal nobody types on).
	Stdin bool `json:"stdin,omitempty"`
	// User is the guest user to run as: a name or a numeric uid found in the
	// guest's /etc/passwd. The process then gets that user's uid, primary
	// gid and supplementary groups (from /etc/group), HOME, USER and LOGNAME,
	// and starts in HOME. Empty means root, with HOME=/root.
	User string `json:"user,omitempty"`
}

// Control is the payload of a CONTROL frame on an exec stream.
type Control struct {
	// Signal, when non-zero, is sent to the process group.
	Signal int `json:"signal,omitempty"`
	// Rows is the new terminal height; with Cols, both non-zero, it
	// resizes the terminal.
	Rows uint16 `json:"rows,omitempty"`
	// Cols is the new terminal width.
	Cols uint16 `json:"cols,omitempty"`
}

// Exit is the payload of an EXIT frame, the last frame of every stream.
type Exit struct {
	// Code is the exit status. A process killed by a signal reports
	// 128+signal; a timed-out process reports 124; -1 means the request
	// failed before or instead of running (see Error).
	Code int `json:"code"`
	// Signal is the signal that killed the process, or 0.
	Signal int `json:"signal,omitempty"`
	// TimedOut says the process was killed because of TimeoutMS.
	TimedOut bool `json:"timed_out,omitempty"`
	// Error describes a failure of the request itself (cannot start, bad
	// path, ...). It is empty on success and for processes that ran.
	Error string `json:"error,omitempty"`
	// Reason classifies an exec or console that could not start (Code -1):
	// one of the Reason* constants, or empty for any other failure. Agents
	// older than the field leave it empty.
	Reason string `json:"reason,omitempty"`
	// Result carries the reply of unary kinds (SyncResult, Info, PutResult).
	Result json.RawMessage `json:"result,omitempty"`
}

// Why an exec could not start (Exit.Reason).
const (
	// ReasonNotFound: the program does not exist (not in PATH, or no such
	// file). A shell would exit 127.
	ReasonNotFound = "not_found"
	// ReasonNotExecutable: the program exists but cannot be executed
	// (permission denied, a directory, an unknown binary format, a missing
	// interpreter). A shell would exit 126.
	ReasonNotExecutable = "not_executable"
	// ReasonBadCwd: the working directory does not exist, is not a
	// directory or cannot be entered by the user.
	ReasonBadCwd = "bad_cwd"
	// ReasonUnknownUser: ExecRequest.User is not in the guest's /etc/passwd.
	ReasonUnknownUser = "unknown_user"
)

// Reset is the payload of a RESET frame. On stream 0, sent by the agent, it
// means the agent lost the connection's framing and dropped the connection:
// the host must reconnect with a new HELLO.
type Reset struct {
	// Error says why the stream (or connection) was aborted.
	Error string `json:"error"`
}

// Sync is the post-boot / post-restore request: set the clock, reseed the
// kernel RNG and apply a (new) network identity.
type Sync struct {
	// TimeUnixNano is the host's CLOCK_REALTIME; 0 leaves the clock alone.
	TimeUnixNano int64 `json:"time_unix_nano,omitempty"`
	// Entropy is random bytes from the host (at least 32 to be useful),
	// mixed into the guest kernel's pool, followed by a CRNG reseed, so
	// clones of one snapshot never share RNG state. Base64 in JSON.
	Entropy []byte `json:"entropy,omitempty"`
	// Identity, when set, is the network identity the guest should have.
	Identity *Identity `json:"identity,omitempty"`
}

// Identity is a guest's network identity. Empty fields are left alone.
type Identity struct {
	// Hostname is set as kernel hostname, in /etc/hostname and /etc/hosts.
	Hostname string `json:"hostname,omitempty"`
	// MAC is eth0's hardware address, "02:00:00:00:00:01".
	MAC string `json:"mac,omitempty"`
	// IPv4 is eth0's address with prefix length, "172.16.0.5/24".
	IPv4 string `json:"ipv4,omitempty"`
	// Gateway is the IPv4 default gateway via eth0.
	Gateway string `json:"gateway,omitempty"`
	// DNS lists name servers written to /etc/resolv.conf.
	DNS []string `json:"dns,omitempty"`
}

// SyncResult reports what a Sync did.
type SyncResult struct {
	// ClockSet says CLOCK_REALTIME was set.
	ClockSet bool `json:"clock_set"`
	// ClockStepNS is how far the clock moved (host time minus guest time
	// before the step).
	ClockStepNS int64 `json:"clock_step_ns"`
	// EntropyBytes is how many bytes were mixed into the kernel pool.
	EntropyBytes int `json:"entropy_bytes"`
	// Reseeded says the CRNG reseed succeeded.
	Reseeded bool `json:"reseeded"`
	// Changed lists the identity parts that were applied because they
	// differed: "hostname", "hosts", "mac", "ipv4", "gateway", "dns".
	Changed []string `json:"changed,omitempty"`
	// Errors lists the steps that failed; the EXIT frame then has Code 1.
	Errors []string `json:"errors,omitempty"`
	// StepsUS is how long each step took in the guest, in microseconds
	// ("clock", "entropy", "hostname", "hosts", "net", "dns"), for the
	// host's logs: after a restore under TCG every step runs guest code
	// for the first time in that VMM process.
	StepsUS map[string]int64 `json:"steps_us,omitempty"`
}

// Info describes the agent and the guest.
type Info struct {
	// AgentVersion is the agent's build version string.
	AgentVersion string `json:"agent_version"`
	// ProtocolVersion is Version.
	ProtocolVersion int `json:"protocol_version"`
	// Kernel is the kernel release (uname -r).
	Kernel string `json:"kernel"`
	// Hostname is the current kernel hostname.
	Hostname string `json:"hostname"`
	// BootID is /proc/sys/kernel/random/boot_id.
	BootID string `json:"boot_id"`
	// UptimeNS is CLOCK_BOOTTIME (includes time the VM was suspended).
	UptimeNS int64 `json:"uptime_ns"`
	// Init says the agent runs as PID 1.
	Init bool `json:"init"`
	// RootSwitched says the agent switched from the initramfs to the root disk.
	RootSwitched bool `json:"root_switched"`
	// Sessions counts host connections (HELLOs) since the agent started.
	Sessions uint64 `json:"sessions"`
}

// PutRequest asks the agent to extract a tar stream (sent as stdin data)
// into Dir, which is created if missing.
type PutRequest struct {
	// Dir is the absolute destination directory in the guest.
	Dir string `json:"dir"`
}

// PutResult reports a finished put.
type PutResult struct {
	// Entries is the number of tar entries written.
	Entries int `json:"entries"`
	// Bytes is the number of file content bytes written.
	Bytes int64 `json:"bytes"`
}

// GetRequest asks the agent to send Path (a file or a directory tree) as a
// tar stream on stdout. Entry names start with the base name of Path.
type GetRequest struct {
	// Path is the absolute path in the guest.
	Path string `json:"path"`
}

// Marshal encodes v as JSON for a frame payload.
func Marshal(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		// Only the types of this package are marshalled; they cannot fail.
		panic(fmt.Sprintf("proto: marshal %T: %v", v, err))
	}
	return b
}

// Unmarshal decodes a JSON frame payload into v.
func Unmarshal(p []byte, v any) error {
	if err := json.Unmarshal(p, v); err != nil {
		return fmt.Errorf("decoding %T: %w", v, err)
	}
	return nil
}
