package storage

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
)

// A content identity names what a file holds, not where it is or when it
// was written: two files with equal identities have equal bytes. noid uses
// one to tell whether a guest image's boot files (kernel, initramfs, root
// filesystem) are still those a golden snapshot was made from.
//
// Why a hash and not the ext4 UUID plus a generation noid writes: a
// generation only moves when noid itself changes an image, but the files
// are the operator's too (a rootfs of their own, edited with debugfs or dd
// and the mtime put back), and the superblock does not change when a data
// block does. Why not size, mtime and a few sampled ranges: a change
// anywhere else goes unnoticed. A hash reads the whole file, so it is
// computed once per version of the file and remembered (ContentIDs), keyed
// by the file's inode, size, mtime and ctime. ctime cannot be set from
// user space and moves on every write, truncate, chmod, link or unlink, so
// a file whose stat is unchanged has unchanged content, and a check of an
// unchanged file is one stat.

// IDAlgo names how a content identity is computed.
type IDAlgo string

const (
	// IDSHA256 is the hex SHA-256 of the whole file, the form the
	// kernel_sha256 and initrd_sha256 of snapshot metadata have always had
	// (small files: a kernel, an initramfs).
	IDSHA256 IDAlgo = "sha256"
	// IDSparseSHA256 is ContentID's identity: it reads only the data
	// extents, so it suits large sparse files (root filesystems).
	IDSparseSHA256 IDAlgo = "sha256-64k"
)

// ContentIDPrefix starts every identity ContentID returns; it names the
// algorithm, so a later change of algorithm is told apart from a changed
// file.
const ContentIDPrefix = string(IDSparseSHA256) + ":"

// ContentID returns the content identity of the file at path:
// ContentIDPrefix and the hex SHA-256 over the index and bytes of every
// non-zero 64 KiB block, then the size (the walk Checksum does, with
// SHA-256 instead of CRC-32C). Only data extents are read, so a 2 GiB
// rootfs with 300 MiB written costs 300 MiB of reads, and a hole and
// written zeros hash alike, so a sparse copy or a reflink of a file has its
// identity.
func ContentID(ctx context.Context, path string) (string, error) {
	_, d, err := sumBlocks(ctx, path, sha256.New())
	if err != nil {
		return "", fmt.Errorf("hashing %s: %w", path, err)
	}
	return ContentIDPrefix + hex.EncodeToString(d), nil
}

// fileSHA256 returns the hex SHA-256 of the whole file at path, checking
// ctx between 1 MiB reads.
func fileSHA256(ctx context.Context, path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("hashing %s: %w", path, err)
	}
	defer f.Close()
	h := sha256.New()
	buf := make([]byte, 1<<20)
	for {
		if err := ctx.Err(); err != nil {
			return "", err
		}
		n, err := f.Read(buf)
		h.Write(buf[:n])
		if errors.Is(err, io.EOF) {
			return hex.EncodeToString(h.Sum(nil)), nil
		}
		if err != nil {
			return "", fmt.Errorf("hashing %s: %w", path, err)
		}
	}
}

// ContentIDs computes content identities and remembers them by the stat of
// the file they were computed from (inode, size, mtime and ctime), in
// memory and, when Dir is set, in one small JSON file per file and
// algorithm under Dir, so a restart does not read the files again. A file
// is hashed again only when its stat changed. Concurrent requests for one
// file wait for one hash. The zero value keeps identities in memory only;
// it is safe for concurrent use.
type ContentIDs struct {
	// Dir is where identities persist ("" for nowhere).
	Dir string

	mu      sync.Mutex
	mem     map[string]idRecord
	flights map[string]*sync.Mutex
	// hashed counts the files read whole (tests check it stays put).
	hashed atomic.Int64
}

// idRecord is one remembered identity: the stat it holds for and the id.
type idRecord struct {
	Path  string `json:"path"`
	Algo  IDAlgo `json:"algo"`
	Dev   uint64 `json:"dev"`
	Ino   uint64 `json:"ino"`
	Size  int64  `json:"size"`
	Mtime int64  `json:"mtime_ns"`
	Ctime int64  `json:"ctime_ns"`
	ID    string `json:"id"`
}

