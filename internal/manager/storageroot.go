package manager

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/noid-vm/noid/internal/config"
	"github.com/noid-vm/noid/internal/errdefs"
	"github.com/noid-vm/noid/internal/storage"
	"github.com/noid-vm/noid/internal/store"
	"github.com/noid-vm/noid/internal/vmm"
)

// The storage root (config.StorageDir) holds the VMs, checkpoints, golden
// snapshots, pinned base images and warm spares. It moves when [storage]
// reflink_image_size is turned on or off. The data dir records the root
// in use (storageRootFile), so a start can tell that it moved:
//
//   - While the store holds VMs, their files (and their checkpoints') are
//     in the old root, and the start is refused.
//   - Otherwise what is still of use in the old root, the golden
//     snapshots (system and users', with their backups), moves to the new
//     one, with the base images their disks are linked to; the rest (warm
//     spares, empty or orphaned VM directories, unused bases) is removed.
//
// The move is crash-safe. The record first names the old root as one
// being moved from; each golden is copied into a temporary directory of
// the new root, synced and renamed into place before the old one is
// removed, so a crash leaves every golden whole in one root or the other
// (or in both), and the next start finishes the move, whichever root the
// config then names. The record names the new root alone only once the
// old one holds nothing of use.

// storageRootFile records the storage root in use (see rootRecord).
const storageRootFile = "storage-root"

// movingDir is the directory of the new storage root that goldens are
// copied into before they are renamed into place.
const movingDir = ".moving"

// storageRoot is one storage root: a directory, and the loop image
// mounted on it when it is one ([storage] reflink_image_size).
type storageRoot struct {
	Dir   string `json:"dir"`
	Image string `json:"image,omitempty"`
}

// rootRecord is the content of storageRootFile: the root the data dir's
// VMs live in, and the earlier roots whose goldens are being moved into
// it. An older noid wrote the root's path alone.
type rootRecord struct {
	storageRoot
	MovingFrom []storageRoot `json:"moving_from,omitempty"`
}

// configRoot is the storage root cfg names.
func configRoot(cfg *config.Config) storageRoot {
	r := storageRoot{Dir: cfg.StorageDir()}
	if cfg.Storage.ReflinkImageSize != "" {
		r.Image = cfg.Storage.ReflinkImage
	}
	return r
}

// readRootRecord reads the data dir's storage root record; nil when there
// is none (a new data dir).
func readRootRecord(cfg *config.Config) (*rootRecord, error) {
	b, err := os.ReadFile(filepath.Join(cfg.DataDir, storageRootFile))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("reading the storage root record: %w", err)
	}
	var rec rootRecord
	if s := strings.TrimSpace(string(b)); strings.HasPrefix(s, "{") {
		if err := json.Unmarshal(b, &rec); err != nil {
			return nil, fmt.Errorf("reading the storage root record %s: %w", filepath.Join(cfg.DataDir, storageRootFile), err)
		}
	} else {
		rec.Dir = s
		// An older noid recorded no image; its loop mount was always
		// <data_dir>/reflink.
		if rec.Dir == filepath.Join(cfg.DataDir, "reflink") {
			if _, err := os.Stat(cfg.Storage.ReflinkImage); err == nil {
				rec.Image = cfg.Storage.ReflinkImage
			}
		}
	}
	if rec.Dir == "" {
		return nil, nil
	}
	return &rec, nil
}

// writeRootRecord replaces the storage root record, durably.
func writeRootRecord(dataDir string, rec rootRecord) error {
	b, err := json.Marshal(rec)
	if err != nil {
		return err
	}
	if err := storage.WriteFileAtomic(filepath.Join(dataDir, storageRootFile), append(b, '\n'), 0o600); err != nil {
		return fmt.Errorf("recording the storage root: %w", err)
	}
	return nil
}

// storageSwitch is what a start has to do about earlier storage roots.
type storageSwitch struct {
	// to is the root the config names.
	to storageRoot
	// from are earlier roots to empty into to, if any.
	from []storageRoot
	// recorded is the record as read (nil for a new data dir).
	recorded *rootRecord
}

