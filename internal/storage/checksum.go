package storage

import (
	"context"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"hash/crc32"
	"io"
	"os"
	"sync"

	"golang.org/x/sys/unix"
)

// sumBlock is the unit a checksum reads and hashes. Blocks of zeros are
// skipped, so a hole and written zeros give the same sum.
const sumBlock = 64 << 10

// sumPrefix names the checksum algorithm in every sum, so a later change of
// algorithm is told apart from a changed file.
const sumPrefix = "crc32c-64k:"

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Checksum returns the size of the file at path and a checksum of its
// content. It reads only the file's data extents (SEEK_DATA/SEEK_HOLE), so
// a sparse 2 GiB RAM file with 100 MiB written costs about 100 MiB of
// reads, and the sum depends on the content alone: a hole and a block of
// written zeros hash alike, whatever the filesystem's extent layout (a
// reflink, a sparse copy and the original all give the same sum). It is
// CRC-32C over the index and bytes of every non-zero 64 KiB block, then the
// size: a guard against truncated, damaged or swapped files, not against
// a forger.
func Checksum(ctx context.Context, path string) (size int64, sum string, err error) {
	size, d, err := sumBlocks(ctx, path, crc32.New(castagnoli))
	if err != nil {
		return 0, "", fmt.Errorf("checksumming %s: %w", path, err)
	}
	return size, sumPrefix + hex.EncodeToString(d), nil
}

// sumBlocks feeds h the index (8 bytes, little-endian) and bytes of every
// non-zero sumBlock-sized block of the file at path, reading only its data
// extents, then its size, and returns the size and h's sum.
func sumBlocks(ctx context.Context, path string, h hash.Hash) (int64, []byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return 0, nil, err
	}
	size := fi.Size()
	buf := make([]byte, sumBlock)
	var idx [8]byte
	next := int64(0) // the first block not hashed yet
	err = forEachExtent(ctx, f, size, func(off, end int64) error {
		for b := max(off/sumBlock, next); b*sumBlock < end; b++ {
			if err := ctx.Err(); err != nil {
				return err
			}
			n, err := f.ReadAt(buf, b*sumBlock)
			if err != nil && !errors.Is(err, io.EOF) {
				return fmt.Errorf("reading at %d: %w", b*sumBlock, err)
			}
			next = b + 1
			if n == 0 || allZero(buf[:n]) {
				continue
			}
			binary.LittleEndian.PutUint64(idx[:], uint64(b))
			h.Write(idx[:])
			h.Write(buf[:n])
		}
		return nil
	})
	if err != nil {
		return 0, nil, err
	}
	var sz [8]byte
	binary.LittleEndian.PutUint64(sz[:], uint64(size))
	h.Write(sz[:])
	return size, h.Sum(nil), nil
}

// AllZero reports whether b holds only zero bytes.
func AllZero(b []byte) bool { return allZero(b) }

// allZero reports whether b holds only zero bytes.
func allZero(b []byte) bool {
	for len(b) >= 8 {
		if binary.NativeEndian.Uint64(b) != 0 {
			return false
		}
		b = b[8:]
	}
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// fileID identifies one version of a file: its inode and what changes
// whenever its content does (size, mtime and ctime; a write, truncate,
// chmod or rename-over all move ctime).
type fileID struct {
	dev, ino     uint64
	size         int64
	mtime, ctime unix.Timespec
}

func statID(path string) (fileID, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return fileID{}, err
	}
	return fileID{dev: uint64(st.Dev), ino: st.Ino, size: st.Size, mtime: st.Mtim, ctime: st.Ctim}, nil
}

// verifiedID is what Verifier remembers a file by: fileID without ctime.
// Any write moves mtime (a write through a shared mapping too) and a rename
// over the file gives another inode, but a hard link moves ctime alone, and
// noid links snapshot files into every clone and spare: keying on ctime made
// every clone read its whole snapshot again (30 to 230 ms on the default
// image). What this misses is a write followed by setting mtime back on
// purpose, which only root can do to noid's snapshot files (ContentIDs,
// which guards an operator's own images against exactly that, keeps ctime).
type verifiedID struct {
	dev, ino uint64
	size     int64
	mtime    unix.Timespec
}

func (id fileID) verified() verifiedID {
	return verifiedID{dev: id.dev, ino: id.ino, size: id.size, mtime: id.mtime}
}

// Verifier checks files against the size and checksum recorded when they
// were written, and remembers the files it has seen intact: a file whose
// inode, size and mtime have not changed since it was checksummed is not
// read again (see verifiedID). So a snapshot is read whole at most once per server
// run (at its creation, or on its first use after a restart), and every
// later check is a stat. The zero value is ready; it is safe for
// concurrent use.
type Verifier struct {
	mu   sync.Mutex
	seen map[verifiedID]string // the sum each unchanged file had
}

// Sum checksums the file at path (see Checksum) and remembers it as intact.
func (v *Verifier) Sum(ctx context.Context, path string) (size int64, sum string, err error) {
	before, err := statID(path)
	if err != nil {
		return 0, "", fmt.Errorf("checksumming %s: %w", path, err)
	}
	size, sum, err = Checksum(ctx, path)
	if err != nil {
		return 0, "", err
	}
	v.remember(path, before, sum)
	return size, sum, nil
}

// Verify checks that the file at path exists, has size bytes and, when
// sum is not empty, the checksum sum. Its error says which of these failed.
func (v *Verifier) Verify(ctx context.Context, path string, size int64, sum string) error {
	id, err := statID(path)
	if err != nil {
		return fmt.Errorf("%s is missing: %w", path, err)
	}
	if id.size != size {
		return fmt.Errorf("%s has %d bytes, %d were written", path, id.size, size)
	}
	if sum == "" {
		return nil
	}
	v.mu.Lock()
	known, ok := v.seen[id.verified()]
	v.mu.Unlock()
	if ok && known == sum {
		return nil
	}
	_, got, err := Checksum(ctx, path)
	if err != nil {
		return err
	}
	if got != sum {
		return fmt.Errorf("%s is damaged: its checksum is %s, %s was recorded", path, got, sum)
	}
	v.remember(path, id, sum)
	return nil
}

// remember records that the file at path, last seen as before, has sum
// when it is still unchanged now (it was not written while being read).
func (v *Verifier) remember(path string, before fileID, sum string) {
	after, err := statID(path)
	if err != nil || after.verified() != before.verified() {
		return
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.seen == nil {
		v.seen = map[verifiedID]string{}
	}
	if len(v.seen) > 1<<16 {
		clear(v.seen) // bound the memory; the cost is one re-read each
	}
	v.seen[after.verified()] = sum
}
