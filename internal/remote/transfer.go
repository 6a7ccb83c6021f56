package remote

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/klauspost/compress/zstd"

	"github.com/noid-vm/noid/internal/errdefs"
	"github.com/noid-vm/noid/internal/storage"
)

// ChunkSize is the logical size of the chunks a push cuts files into.
const ChunkSize = 8 << 20

// blockSize is the unit holes and zero pages are found in; it is the block
// of storage.ContentID, so a file's identity is computed in the same pass.
const blockSize = 64 << 10

// recordHeader is a chunk record's header: the block's index in the chunk
// and the length of its data (both uint32, little-endian).
const recordHeader = 8

var (
	encoder, _ = zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(2))
	decoder, _ = zstd.NewReader(nil, zstd.WithDecoderConcurrency(2), zstd.WithDecoderMaxMemory(ChunkSize*2))
)

// Stats count what a push or pull did.
type Stats struct {
	// Files and Chunks are the snapshot's.
	Files, Chunks int
	// Moved is how many chunks went over the network; Reused how many a
	// push found already stored (or a pull found on this host).
	Moved, Reused int
	// BytesMoved is the compressed bytes sent or received.
	BytesMoved int64
	// DataBytes is the non-zero content of the files.
	DataBytes int64
	// LocalFiles is how many files a pull took from this host instead.
	LocalFiles int
	// Took is how long the transfer took.
	Took time.Duration
}

// PushOptions tune a push.
type PushOptions struct {
	// Parallel is how many chunks move at once (default 4).
	Parallel int
	// BeforeManifest, when set, runs once every chunk is stored, before
	// the manifest is written (crash tests).
	BeforeManifest func()
}

// Push uploads the files of the snapshot in dir (names) and its metadata
// file m.MetaFile as the manifest at manifestKey, with chunks under
// namespace ns. m carries what the caller knows (kind, key, owner, shape,
// fingerprints); Push fills in the files. The manifest is written last.
func Push(ctx context.Context, st Store, ns, manifestKey, dir string, names []string, m *Manifest, opt PushOptions) (*Stats, error) {
	start := time.Now()
	par := opt.Parallel
	if par <= 0 {
		par = 4
	}
	meta, err := os.ReadFile(filepath.Join(dir, m.MetaFile))
	if err != nil {
		return nil, fmt.Errorf("reading the snapshot's metadata: %w", err)
	}
	m.Version, m.ChunkSize, m.Meta = ManifestVersion, ChunkSize, json.RawMessage(meta)
	m.Files = make([]File, len(names))
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	type job struct {
		file int
		idx  int64
		enc  []byte
	}
	jobs := make(chan job, par)
	var mu sync.Mutex
	var st8 Stats
	var moved atomic.Int64
	fail := func(err error) {
		if err != nil {
			cancel(err)
		}
	}
	var workers sync.WaitGroup
	for range par {
		workers.Add(1)
		go func() {
			defer workers.Done()
			for j := range jobs {
				if ctx.Err() != nil {
					continue
				}
				sum := sha256.Sum256(j.enc)
				hexSum := hex.EncodeToString(sum[:])
				key := chunkKey(ns, hexSum)
				size, ok, err := st.Stat(ctx, key)
				if err != nil {
					fail(err)
					continue
				}
				reused := ok
				if !ok {
					z := encoder.EncodeAll(j.enc, make([]byte, 0, len(j.enc)/2))
					if err := st.Put(ctx, key, z); err != nil {
						fail(err)
						continue
					}
					size = int64(len(z))
					moved.Add(size)
				}
				mu.Lock()
				f := &m.Files[j.file]
				f.Chunks = append(f.Chunks, Chunk{Index: j.idx, Sum: hexSum, Stored: size})
				st8.Chunks++
				if reused {
					st8.Reused++
				} else {
					st8.Moved++
				}
				mu.Unlock()
			}
		}()
	}
	var readers sync.WaitGroup
	for i, name := range names {
		readers.Add(1)
		go func() {
			defer readers.Done()
			size, sum, data, err := readChunks(ctx, filepath.Join(dir, name), func(idx int64, enc []byte) error {
				select {
				case jobs <- job{i, idx, enc}:
					return nil
				case <-ctx.Done():
					return context.Cause(ctx)
				}
			})
			if err != nil {
				fail(fmt.Errorf("reading %s: %w", name, err))
				return
			}
			mu.Lock()
			m.Files[i].Name, m.Files[i].Size, m.Files[i].SHA256, m.Files[i].DataBytes = name, size, sum, data
			mu.Unlock()
		}()
	}
	readers.Wait()
	close(jobs)
	workers.Wait()
	if err := context.Cause(ctx); err != nil {
		return nil, err
	}
	for i := range m.Files {
		f := &m.Files[i]
		sortChunks(f.Chunks)
		st8.DataBytes += f.DataBytes
	}
	st8.Files = len(names)
	m.PushedAt = time.Now().UTC()
	b, err := json.MarshalIndent(m, "", " ")
	if err != nil {
		return nil, err
	}
	if opt.BeforeManifest != nil {
		opt.BeforeManifest()
	}
	// Last: until the manifest is there, nothing of the push is visible.
	if err := st.Put(ctx, manifestKey, b); err != nil {
		return nil, err
	}
	st8.BytesMoved = moved.Load() + int64(len(b))
	st8.Took = time.Since(start)
	return &st8, nil
}