// planStorageSwitch compares the recorded storage root with the
// configured one. A moved root is refused while the store holds VMs,
// whose files are all in the recorded root.
func planStorageSwitch(ctx context.Context, cfg *config.Config, st *store.Store) (*storageSwitch, error) {
	rec, err := readRootRecord(cfg)
	if err != nil {
		return nil, err
	}
	sw := &storageSwitch{to: configRoot(cfg), recorded: rec}
	if rec == nil {
		return sw, nil
	}
	seen := map[string]bool{sw.to.Dir: true}
	for _, r := range append([]storageRoot{rec.storageRoot}, rec.MovingFrom...) {
		if !seen[r.Dir] {
			seen[r.Dir] = true
			sw.from = append(sw.from, r)
		}
	}
	if rec.Dir == sw.to.Dir {
		return sw, nil
	}
	vms, err := st.ListVMs(ctx, -1)
	if err != nil {
		return nil, fmt.Errorf("listing the VMs of the old storage root: %w", err)
	}
	if len(vms) == 0 {
		return sw, nil
	}
	var names []string
	for _, v := range vms {
		if len(names) == 3 {
			names = append(names, fmt.Sprintf("and %d more", len(vms)-3))
			break
		}
		name := v.Name
		if u, err := st.UserByID(ctx, v.UserID); err == nil {
			name = u.Name + "/" + v.Name
		}
		if v.State != store.StateRunning {
			name += " (" + v.State + ")"
		}
		names = append(names, name)
	}
	what := "1 VM still has its files"
	if len(vms) > 1 {
		what = fmt.Sprintf("%d VMs still have their files", len(vms))
	}
	return nil, errdefs.WithHint(fmt.Errorf("%w: the storage root changed from %s to %s, but %s (and checkpoints) in the old one: %s",
		errdefs.ErrConflict, rec.Dir, sw.to.Dir, what, strings.Join(names, ", ")),
		"to keep them, revert [storage]; to switch, revert [storage], start noid-server, destroy them (noid destroy), then change [storage] again: golden snapshots move by themselves")
}

// mountStorage mounts the reflink image on the storage root when [storage]
// reflink_image_size is set.
func mountStorage(ctx context.Context, cfg *config.Config, log *slog.Logger) error {
	if cfg.Storage.ReflinkImageSize == "" {
		return nil
	}
	size, _ := config.ParseSize(cfg.Storage.ReflinkImageSize)
	mnt := cfg.StorageDir()
	if err := storage.SetupReflinkLoop(ctx, cfg.Storage.ReflinkImage, mnt, size); err != nil {
		return fmt.Errorf("setting up reflink storage %s on %s: %w", cfg.Storage.ReflinkImage, mnt, err)
	}
	log.Info("reflink storage mounted", "image", cfg.Storage.ReflinkImage, "mount", mnt, "size", cfg.Storage.ReflinkImageSize)
	return nil
}

// finishStorageSwitch empties every earlier storage root into the
// configured one, then records that one alone. It runs before recover
// and before any spare starts.
func (m *Manager) finishStorageSwitch(ctx context.Context, sw *storageSwitch) error {
	want := rootRecord{storageRoot: sw.to}
	if len(sw.from) > 0 {
		want.MovingFrom = sw.from
		if err := writeRootRecord(m.cfg.DataDir, want); err != nil {
			return err
		}
		if err := os.RemoveAll(filepath.Join(sw.to.Dir, movingDir)); err != nil {
			return fmt.Errorf("removing an unfinished move: %w", err)
		}
		for _, from := range sw.from {
			m.log.Info("storage root changed: moving golden snapshots to the new one", "from", from.Dir, "to", sw.to.Dir)
			if err := m.emptyRoot(ctx, from, sw.to); err != nil {
				return errdefs.WithHint(fmt.Errorf("moving golden snapshots from the old storage root %s to %s: %w", from.Dir, sw.to.Dir, err),
					"fix that and start again to finish the move, or revert [storage]: whatever was moved already moves back")
			}
		}
		os.Remove(filepath.Join(sw.to.Dir, movingDir))
		want.MovingFrom = nil
	}
	if sw.recorded != nil && sw.recorded.storageRoot == want.storageRoot && len(sw.recorded.MovingFrom) == 0 && len(sw.from) == 0 {
		return nil
	}
	return writeRootRecord(m.cfg.DataDir, want)
}

// rootMove is the move of one earlier storage root's goldens.
type rootMove struct {
	m        *Manager
	from, to storageRoot
	copier   *storage.Copier
	// pins are the old root's pinned base images, by inode.
	pins map[fileKey]string
	// moved are the files already in the new root, by the inode they
	// came from: a file linked in several goldens (a shared disk layer,
	// a base image) is copied once and linked again.
	moved map[fileKey]string
}

// fileKey identifies a file by its inode.
type fileKey struct{ dev, ino uint64 }

// statKey stats the file at path (following links) and returns its key.
func statKey(path string) (fileKey, *unix.Stat_t, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return fileKey{}, nil, err
	}
	return fileKey{uint64(st.Dev), st.Ino}, &st, nil
}

