package api

import "time"

// RemotePushRequest is the body of POST
// /v1/vms/{name}/checkpoints/{checkpoint}/push.
type RemotePushRequest struct {
	// Key names the checkpoint in the caller's space of the remote
	// store; default "<vm>/<checkpoint>".
	Key string `json:"key,omitempty"`
}

// RemoteCloneRequest is the body of POST /v1/remote/clone: start a new VM
// from a checkpoint pushed to the remote store (by any host).
type RemoteCloneRequest struct {
	// Key is the pushed checkpoint's key.
	Key string `json:"key"`
	// As is the new VM's name.
	As string `json:"as"`
}

// GoldenRemoteRequest is the body of POST /v1/golden/push and
// /v1/golden/pull: the spec of the golden (zero values: the server's
// default spec).
type GoldenRemoteRequest struct {
	VCPUs     int `json:"vcpus,omitempty"`
	MemoryMiB int `json:"memory_mib,omitempty"`
}

// RemoteSnapshot describes a checkpoint or golden snapshot in the remote
// store. Field names are stable.
type RemoteSnapshot struct {
	// Key is the checkpoint's key, or the golden's spec ("1x2048").
	Key string `json:"key"`
	// Kind is "checkpoint" or "golden".
	Kind string `json:"kind"`
	// Owner is the user who pushed it, or "system" for the goldens admins
	// publish for everyone.
	Owner string `json:"owner"`
	// Host is the host it was pushed from.
	Host string `json:"host"`
	// Source names the VM and checkpoint it came from.
	Source    string    `json:"source,omitempty"`
	PushedAt  time.Time `json:"pushed_at"`
	Backend   string    `json:"backend"`
	VCPUs     int       `json:"vcpus"`
	MemoryMiB int       `json:"memory_mib"`
	// SizeBytes is the size of its files, holes included; DataBytes their
	// non-zero content; StoredBytes what its chunks take compressed.
	SizeBytes   int64 `json:"size_bytes"`
	DataBytes   int64 `json:"data_bytes"`
	StoredBytes int64 `json:"stored_bytes"`
	// Pushed says what the push that returned it sent.
	Pushed *RemoteTransfer `json:"pushed,omitempty"`
}

// RemoteTransfer says what one push or pull moved.
type RemoteTransfer struct {
	// BytesMoved is the compressed bytes sent or received.
	BytesMoved int64 `json:"bytes_moved"`
	// Chunks is the snapshot's chunks; ChunksMoved went over the network;
	// ChunksReused were in the store already (push) or on this host (pull).
	Chunks       int `json:"chunks"`
	ChunksMoved  int `json:"chunks_moved"`
	ChunksReused int `json:"chunks_reused"`
	// LocalFiles is the files a pull took from this host (a base image
	// with the same content) instead of the store.
	LocalFiles int `json:"local_files,omitempty"`
	// Cached is true when a pull found the whole snapshot on this host
	// from an earlier pull and moved no data.
	Cached bool `json:"cached,omitempty"`
	// Ms is how long the transfer took.
	Ms float64 `json:"ms"`
}
