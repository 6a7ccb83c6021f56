package manager

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/noid-vm/noid/internal/errdefs"
	"github.com/noid-vm/noid/internal/storage"
)

// A VM with a layered disk boots from a base image at the bottom of its
// chain, which its checkpoints and goldens share. That image must never
// change while anything uses it, whatever happens to the rootfs it came
// from (an image build replaces it; an operator may edit a rootfs of their
// own in place). So the manager pins each version of the rootfs: the
// first VM that boots from it makes <storage>/bases/<id>.raw, a reflink or
// sparse copy of it (once per version), and every VM links that. A pin no
// VM, checkpoint or golden links any more is removed at start-up.
//
// The pin is a copy, never a hard link to the rootfs: a hard link is the
// same inode, so an edit of the rootfs in place would change the disk
// under every running VM and golden, and each VM's link and unlink would
// move the rootfs's ctime, which is what tells whether it changed (see
// storage.ContentIDs: golden staleness would hash it again on the next
// create). The copy costs, once per rootfs version, its data extents in
// time and disk space, on the first cold create (measured on 2 loaded
// cores: the tiny image 34 ms, the Debian one, 220 MiB of data, 0.8 s);
// with reflinks it is free.
// basesDir is where pinned base images live.
func (m *Manager) basesDir() string { return filepath.Join(m.cfg.StorageDir(), "bases") }

// baseMu serialises pinning.
var baseMu sync.Mutex

// pinBase returns the pinned copy of the rootfs at path. A file that
// changes while it is copied is copied again, up to three times: its ctime
// also moves when something merely links it (test processes pin a shared
// image so), and a file still changing after that is refused.
func (m *Manager) pinBase(ctx context.Context, path string) (string, error) {
	var err error
	for attempt := 0; attempt < 3; attempt++ {
		var pinned string
		if pinned, err = m.pinBaseOnce(ctx, path); !errors.Is(err, errChangedWhileCopied) {
			return pinned, err
		}
		m.log.Info("the base image changed while it was copied; copying it again", "image", path)
	}
	return "", fmt.Errorf("pinning base image %s: %w: %w", path, errdefs.ErrConflict, err)
}

// errChangedWhileCopied is pinBaseOnce's error for a file whose stat moved
// during the copy.
var errChangedWhileCopied = errors.New("it changed while it was copied")

// pinBaseOnce is one attempt of pinBase.
func (m *Manager) pinBaseOnce(ctx context.Context, path string) (string, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return "", fmt.Errorf("base image %s: %w", path, err)
	}
	// The version of a file: where it is and when it last changed.
	h := sha256.New()
	fmt.Fprintf(h, "%d:%d:%d:%d.%d:%d.%d", st.Dev, st.Ino, st.Size, st.Mtim.Sec, st.Mtim.Nsec, st.Ctim.Sec, st.Ctim.Nsec)
	pinned := filepath.Join(m.basesDir(), hex.EncodeToString(h.Sum(nil))[:24]+".raw")
	baseMu.Lock()
	defer baseMu.Unlock()
	if _, err := os.Stat(pinned); err == nil {
		return pinned, nil
	}
	if err := os.MkdirAll(m.basesDir(), 0o700); err != nil {
		return "", err
	}
	tmp := pinned + ".tmp"
	os.Remove(tmp)
	m.log.Info("copying the base image into the storage dir (once per image version)", "image", path, "bytes", st.Size)
	// The copy is made durable before it gets its name: every VM,
	// checkpoint and golden built on it links it, and a crash must not
	// leave them a pin whose data never reached the disk. Flushing here,
	// on the first create from a new image, also keeps that writeback out
	// of the first checkpoint's pause, where QEMU's flush of the disk
	// chain used to wait for it (95-127 ms; BENCHMARKS.md finding 11).
	cp := &storage.Copier{Sync: true, NoReflink: m.copier.NoReflink}
	if err := cp.CopyFile(ctx, path, tmp); err != nil {
		os.Remove(tmp)
		return "", fmt.Errorf("pinning base image %s: %w", path, classifyIOErr("copying it", err))
	}
	var after unix.Stat_t
	if err := unix.Stat(path, &after); err != nil || after.Ctim != st.Ctim || after.Ino != st.Ino {
		os.Remove(tmp)
		return "", errChangedWhileCopied
	}
	if err := os.Rename(tmp, pinned); err != nil {
		os.Remove(tmp)
		return "", fmt.Errorf("pinning base image %s: %w", path, err)
	}
	if err := storage.FsyncDir(m.basesDir()); err != nil {
		return "", fmt.Errorf("pinning base image %s: %w", path, classifyIOErr("syncing its directory", err))
	}
	return pinned, nil
}

// sweepBases removes pinned bases nothing links any more, and unfinished
// pins. A pin is in use while some VM, checkpoint or golden directory has
// a link to it, so its link count is above one.
func (m *Manager) sweepBases() {
	ents, err := os.ReadDir(m.basesDir())
	if err != nil {
		return
	}
	for _, e := range ents {
		p := filepath.Join(m.basesDir(), e.Name())
		if strings.HasSuffix(e.Name(), ".tmp") {
			os.Remove(p)
			continue
		}
		var st unix.Stat_t
		if unix.Stat(p, &st) == nil && st.Nlink <= 1 {
			m.log.Info("removing a base image nothing uses any more", "file", p)
			os.Remove(p)
		}
	}
}

// snapshotSize is the disk space the snapshot in dir holds, not counting
// its base image: that is the image's, shared by every VM booted from it.
// Disk layers it shares with other snapshots of the same VM count in each.
func (m *Manager) snapshotSize(dir string) int64 {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return 0
	}
	paths := make([]string, 0, len(ents))
	for _, e := range ents {
		paths = append(paths, filepath.Join(dir, e.Name()))
	}
	return m.spaceOf(paths)
}

// spaceOf is the disk space the files at paths hold, not counting base
// images.
func (m *Manager) spaceOf(paths []string) int64 {
	bases := map[[2]uint64]bool{}
	if ents, err := os.ReadDir(m.basesDir()); err == nil {
		for _, e := range ents {
			var st unix.Stat_t
			if unix.Stat(filepath.Join(m.basesDir(), e.Name()), &st) == nil {
				bases[[2]uint64{uint64(st.Dev), st.Ino}] = true
			}
		}
	}
	var total int64
	for _, p := range paths {
		var st unix.Stat_t
		if unix.Stat(p, &st) != nil || bases[[2]uint64{uint64(st.Dev), st.Ino}] {
			continue
		}
		total += st.Blocks * 512
	}
	return total
}