// emptyRoot moves the goldens of the old root from into to and removes
// what is left of noid's there. An old root on a loop image is mounted
// for the move (a reboot unmounts it) and unmounted after.
func (m *Manager) emptyRoot(ctx context.Context, from, to storageRoot) error {
	if from.Image != "" {
		if _, err := os.Stat(from.Image); err == nil {
			m.log.Info("the old storage root is on a loop image: mounting it (unless it is) to move its golden snapshots", "image", from.Image, "mount", from.Dir)
			if err := storage.SetupReflinkLoop(ctx, from.Image, from.Dir, 0); err != nil {
				return fmt.Errorf("mounting the old storage image %s: %w", from.Image, err)
			}
		} else {
			from.Image = ""
		}
	}
	if _, err := os.Stat(from.Dir); errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	// Spares an earlier server left running there.
	m.sweepPoolDir(ctx, filepath.Join(from.Dir, "pool"))
	mv := &rootMove{m: m, from: from, to: to, pins: map[fileKey]string{}, moved: map[fileKey]string{},
		copier: &storage.Copier{Sync: true, NoReflink: m.copier.NoReflink}}
	if ents, err := os.ReadDir(filepath.Join(from.Dir, "bases")); err == nil {
		for _, e := range ents {
			if k, _, err := statKey(filepath.Join(from.Dir, "bases", e.Name())); err == nil && !strings.HasSuffix(e.Name(), ".tmp") {
				mv.pins[k] = e.Name()
			}
		}
	}
	trees := []string{"golden"}
	users, _ := os.ReadDir(filepath.Join(from.Dir, "users"))
	for _, u := range users {
		if u.IsDir() {
			trees = append(trees, filepath.Join("users", u.Name(), "golden"))
		}
	}
	for _, rel := range trees {
		if err := mv.moveTree(ctx, rel); err != nil {
			return err
		}
	}
	m.removeLeftovers(from.Dir, users)
	if from.Image != "" {
		if err := storage.TeardownReflinkLoop(ctx, from.Dir); err != nil {
			m.log.Warn("cannot unmount the old storage root", "dir", from.Dir, "image", from.Image, "err", err)
		} else {
			m.log.Info("the old storage root's image is no longer used: delete it to free its space", "image", from.Image)
		}
	}
	return nil
}

// removeLeftovers removes from the old root dir what noid had there
// besides goldens: VM and checkpoint directories no VM owns any more
// (the store has none), base images nothing links, and the directories
// that held them, once empty.
func (m *Manager) removeLeftovers(dir string, users []os.DirEntry) {
	for _, u := range users {
		udir := filepath.Join(dir, "users", u.Name())
		for _, sub := range []string{"vms", "checkpoints"} {
			ents, _ := os.ReadDir(filepath.Join(udir, sub))
			for _, e := range ents {
				p := filepath.Join(udir, sub, e.Name())
				m.log.Warn("removing an orphaned directory from the old storage root", "dir", p)
				os.RemoveAll(p)
			}
			os.Remove(filepath.Join(udir, sub))
		}
		os.Remove(udir)
	}
	os.Remove(filepath.Join(dir, "users"))
	ents, _ := os.ReadDir(filepath.Join(dir, "bases"))
	for _, e := range ents {
		os.Remove(filepath.Join(dir, "bases", e.Name()))
	}
	// A move into this root that was cut short and then reverted.
	os.RemoveAll(filepath.Join(dir, movingDir))
	for _, d := range []string{"bases", "pool", "golden"} {
		os.Remove(filepath.Join(dir, d))
	}
	storage.FsyncDir(dir)
}

// moveTree moves the goldens under rel (a golden root: golden/ or
// users/<uid>/golden/), backups included, and removes what it emptied.
func (mv *rootMove) moveTree(ctx context.Context, rel string) error {
	src := filepath.Join(mv.from.Dir, rel)
	ents, err := os.ReadDir(src)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("listing golden snapshots: %w", err)
	}
	// The new root gets a view of its own (see goldenview.go).
	removeGoldenView(src)
	for _, e := range ents {
		name := e.Name()
		switch {
		case !e.IsDir():
		case strings.HasPrefix(name, ".tmp-"):
			// A promotion a crash cut short.
			os.RemoveAll(filepath.Join(src, name))
		case name == ".backup":
			backups, err := os.ReadDir(filepath.Join(src, name))
			if err != nil {
				return fmt.Errorf("listing golden backups: %w", err)
			}
			for _, b := range backups {
				if b.IsDir() {
					if err := mv.moveGolden(ctx, filepath.Join(rel, name, b.Name())); err != nil {
						return err
					}
				}
			}
			os.Remove(filepath.Join(src, name))
		default:
			if err := mv.moveGolden(ctx, filepath.Join(rel, name)); err != nil {
				return err
			}
		}
	}
	os.Remove(src)
	return nil
}