func sortChunks(c []Chunk) {
	for i := 1; i < len(c); i++ {
		for j := i; j > 0 && c[j].Index < c[j-1].Index; j-- {
			c[j], c[j-1] = c[j-1], c[j]
		}
	}
}

// readChunks reads the file at path once, in order, and calls emit with
// the encoding of every chunk that holds a non-zero block. It returns the
// file's size, content identity (storage.ContentID's) and non-zero bytes.
func readChunks(ctx context.Context, path string, emit func(idx int64, enc []byte) error) (size int64, sum string, data int64, err error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, "", 0, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return 0, "", 0, err
	}
	size = fi.Size()
	h := sha256.New()
	buf := make([]byte, blockSize)
	cur := int64(-1)
	var enc []byte
	flush := func() error {
		if len(enc) == 0 {
			return nil
		}
		e := enc
		enc = nil
		return emit(cur, e)
	}
	next := int64(0)
	err = storage.ForEachExtent(ctx, f, size, func(off, end int64) error {
		for b := max(off/blockSize, next); b*blockSize < end; b++ {
			if err := ctx.Err(); err != nil {
				return err
			}
			n, err := f.ReadAt(buf, b*blockSize)
			if err != nil && !errors.Is(err, io.EOF) {
				return fmt.Errorf("reading at %d: %w", b*blockSize, err)
			}
			next = b + 1
			if n == 0 || storage.AllZero(buf[:n]) {
				continue
			}
			hashBlock(h, b, buf[:n])
			ci := b * blockSize / ChunkSize
			if ci != cur {
				if err := flush(); err != nil {
					return err
				}
				cur = ci
				enc = make([]byte, 0, ChunkSize/4)
			}
			var hdr [recordHeader]byte
			binary.LittleEndian.PutUint32(hdr[:4], uint32(b-ci*(ChunkSize/blockSize)))
			binary.LittleEndian.PutUint32(hdr[4:], uint32(n))
			enc = append(append(enc, hdr[:]...), buf[:n]...)
			data += int64(n)
		}
		return nil
	})
	if err == nil {
		err = flush()
	}
	if err != nil {
		return 0, "", 0, err
	}
	return size, finishSum(h, size), data, nil
}

// hashBlock feeds h block b of a file as storage.ContentID does.
func hashBlock(h hash.Hash, b int64, data []byte) {
	var idx [8]byte
	binary.LittleEndian.PutUint64(idx[:], uint64(b))
	h.Write(idx[:])
	h.Write(data)
}

// finishSum ends a content identity with the file's size.
func finishSum(h hash.Hash, size int64) string {
	var sz [8]byte
	binary.LittleEndian.PutUint64(sz[:], uint64(size))
	h.Write(sz[:])
	return storage.ContentIDPrefix + hex.EncodeToString(h.Sum(nil))
}

// ReadManifest reads and checks the manifest at key.
func ReadManifest(ctx context.Context, st Store, key string) (*Manifest, []byte, error) {
	b, err := st.Get(ctx, key)
	if err != nil {
		return nil, nil, err
	}
	var m Manifest
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, nil, fmt.Errorf("%w: remote manifest %s is not valid JSON: %v", errdefs.ErrConflict, key, err)
	}
	if err := m.check(); err != nil {
		return nil, nil, err
	}
	return &m, b, nil
}

// PullOptions tune a pull.
type PullOptions struct {
	// Parallel is how many chunks move at once (default 4).
	Parallel int
	// Local, when set, may provide a file from this host instead of the
	// store: it makes dst hold f's content (a link or a copy of a file
	// with the same identity) and returns true, or returns false.
	Local func(ctx context.Context, f File, dst string) bool
}

