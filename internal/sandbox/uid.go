package sandbox

import (
	"errors"
	"fmt"
	"hash/fnv"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
)

// Default uid range for VMM processes: high enough to stay clear of system
// and regular users (below 60000), systemd's dynamic users (61184-65519)
// and the usual /etc/subuid ranges (from 100000, 65536 each), and below
// 2^31 so that no tool mistakes a uid for a negative number.
const (
	DefaultUIDBase  = 2_000_000_000
	DefaultUIDCount = 65536
)

// ErrUIDsExhausted is returned by Acquire when every uid of the range is
// leased.
var ErrUIDsExhausted = errors.New("every uid of the sandbox range is in use")

// UIDPool leases one uid (and the gid of the same number) from a range to
// each VM, so that VMMs cannot reach each other's files. Leases are files
// in a directory, named after the uid and created with O_EXCL, holding the
// VM id and the directory the VM's files live in. It is safe for concurrent
// use.
type UIDPool struct {
	dir   string
	base  uint32
	count uint32

	mu   sync.Mutex
	byID map[string]uint32
}

// Lease is one VM's uid.
type Lease struct {
	// ID is the VM id.
	ID string
	// Owner is the VM's directory; the lease dies with it.
	Owner string
	// UID is the leased uid; the gid is the same number.
	UID uint32
}

// OpenUIDPool opens (creating dir, mode 0700) the pool of count uids from
// base. It removes leases that are malformed, outside the range, or whose
// owner directory no longer exists (the VM was destroyed while no server
// ran).
func OpenUIDPool(dir string, base, count uint32) (*UIDPool, error) {
	if base == 0 || count == 0 || uint64(base)+uint64(count) > 1<<32-1 {
		return nil, fmt.Errorf("invalid uid range %d+%d: it must be non-empty, exclude 0 (root) and end below 4294967295", base, count)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("creating uid lease dir: %w", err)
	}
	p := &UIDPool{dir: dir, base: base, count: count, byID: map[string]uint32{}}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("reading uid leases: %w", err)
	}
	for _, e := range ents {
		path := filepath.Join(dir, e.Name())
		uid, err := strconv.ParseUint(e.Name(), 10, 32)
		if err != nil {
			if strings.HasPrefix(e.Name(), ".tmp-") {
				os.Remove(path)
			}
			continue
		}
		l, err := readLease(path)
		if err != nil || uint32(uid) < base || uint32(uid)-base >= count || !dirExists(l.Owner) || p.byID[l.ID] != 0 {
			os.Remove(path)
			continue
		}
		p.byID[l.ID] = uint32(uid)
	}
	return p, nil
}

func dirExists(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && fi.IsDir()
}

// ParseLease decodes a lease file: the VM id on the first line, its
// directory on the second.
func ParseLease(b []byte) (Lease, error) {
	id, owner, ok := strings.Cut(strings.TrimSuffix(string(b), "\n"), "\n")
	if !ok || id == "" || !filepath.IsAbs(owner) || strings.ContainsAny(id, "\n\x00/") || strings.ContainsAny(owner, "\n\x00") {
		return Lease{}, fmt.Errorf("malformed uid lease")
	}
	return Lease{ID: id, Owner: owner}, nil
}

func readLease(path string) (Lease, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return Lease{}, err
	}
	return ParseLease(b)
}

// Range returns the pool's first uid and size.
func (p *UIDPool) Range() (base, count uint32) { return p.base, p.count }

// Lookup returns the uid leased to id.
func (p *UIDPool) Lookup(id string) (uint32, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	u, ok := p.byID[id]
	return u, ok
}

// Acquire returns the uid leased to id, leasing a free one first if id has
// none. owner is the VM's directory (absolute); the lease is dropped by
// OpenUIDPool once that directory is gone.
func (p *UIDPool) Acquire(id, owner string) (uint32, error) {
	if id == "" || strings.ContainsAny(id, "\n\x00/") || !filepath.IsAbs(owner) || strings.ContainsAny(owner, "\n\x00") {
		return 0, fmt.Errorf("invalid uid lease for %q in %q", id, owner)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if u, ok := p.byID[id]; ok {
		return u, nil
	}
	h := fnv.New32a()
	h.Write([]byte(id))
	start := h.Sum32() % p.count
	content := []byte(id + "\n" + owner + "\n")
	for i := uint32(0); i < p.count; i++ {
		uid := p.base + (start+i)%p.count
		err := p.create(uid, content)
		if errors.Is(err, fs.ErrExist) {
			continue
		}
		if err != nil {
			return 0, err
		}
		p.byID[id] = uid
		return uid, nil
	}
	return 0, fmt.Errorf("%w (%d uids from %d)", ErrUIDsExhausted, p.count, p.base)
}

// create writes a lease file for uid: the content goes to a temporary file
// that is then hard-linked to the lease name, which fails if it exists, so
// a lease is never seen half-written and never taken twice.
func (p *UIDPool) create(uid uint32, content []byte) error {
	tmp, err := os.CreateTemp(p.dir, ".tmp-")
	if err != nil {
		return fmt.Errorf("writing uid lease: %w", err)
	}
	defer os.Remove(tmp.Name())
	_, err = tmp.Write(content)
	if serr := tmp.Sync(); err == nil {
		err = serr
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("writing uid lease: %w", err)
	}
	if err := os.Link(tmp.Name(), filepath.Join(p.dir, strconv.FormatUint(uint64(uid), 10))); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return fs.ErrExist
		}
		return fmt.Errorf("writing uid lease: %w", err)
	}
	return nil
}

// Rehome records a new owner directory for id's lease (its files moved,
// for example when a warm spare becomes a user's VM).
func (p *UIDPool) Rehome(id, owner string) error {
	if !filepath.IsAbs(owner) || strings.ContainsAny(owner, "\n\x00") {
		return fmt.Errorf("invalid uid lease owner %q", owner)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	u, ok := p.byID[id]
	if !ok {
		return nil
	}
	tmp, err := os.CreateTemp(p.dir, ".tmp-")
	if err != nil {
		return fmt.Errorf("rewriting uid lease: %w", err)
	}
	defer os.Remove(tmp.Name())
	_, err = tmp.Write([]byte(id + "\n" + owner + "\n"))
	if serr := tmp.Sync(); err == nil {
		err = serr
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), filepath.Join(p.dir, strconv.FormatUint(uint64(u), 10)))
	}
	if err != nil {
		return fmt.Errorf("rewriting uid lease: %w", err)
	}
	return nil
}

// Release drops id's lease, if it has one.
func (p *UIDPool) Release(id string) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	u, ok := p.byID[id]
	if !ok {
		return nil
	}
	delete(p.byID, id)
	if err := os.Remove(filepath.Join(p.dir, strconv.FormatUint(uint64(u), 10))); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("releasing uid %d: %w", u, err)
	}
	return nil
}

// Leases lists the current leases.
func (p *UIDPool) Leases() []Lease {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]Lease, 0, len(p.byID))
	for _, u := range p.byID {
		l, err := readLease(filepath.Join(p.dir, strconv.FormatUint(uint64(u), 10)))
		if err != nil {
			continue
		}
		l.UID = u
		out = append(out, l)
	}
	return out
}