// sameGolden reports whether the golden directories a and b hold the same
// snapshot: the same metadata, written once at promotion.
func sameGolden(a, b string) bool {
	for _, name := range []string{vmm.GoldenConfig, vmm.SnapMeta} {
		x, errA := os.ReadFile(filepath.Join(a, name))
		y, errB := os.ReadFile(filepath.Join(b, name))
		if errA == nil && errB == nil {
			return string(x) == string(y)
		}
		if errA == nil || errB == nil {
			return false
		}
	}
	return false
}

// moveGolden moves the golden (or golden backup) directory rel of the old
// root to the same place in the new one: copied into the new root's
// moving dir, synced, renamed into place, then removed from the old root.
// Where the new root already has another golden of that name, it keeps
// it, and the moved one becomes a backup.
func (mv *rootMove) moveGolden(ctx context.Context, rel string) error {
	src, dst := filepath.Join(mv.from.Dir, rel), filepath.Join(mv.to.Dir, rel)
	owner := mv.owner(ctx, rel)
	done := func() error {
		if err := os.RemoveAll(src); err != nil {
			return fmt.Errorf("removing golden snapshot %s from the old storage root: %w", src, err)
		}
		return storage.FsyncDir(filepath.Dir(src))
	}
	if _, err := os.Lstat(dst); err == nil {
		if sameGolden(src, dst) {
			// Moved by a start that crashed before it removed the old copy.
			mv.m.log.Debug("golden snapshot was moved already: removing the old copy", "user", owner, "golden", rel, "from", src)
			return done()
		}
		bdir := filepath.Join(filepath.Dir(dst), ".backup")
		if filepath.Base(filepath.Dir(dst)) == ".backup" {
			bdir = filepath.Dir(dst)
		}
		prefix := filepath.Base(dst) + "-moved-"
		dst = ""
		ents, _ := os.ReadDir(bdir)
		for _, e := range ents {
			if strings.HasPrefix(e.Name(), prefix) && sameGolden(src, filepath.Join(bdir, e.Name())) {
				return done()
			}
		}
		dst = filepath.Join(bdir, prefix+time.Now().UTC().Format("20060102T150405.000"))
		mv.m.log.Warn("the new storage root has a golden snapshot of that name already: the moved one becomes a backup", "user", owner, "golden", rel, "backup", dst)
	}
	tmpRoot := filepath.Join(mv.to.Dir, movingDir)
	if err := os.MkdirAll(tmpRoot, 0o700); err != nil {
		return fmt.Errorf("creating %s: %w", tmpRoot, err)
	}
	tmp, err := os.MkdirTemp(tmpRoot, "golden-")
	if err != nil {
		return fmt.Errorf("creating a directory to move golden snapshot %s into: %w", rel, err)
	}
	placed := map[fileKey]string{}
	if err := mv.copyTree(ctx, src, tmp, placed); err != nil {
		os.RemoveAll(tmp)
		return fmt.Errorf("copying golden snapshot %s: %w", rel, classifyIOErr("copying it", err))
	}
	if err := mkdirAllSync(mv.to.Dir, filepath.Dir(dst)); err != nil {
		os.RemoveAll(tmp)
		return err
	}
	if err := os.Rename(tmp, dst); err != nil {
		os.RemoveAll(tmp)
		return fmt.Errorf("moving golden snapshot %s into place: %w", rel, err)
	}
	if err := storage.FsyncDir(filepath.Dir(dst)); err != nil {
		return err
	}
	crashpoint("storage.move-after-rename")
	for k, p := range placed {
		mv.moved[k] = dst + strings.TrimPrefix(p, tmp)
	}
	if err := done(); err != nil {
		return err
	}
	mv.m.log.Info("golden snapshot moved to the new storage root", "user", owner, "golden", rel, "from", src, "to", dst)
	return nil
}

// owner names the user a golden under rel belongs to, for the log.
func (mv *rootMove) owner(ctx context.Context, rel string) string {
	parts := strings.Split(rel, string(filepath.Separator))
	if len(parts) < 2 || parts[0] != "users" {
		return "system"
	}
	var id int64
	if _, err := fmt.Sscan(parts[1], &id); err == nil {
		if u, err := mv.m.store.UserByID(ctx, id); err == nil {
			return u.Name
		}
	}
	return "uid " + parts[1]
}