// Pull writes the snapshot of manifest m (read with ReadManifest) into dir
// (an empty directory): its files, sparse, each checked against its
// identity, and its metadata file. Chunks are read from namespace ns. On
// error dir holds partial files; the caller removes it.
func Pull(ctx context.Context, st Store, ns string, m *Manifest, dir string, opt PullOptions) (*Stats, error) {
	start := time.Now()
	par := opt.Parallel
	if par <= 0 {
		par = 4
	}
	var st8 Stats
	type job struct {
		f   *os.File
		fe  *File
		c   Chunk
		end int64
	}
	var list []job
	var files []*os.File
	defer func() {
		for _, f := range files {
			f.Close()
		}
	}()
	for i := range m.Files {
		fe := &m.Files[i]
		st8.Files++
		st8.DataBytes += fe.DataBytes
		dst := filepath.Join(dir, fe.Name)
		if opt.Local != nil && opt.Local(ctx, *fe, dst) {
			st8.LocalFiles++
			st8.Reused += len(fe.Chunks)
			continue
		}
		f, err := os.OpenFile(dst, os.O_CREATE|os.O_EXCL|os.O_RDWR, 0o600)
		if err != nil {
			return nil, fmt.Errorf("creating %s: %w", dst, err)
		}
		files = append(files, f)
		if err := f.Truncate(fe.Size); err != nil {
			return nil, fmt.Errorf("sizing %s: %w", dst, err)
		}
		for _, c := range fe.Chunks {
			list = append(list, job{f, fe, c, fe.Size})
		}
	}
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	jobs := make(chan job)
	var moved atomic.Int64
	var n atomic.Int64
	var wg sync.WaitGroup
	for range par {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range jobs {
				if ctx.Err() != nil {
					continue
				}
				z, err := st.Get(ctx, chunkKey(ns, j.c.Sum))
				if err != nil {
					cancel(fmt.Errorf("chunk %d of %s: %w", j.c.Index, j.fe.Name, err))
					continue
				}
				moved.Add(int64(len(z)))
				n.Add(1)
				if err := writeChunk(j.f, j.c, j.end, m.ChunkSize, z); err != nil {
					cancel(errdefs.WithHint(fmt.Errorf("%w: remote snapshot %s: chunk %d of %s is damaged: %v", errdefs.ErrConflict, m.Key, j.c.Index, j.fe.Name, err),
						"nothing was imported; push the snapshot again from its host (the damaged object is replaced only when its chunk is sent again: delete it on the store first)"))
				}
			}
		}()
	}
	for _, j := range list {
		select {
		case jobs <- j:
		case <-ctx.Done():
		}
		if ctx.Err() != nil {
			break
		}
	}
	close(jobs)
	wg.Wait()
	if err := context.Cause(ctx); err != nil {
		return nil, err
	}
	for _, f := range files {
		if err := f.Sync(); err != nil {
			return nil, fmt.Errorf("syncing %s: %w", f.Name(), err)
		}
	}
	for _, fe := range m.Files {
		got, err := storage.ContentID(ctx, filepath.Join(dir, fe.Name))
		if err != nil {
			return nil, err
		}
		if got != fe.SHA256 {
			return nil, errdefs.WithHint(fmt.Errorf("%w: remote snapshot %s: %s has checksum %s, its manifest says %s", errdefs.ErrConflict, m.Key, fe.Name, got, fe.SHA256),
				"nothing was imported; push the snapshot again from its host")
		}
	}
	if err := os.WriteFile(filepath.Join(dir, m.MetaFile), m.Meta, 0o600); err != nil {
		return nil, fmt.Errorf("writing %s: %w", m.MetaFile, err)
	}
	st8.Chunks = len(list) + st8.Reused
	st8.Moved = int(n.Load())
	st8.BytesMoved = moved.Load()
	st8.Took = time.Since(start)
	return &st8, nil
}

// writeChunk checks a fetched chunk against its sum and writes its blocks
// into f (of size end) at their offsets.
func writeChunk(f *os.File, c Chunk, end, chunkSize int64, z []byte) error {
	enc, err := decoder.DecodeAll(z, nil)
	if err != nil {
		return fmt.Errorf("decompressing: %w", err)
	}
	sum := sha256.Sum256(enc)
	if hex.EncodeToString(sum[:]) != c.Sum {
		return fmt.Errorf("checksum mismatch: sha256 %s, expected %s", hex.EncodeToString(sum[:]), c.Sum)
	}
	base := c.Index * chunkSize
	for len(enc) > 0 {
		if len(enc) < recordHeader {
			return errors.New("truncated record")
		}
		rel := int64(binary.LittleEndian.Uint32(enc[:4]))
		l := int64(binary.LittleEndian.Uint32(enc[4:8]))
		enc = enc[recordHeader:]
		off := base + rel*blockSize
		if l > blockSize || l > int64(len(enc)) || rel*blockSize >= chunkSize || off+l > end {
			return fmt.Errorf("record out of bounds (block %d, %d bytes)", rel, l)
		}
		if _, err := f.WriteAt(enc[:l], off); err != nil {
			return fmt.Errorf("writing at %d: %w", off, err)
		}
		enc = enc[l:]
	}
	return nil
}
