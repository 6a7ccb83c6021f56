package remote

import (
	"encoding/json"
	"fmt"
	"regexp"
	"strings"
	"time"

	"github.com/noid-vm/noid/internal/errdefs"
)

// ManifestVersion is the manifest format this noid writes and reads.
const ManifestVersion = 1

// The kinds of snapshot a manifest describes.
const (
	KindCheckpoint = "checkpoint"
	KindGolden     = "golden"
)

// SystemNS is the namespace of the goldens admins publish for everyone.
const SystemNS = "system"

// UserNS is the namespace of a user's objects.
func UserNS(user string) string { return "users/" + user }

// CheckpointKey is the manifest key of a pushed checkpoint.
func CheckpointKey(ns, key string) string { return ns + "/checkpoints/" + key + "/manifest.json" }

// GoldenKey is the manifest key of a pushed golden snapshot for a spec
// ("1x256").
func GoldenKey(ns, spec string) string { return ns + "/golden/" + spec + "/manifest.json" }

// chunkKey is where a chunk of namespace ns lives.
func chunkKey(ns, sum string) string { return ns + "/chunks/" + sum[:2] + "/" + sum }

var keyRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,62}(/[A-Za-z0-9][A-Za-z0-9._-]{0,62}){0,3}$`)

// ValidateKey checks a user-chosen key: up to four slash-separated
// segments of letters, digits, '.', '_' and '-', none starting with a dot.
func ValidateKey(key string) error {
	if !keyRE.MatchString(key) || strings.Contains(key, "..") {
		return errdefs.WithHint(fmt.Errorf("%w: remote key %q is not valid", errdefs.ErrInvalidArgument, key),
			"use up to 4 segments of letters, digits, '.', '_' and '-' separated by '/', e.g. dev/clean")
	}
	return nil
}

// Manifest describes one pushed snapshot: what it needs to run, and its
// files as chunks.
type Manifest struct {
	// Version is ManifestVersion.
	Version int `json:"version"`
	// Kind is KindCheckpoint or KindGolden.
	Kind string `json:"kind"`
	// Key is the user's key (checkpoints) or the spec (goldens).
	Key string `json:"key"`
	// Owner is the user who pushed it, or "system".
	Owner string `json:"owner"`
	// Host is the host it was pushed from (informational).
	Host string `json:"host"`
	// Source names the VM and checkpoint it came from (informational).
	Source string `json:"source,omitempty"`
	// PushedAt is when the push finished.
	PushedAt time.Time `json:"pushed_at"`
	// Backend, VMMVersion and Accel are the VMM it was taken with.
	Backend    string `json:"backend"`
	VMMVersion string `json:"vmm_version"`
	Accel      string `json:"accel"`
	// CPUModel is the host CPU's model name: under KVM the guest sees it
	// (QEMU's -cpu host), so a host of another model refuses the snapshot;
	// under TCG the guest sees QEMU's own model and it is informational.
	CPUModel string `json:"cpu_model,omitempty"`
	// VCPUs, MemoryMiB and HasNet are the VM shape it needs.
	VCPUs     int  `json:"vcpus"`
	MemoryMiB int  `json:"memory_mib"`
	HasNet    bool `json:"has_net"`
	// DiskBytes is the disk size the VM sees.
	DiskBytes int64 `json:"disk_bytes,omitempty"`
	// KernelSHA256, InitrdSHA256 and RootfsFingerprint identify the boot
	// files it was made from (a golden's rootfs decides its staleness).
	KernelSHA256      string `json:"kernel_sha256"`
	InitrdSHA256      string `json:"initrd_sha256"`
	RootfsFingerprint string `json:"rootfs_fingerprint,omitempty"`
	// MetaFile and Meta are the snapshot's own metadata file, verbatim.
	MetaFile string          `json:"meta_file"`
	Meta     json.RawMessage `json:"meta"`
	// ChunkSize is the logical size of every chunk but a file's last.
	ChunkSize int64 `json:"chunk_size"`
	// Files are the snapshot's files but its metadata.
	Files []File `json:"files"`
}

// File is one file of a pushed snapshot.
type File struct {
	// Name is its name in the snapshot directory.
	Name string `json:"name"`
	// Size is its size in bytes, holes included.
	Size int64 `json:"size"`
	// SHA256 is its content identity (storage.ContentID: SHA-256 over
	// its non-zero 64 KiB blocks and size, "sha256-64k:…").
	SHA256 string `json:"sha256"`
	// DataBytes is how much of it is not zero.
	DataBytes int64 `json:"data_bytes"`
	// Chunks are its non-empty chunks; the rest of the file is zeros.
	Chunks []Chunk `json:"chunks"`
}

// Chunk is one stored chunk of a file.
type Chunk struct {
	// Index is the chunk's place in the file: it covers bytes
	// [Index*ChunkSize, (Index+1)*ChunkSize).
	Index int64 `json:"index"`
	// Sum is the hex SHA-256 of the chunk's uncompressed encoding; it
	// names the object.
	Sum string `json:"sum"`
	// Stored is the object's size (compressed).
	Stored int64 `json:"stored"`
}

var sumRE = regexp.MustCompile(`^[0-9a-f]{64}$`)

// check refuses a manifest this noid cannot read, or one whose names
// would write outside the snapshot directory.
func (m *Manifest) check() error {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%w: remote manifest %s: %s", errdefs.ErrConflict, m.Key, fmt.Sprintf(format, a...))
	}
	if m.Version != ManifestVersion {
		return errdefs.WithHint(bad("format version %d, this noid reads %d", m.Version, ManifestVersion), "upgrade noid on this host, or push it again from a host running this version")
	}
	if m.ChunkSize <= 0 || m.ChunkSize%blockSize != 0 || m.ChunkSize > 64<<20 {
		return bad("chunk size %d", m.ChunkSize)
	}
	if m.MetaFile != "meta.json" && m.MetaFile != "config.json" {
		return bad("metadata file %q", m.MetaFile)
	}
	seen := map[string]bool{m.MetaFile: true}
	for _, f := range m.Files {
		if f.Name == "" || strings.ContainsAny(f.Name, "/\\") || strings.HasPrefix(f.Name, ".") || seen[f.Name] {
			return bad("file name %q", f.Name)
		}
		seen[f.Name] = true
		if f.Size < 0 || !strings.HasPrefix(f.SHA256, "sha256-64k:") {
			return bad("file %s has size %d, sum %q", f.Name, f.Size, f.SHA256)
		}
		for _, c := range f.Chunks {
			if !sumRE.MatchString(c.Sum) || c.Index < 0 || c.Index*m.ChunkSize >= f.Size {
				return bad("file %s has a bad chunk (index %d, sum %q)", f.Name, c.Index, c.Sum)
			}
		}
	}
	return nil
}

// totals sums its files' sizes, non-zero content and stored chunks.
func (m *Manifest) totals() (size, data, stored int64) {
	for _, f := range m.Files {
		size += f.Size
		data += f.DataBytes
		for _, c := range f.Chunks {
			stored += c.Stored
		}
	}
	return size, data, stored
}

// DataBytes is the non-zero content of the snapshot's files.
func (m *Manifest) DataBytes() int64 { _, d, _ := m.totals(); return d }

// StoredBytes is what its chunks take in the store (shared chunks count
// in each snapshot).
func (m *Manifest) StoredBytes() int64 { _, _, s := m.totals(); return s }

// Size is the logical size of its files, holes included.
func (m *Manifest) Size() int64 { s, _, _ := m.totals(); return s }