func recordOf(path string, algo IDAlgo, id fileID) idRecord {
	return idRecord{Path: path, Algo: algo, Dev: id.dev, Ino: id.ino, Size: id.size,
		Mtime: id.mtime.Nano(), Ctime: id.ctime.Nano()}
}

// sameFile reports whether r and o were taken from one version of one file.
func (r idRecord) sameFile(o idRecord) bool {
	return r.Path == o.Path && r.Algo == o.Algo && r.Dev == o.Dev && r.Ino == o.Ino &&
		r.Size == o.Size && r.Mtime == o.Mtime && r.Ctime == o.Ctime
}

// idKey names the record of path and algo, in memory and as a file name.
func idKey(path string, algo IDAlgo) string {
	h := sha256.Sum256([]byte(string(algo) + "\x00" + path))
	return hex.EncodeToString(h[:12])
}

// Get returns the identity of the file at path by algo, hashing the file
// only when no identity is remembered for its current stat.
func (c *ContentIDs) Get(ctx context.Context, path string, algo IDAlgo) (string, error) {
	if algo != IDSHA256 && algo != IDSparseSHA256 {
		return "", fmt.Errorf("content id of %s: unknown algorithm %q", path, algo)
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return "", fmt.Errorf("content id of %s: %w", path, err)
	}
	k := idKey(abs, algo)
	now, err := statID(abs)
	if err != nil {
		return "", fmt.Errorf("content id of %s: %w", path, err)
	}
	want := recordOf(abs, algo, now)
	if id, ok := c.lookup(k, want); ok {
		return id, nil
	}
	// One hash per file at a time; whoever waited finds it remembered.
	fl := c.flight(k)
	fl.Lock()
	defer fl.Unlock()
	if now, err = statID(abs); err != nil {
		return "", fmt.Errorf("content id of %s: %w", path, err)
	}
	want = recordOf(abs, algo, now)
	if id, ok := c.lookup(k, want); ok {
		return id, nil
	}
	c.hashed.Add(1)
	var id string
	if algo == IDSHA256 {
		id, err = fileSHA256(ctx, abs)
	} else {
		id, err = ContentID(ctx, abs)
	}
	if err != nil {
		return "", err
	}
	// Remember it only if the file did not change while it was read.
	if after, err := statID(abs); err == nil && after == now {
		want.ID = id
		c.store(k, want)
	}
	return id, nil
}

// lookup returns the identity remembered for the file version want, from
// memory or from Dir.
func (c *ContentIDs) lookup(k string, want idRecord) (string, bool) {
	c.mu.Lock()
	r, ok := c.mem[k]
	c.mu.Unlock()
	if ok && r.sameFile(want) {
		return r.ID, true
	}
	if c.Dir == "" {
		return "", false
	}
	b, err := os.ReadFile(filepath.Join(c.Dir, k+".json"))
	if err != nil {
		return "", false
	}
	if json.Unmarshal(b, &r) != nil || r.ID == "" || !r.sameFile(want) {
		return "", false
	}
	c.mu.Lock()
	c.setMem(k, r)
	c.mu.Unlock()
	return r.ID, true
}

// store remembers r in memory and, best effort, in Dir (a record that
// cannot be written only costs a hash after a restart).
func (c *ContentIDs) store(k string, r idRecord) {
	c.mu.Lock()
	c.setMem(k, r)
	c.mu.Unlock()
	if c.Dir == "" {
		return
	}
	if err := os.MkdirAll(c.Dir, 0o700); err != nil {
		return
	}
	b, _ := json.MarshalIndent(r, "", "  ")
	WriteFileAtomic(filepath.Join(c.Dir, k+".json"), b, 0o600)
}

// setMem records r under k; c.mu is held.
func (c *ContentIDs) setMem(k string, r idRecord) {
	if c.mem == nil {
		c.mem = map[string]idRecord{}
	}
	c.mem[k] = r
}

// flight returns the lock that serialises hashing the file of key k.
func (c *ContentIDs) flight(k string) *sync.Mutex {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.flights == nil {
		c.flights = map[string]*sync.Mutex{}
	}
	l := c.flights[k]
	if l == nil {
		l = &sync.Mutex{}
		c.flights[k] = l
	}
	return l
}

// Hashed returns how many times c read a file whole: once per version of
// each file, so a caller can check that its hot path reads none.
func (c *ContentIDs) Hashed() int64 { return c.hashed.Load() }
