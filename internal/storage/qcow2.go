package storage

import (
	"encoding/binary"
	"fmt"
	"os"
)

// A VM's disk is a chain of images: a raw base image at the bottom, the
// frozen qcow2 overlays of its checkpoints above it, and a writable qcow2
// overlay on top. A checkpoint freezes the top (the VM goes on in a new
// one), so taking one copies no disk data, and a restore or clone only
// adds an empty top over the checkpoint's chain. Layers below the top are
// never written again; VM, checkpoint and golden directories share them as
// hard links. The VMM opens each layer with its backing given explicitly,
// so no overlay names its backing file and a layer can be linked anywhere.

// qcow2ClusterBits is the cluster size of the overlays noid creates (64
// KiB, QEMU's default).
const qcow2ClusterBits = 16

// CreateQcow2 creates path as an empty qcow2 (version 3) image of
// virtualSize bytes with no backing file in its header: an overlay whose
// backing the VMM attaches when it opens it. It writes the file directly
// (a header, one refcount table and block, and a zeroed L1 table: a few
// hundred KiB, sparse), so it costs a file creation, not a qemu-img run.
// It fails if path exists.
func CreateQcow2(path string, virtualSize int64) error {
	if virtualSize <= 0 || virtualSize%512 != 0 {
		return fmt.Errorf("creating qcow2 %s: virtual size %d is not a positive multiple of 512", path, virtualSize)
	}
	const cluster = int64(1) << qcow2ClusterBits
	// One L1 entry maps an L2 table of cluster/8 entries, each a cluster.
	l1Covers := cluster * (cluster / 8)
	l1Size := (virtualSize + l1Covers - 1) / l1Covers
	l1Clusters := (l1Size*8 + cluster - 1) / cluster
	const (
		refTableOff = 1 << qcow2ClusterBits
		refBlockOff = 2 << qcow2ClusterBits
		l1Off       = 3 << qcow2ClusterBits
	)
	used := 3 + l1Clusters // header, refcount table, refcount block, L1
	if used > cluster/2 {
		return fmt.Errorf("creating qcow2 %s: virtual size %d is too large", path, virtualSize)
	}

	hdr := make([]byte, 112)
	be := binary.BigEndian
	be.PutUint32(hdr[0:], 0x514649fb) // "QFI\xfb"
	be.PutUint32(hdr[4:], 3)          // version
	// backing_file_offset (8) and backing_file_size (4) stay 0.
	be.PutUint32(hdr[20:], qcow2ClusterBits)
	be.PutUint64(hdr[24:], uint64(virtualSize))
	// crypt_method (4) stays 0.
	be.PutUint32(hdr[36:], uint32(l1Size))
	be.PutUint64(hdr[40:], l1Off)
	be.PutUint64(hdr[48:], refTableOff)
	be.PutUint32(hdr[56:], 1) // refcount_table_clusters
	// nb_snapshots, snapshots_offset and the feature bitmaps stay 0.
	be.PutUint32(hdr[96:], 4)    // refcount_order: 16-bit refcounts
	be.PutUint32(hdr[100:], 104) // header_length
	// Then the end of the header extensions (type 0, length 0), left zero.

	refTable := make([]byte, 8)
	be.PutUint64(refTable, refBlockOff)
	refBlock := make([]byte, used*2)
	for i := int64(0); i < used; i++ {
		be.PutUint16(refBlock[i*2:], 1)
	}

	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("creating qcow2 %s: %w", path, err)
	}
	err = func() error {
		for _, w := range []struct {
			b   []byte
			off int64
		}{{hdr, 0}, {refTable, refTableOff}, {refBlock, refBlockOff}} {
			if _, err := f.WriteAt(w.b, w.off); err != nil {
				return err
			}
		}
		// The L1 table is zeros: a hole up to the end of the file.
		return f.Truncate((3 + l1Clusters) * cluster)
	}()
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(path)
		return fmt.Errorf("creating qcow2 %s: %w", path, classify(path, err))
	}
	return nil
}