// copyTree recreates the directory src as dst (which exists), placing
// each file with placeFile; placed records the files it copied.
func (mv *rootMove) copyTree(ctx context.Context, src, dst string, placed map[fileKey]string) error {
	fi, err := os.Stat(src)
	if err != nil {
		return err
	}
	if err := os.Chmod(dst, fi.Mode().Perm()); err != nil {
		return err
	}
	ents, err := os.ReadDir(src)
	if err != nil {
		return err
	}
	for _, e := range ents {
		from, to := filepath.Join(src, e.Name()), filepath.Join(dst, e.Name())
		switch {
		case e.IsDir():
			if err := os.Mkdir(to, 0o700); err != nil {
				return err
			}
			if err := mv.copyTree(ctx, from, to, placed); err != nil {
				return err
			}
		case e.Type()&fs.ModeSymlink != 0:
			target, err := os.Readlink(from)
			if err != nil {
				return err
			}
			if err := os.Symlink(target, to); err != nil {
				return err
			}
		case e.Type().IsRegular():
			if err := mv.placeFile(ctx, from, to, placed); err != nil {
				return err
			}
		}
	}
	return storage.FsyncDir(dst)
}

// placeFile makes dst (in the new root) the file src of the old one: a
// link to a file already moved from the same inode, a link to the new
// root's pin of a base image, or a link (same filesystem) or sparse copy
// of its own, synced, with src's owner and mode.
func (mv *rootMove) placeFile(ctx context.Context, src, dst string, placed map[fileKey]string) error {
	k, st, err := statKey(src)
	if err != nil {
		return err
	}
	for _, p := range []string{placed[k], mv.moved[k]} {
		if p != "" && os.Link(p, dst) == nil {
			return nil
		}
	}
	if name, ok := mv.pins[k]; ok {
		pin, err := mv.pin(ctx, src, name, st)
		if err != nil {
			return err
		}
		if pin != "" {
			if err := os.Link(pin, dst); err != nil {
				return err
			}
			mv.moved[k] = pin
			return nil
		}
	}
	if err := mv.linkOrCopy(ctx, src, dst, st); err != nil {
		return err
	}
	placed[k] = dst
	return nil
}

// linkOrCopy makes dst the file src: a hard link on one filesystem, else
// a synced sparse copy with src's owner.
func (mv *rootMove) linkOrCopy(ctx context.Context, src, dst string, st *unix.Stat_t) error {
	err := os.Link(src, dst)
	if err == nil || !errors.Is(err, syscall.EXDEV) {
		return err
	}
	if err := mv.copier.CopyFile(ctx, src, dst); err != nil {
		return err
	}
	if err := os.Lchown(dst, int(st.Uid), int(st.Gid)); err != nil {
		return fmt.Errorf("giving %s its owner: %w", dst, err)
	}
	// chown clears the set-id bits; a golden has none, but keep the mode.
	return os.Chmod(dst, os.FileMode(st.Mode&0o7777))
}

// pin returns the new root's pin of the base image whose old pin is src
// (named name), making it if needed; "" if the new root has a pin of
// that name that is not the same image.
func (mv *rootMove) pin(ctx context.Context, src, name string, st *unix.Stat_t) (string, error) {
	dir := filepath.Join(mv.to.Dir, "bases")
	pin := filepath.Join(dir, name)
	if fi, err := os.Stat(pin); err == nil {
		if fi.Size() != st.Size {
			return "", nil
		}
		return pin, nil
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", err
	}
	tmp := pin + ".tmp"
	os.Remove(tmp)
	if err := mv.linkOrCopy(ctx, src, tmp, st); err != nil {
		os.Remove(tmp)
		return "", fmt.Errorf("moving base image %s: %w", name, err)
	}
	if err := os.Rename(tmp, pin); err != nil {
		os.Remove(tmp)
		return "", fmt.Errorf("moving base image %s: %w", name, err)
	}
	if err := storage.FsyncDir(dir); err != nil {
		return "", err
	}
	mv.m.log.Info("base image moved to the new storage root", "file", pin, "bytes", st.Size)
	return pin, nil
}

// mkdirAllSync creates dir and its missing parents below root with mode
// 0700, syncing each parent so the new entries survive a crash.
func mkdirAllSync(root, dir string) error {
	if dir == root || !strings.HasPrefix(dir, root+string(filepath.Separator)) {
		return nil
	}
	if _, err := os.Stat(dir); err == nil {
		return nil
	}
	if err := mkdirAllSync(root, filepath.Dir(dir)); err != nil {
		return err
	}
	if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("creating %s: %w", dir, err)
	}
	return storage.FsyncDir(filepath.Dir(dir))
}
