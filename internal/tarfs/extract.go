package tarfs

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strings"
	"syscall"
)

// Options tune Extract. The zero value extracts every entry below the
// destination directory with the archive's modes less setuid and setgid,
// owned by the extracting process.
type Options struct {
	// Top, when set, is the name of the one file or tree the stream holds:
	// its first entry must be Top and every later one below it (Top/...).
	// A directory Top becomes the destination directory itself and Top/x
	// lands at x in it; any other Top (a file or a symlink) becomes the
	// destination and must be the only entry. When empty, entry names are
	// relative to the destination, a directory ("." or "./" is the
	// directory itself).
	Top string
	// Contents, with Top, extracts what is below the directory Top into the
	// destination directory, which keeps its own mode, owner and times (a
	// "dir/." copy). A Top that is not a directory fails.
	Contents bool
	// Umask holds the permission bits never given to anything Extract makes
	// or changes; the host passes its process umask. Directories made for
	// entries whose own directory entry is missing get 0755 less the
	// process umask.
	Umask fs.FileMode
	// KeepSetID keeps setuid and setgid bits; otherwise they are dropped.
	// The sticky bit is kept either way.
	KeepSetID bool
	// KeepOwner gives each entry the archive's numeric owner and group,
	// like tar run as root; otherwise entries belong to the extracting
	// process. Failures to change an owner are ignored, as tar does.
	KeepOwner bool
	// OnBytes, when set, receives the running total of file content bytes
	// written.
	OnBytes func(total int64)
}

// Result reports what Extract wrote.
type Result struct {
	// Entries counts the files, directories and links written.
	Entries int
	// Bytes counts the file content bytes written.
	Bytes int64
}

// ErrEmpty is returned by Extract with Options.Top when the stream holds
// no entry it could extract (an empty stream, or only a device or fifo).
var ErrEmpty = errors.New("the archive holds nothing to extract")

// Extract writes the tar stream r to dst and reports what it wrote.
//
// Without Options.Top, dst is a directory, made with its parents when
// missing, and every entry lands below it. With Top (see Options.Top), a
// directory Top needs a directory at dst: a missing one is made (its
// parents too) and a symlink there is replaced, never followed, while any
// other non-directory fails; a file or symlink Top replaces a non-directory
// at dst and fails on a directory.
//
// Entries are refused as the package documentation says. The first
// refused or failing entry ends the extraction with an error; what was
// written before it stays. Directory modes and times are set last (so a
// read-only directory still receives its entries), also after an error.
// Extract stops when ctx is done.
func Extract(ctx context.Context, dst string, r io.Reader, opts Options) (Result, error) {
	x := &extraction{ctx: ctx, opts: opts, tr: tar.NewReader(r), links: map[string]bool{},
		cw: &countWriter{onAdd: opts.OnBytes}}
	dst = filepath.Clean(dst)
	var first *tar.Header
	if opts.Top != "" {
		if opts.Top == "." || opts.Top == ".." || strings.ContainsAny(opts.Top, "/\x00") {
			return x.res, fmt.Errorf("tarfs: bad top name %q", opts.Top)
		}
		// The top becomes dst itself: dst must name something in its
		// parent directory.
		if base := filepath.Base(dst); base == "." || base == ".." || base == string(filepath.Separator) {
			return x.res, fmt.Errorf("bad destination %q: it names no entry of a directory", dst)
		}
		var err error
		if first, err = x.next(); err == io.EOF {
			return x.res, ErrEmpty
		} else if err != nil {
			return x.res, err
		}
		if name, err := entryName(first.Name); err != nil || name != opts.Top {
			return x.res, refuse(first.Name, fmt.Sprintf("the archive must start with %q", opts.Top))
		}
		if first.Typeflag != tar.TypeDir {
			if opts.Contents {
				return x.res, fmt.Errorf("%s is not a directory, so it has no contents to copy", opts.Top)
			}
			return x.res, x.single(dst, first)
		}
	}
	root, err := openDest(dst, opts.Top != "" && !opts.Contents)
	if err != nil {
		return x.res, err
	}
	defer root.Close()
	x.root = root
	err = x.tree(first)
	if ferr := x.finishDirs(); err == nil {
		err = ferr
	}
	return x.res, err
}

// openDest opens the destination directory dst as the extraction root.
// A shared dst (the guest's upload directory, a contents copy) is made
// with its parents when missing, following symlinks in its path as the
// caller named it. An own dst (a directory Top) is made, or checked to be
// a directory, without following a symlink at dst itself: one there is
// replaced.
func openDest(dst string, own bool) (*os.Root, error) {
	if !own {
		if err := os.MkdirAll(dst, 0o755); err != nil {
			return nil, fmt.Errorf("making %s: %w", dst, err)
		}
		root, err := os.OpenRoot(dst)
		if err != nil {
			return nil, fmt.Errorf("opening %s: %w", dst, err)
		}
		return root, nil
	}
	parent, base := filepath.Dir(dst), filepath.Base(dst)
	if err := os.MkdirAll(parent, 0o755); err != nil {
		return nil, fmt.Errorf("making %s: %w", parent, err)
	}
	proot, err := os.OpenRoot(parent)
	if err != nil {
		return nil, fmt.Errorf("opening %s: %w", parent, err)
	}
	defer proot.Close()
	fi, err := proot.Lstat(base)
	switch {
	case err == nil && fi.IsDir():
	case err == nil && fi.Mode()&fs.ModeSymlink == 0:
		return nil, fmt.Errorf("cannot overwrite non-directory %s with a directory", dst)
	case err == nil:
		if err := proot.Remove(base); err != nil {
			return nil, fmt.Errorf("replacing the symlink %s: %w", dst, err)
		}
		fallthrough
	case errors.Is(err, fs.ErrNotExist):
		// Private until the archive's mode for it is set at the end.
		if err := proot.Mkdir(base, 0o700); err != nil {
			return nil, fmt.Errorf("making %s: %w", dst, err)
		}
	default:
		return nil, fmt.Errorf("%s: %w", dst, err)
	}
	root, err := proot.OpenRoot(base)
	if err != nil {
		return nil, fmt.Errorf("opening %s: %w", dst, err)
	}
	// Nothing swapped a symlink in between: the root is the directory at
	// dst itself.
	in, err1 := root.Stat(".")
	at, err2 := proot.Lstat(base)
	if err1 != nil || err2 != nil || !os.SameFile(in, at) {
		root.Close()
		return nil, fmt.Errorf("opening %s: it changed while being opened", dst)
	}
	return root, nil
}

// extraction is the state of one Extract.
type extraction struct {
	ctx  context.Context
	opts Options
	tr   *tar.Reader
	root *os.Root
	res  Result
	cw   *countWriter
	// links holds the names of the symlinks this archive made: later
	// paths through them are refused.
	links map[string]bool
	// dirs are the directory entries, in archive order; their modes and
	// times are set last.
	dirs []dirEntry
}

type dirEntry struct {
	name string
	hdr  *tar.Header
}

// next returns the next header, skipping PAX global headers.
func (x *extraction) next() (*tar.Header, error) {
	for {
		if err := x.ctx.Err(); err != nil {
			return nil, err
		}
		hdr, err := x.tr.Next()
		if err == io.EOF {
			return nil, err
		}
		if err != nil {
			return nil, fmt.Errorf("reading the archive: %w", err)
		}
		if hdr.Typeflag != tar.TypeXGlobalHeader {
			return hdr, nil
		}
	}
}

// tree extracts every entry (first, when not nil, then the rest of the
// stream) below the root.
func (x *extraction) tree(first *tar.Header) error {
	for hdr := first; ; hdr = nil {
		if hdr == nil {
			var err error
			if hdr, err = x.next(); err == io.EOF {
				return nil
			} else if err != nil {
				return err
			}
		}
		if err := x.entry(hdr); err != nil {
			return err
		}
	}
}

// single writes the one file or symlink of a non-directory Top at dst and
// refuses anything after it.
func (x *extraction) single(dst string, hdr *tar.Header) error {
	switch {
	case isSparse(hdr):
		return refuse(hdr.Name, "sparse files are not supported")
	case hdr.Typeflag == tar.TypeLink:
		return refuse(hdr.Name, fmt.Sprintf("bad hard link target %q", hdr.Linkname))
	case hdr.Typeflag != tar.TypeReg && hdr.Typeflag != tar.TypeSymlink:
		return fmt.Errorf("%q is a device or fifo: %w", hdr.Name, ErrEmpty)
	}
	parent, base := filepath.Dir(dst), filepath.Base(dst)
	if err := os.MkdirAll(parent, 0o755); err != nil {
		return fmt.Errorf("making %s: %w", parent, err)
	}
	root, err := os.OpenRoot(parent)
	if err != nil {
		return fmt.Errorf("opening %s: %w", parent, err)
	}
	defer root.Close()
	x.root = root
	if hdr.Typeflag == tar.TypeReg {
		err = x.file(base, hdr)
	} else {
		err = x.symlink(base, hdr)
	}
	if err != nil {
		return err
	}
	x.res.Entries++
	more, err := x.next()
	if err == io.EOF {
		return nil
	}
	if err != nil {
		return err
	}
	return refuse(more.Name, fmt.Sprintf("%q is a single file, nothing else may come with it", x.opts.Top))
}

// entry extracts one entry below the root.
func (x *extraction) entry(hdr *tar.Header) error {
	name, err := x.mapName(hdr.Name)
	if err != nil {
		return err
	}
	if isSparse(hdr) {
		return refuse(hdr.Name, "sparse files are not supported")
	}
	switch hdr.Typeflag {
	case tar.TypeDir, tar.TypeReg, tar.TypeSymlink, tar.TypeLink:
	default:
		return nil // devices, fifos and unknown types are skipped
	}
	if name == "" {
		if hdr.Typeflag != tar.TypeDir {
			return refuse(hdr.Name, "only a directory can stand for the destination itself")
		}
		if x.opts.Contents {
			return nil // the destination keeps its own mode and times
		}
		if err := x.root.Chmod(".", x.mode(hdr)|0o700); err != nil {
			return fmt.Errorf("entry %q: %w", hdr.Name, err)
		}
		x.dirs = append(x.dirs, dirEntry{".", hdr})
		x.res.Entries++
		return nil
	}
	if l := x.madeLink(name); l != "" {
		return refuse(hdr.Name, fmt.Sprintf("it is below %q, a symlink from the archive", l))
	}
	if parent := path.Dir(name); parent != "." {
		if err := x.root.MkdirAll(parent, 0o755); err != nil {
			return fmt.Errorf("entry %q: making its directory: %w", hdr.Name, err)
		}
	}
	switch hdr.Typeflag {
	case tar.TypeDir:
		err = x.dir(name, hdr)
	case tar.TypeReg:
		err = x.file(name, hdr)
	case tar.TypeSymlink:
		err = x.symlink(name, hdr)
	case tar.TypeLink:
		err = x.hardLink(name, hdr)
	}
	if err != nil {
		return err
	}
	x.res.Entries++
	return nil
}

// dir makes the directory name (or keeps the one there), writable by its
// owner until finishDirs gives it its mode.
func (x *extraction) dir(name string, hdr *tar.Header) error {
	fi, err := x.root.Lstat(name)
	switch {
	case err == nil && fi.IsDir():
	case err == nil:
		if err := x.root.Remove(name); err != nil {
			return fmt.Errorf("entry %q: replacing: %w", hdr.Name, err)
		}
		delete(x.links, name)
		fallthrough
	case errors.Is(err, fs.ErrNotExist):
		if err := x.root.Mkdir(name, 0o700); err != nil {
			return fmt.Errorf("entry %q: %w", hdr.Name, err)
		}
	default:
		return fmt.Errorf("entry %q: %w", hdr.Name, err)
	}
	if err := x.root.Chmod(name, x.mode(hdr)|0o700); err != nil {
		return fmt.Errorf("entry %q: %w", hdr.Name, err)
	}
	x.dirs = append(x.dirs, dirEntry{name, hdr})
	return nil
}

// file writes the regular file name from the stream. A file cut short is
// removed.
func (x *extraction) file(name string, hdr *tar.Header) error {
	flags := os.O_WRONLY | os.O_CREATE | os.O_EXCL
	inPlace := false
	if err := x.clear(name, hdr); errors.Is(err, errMountedFile) {
		// Something is mounted over the file (the guest's init keeps
		// /etc/hosts in memory so): it cannot be replaced, only rewritten.
		flags, inPlace = os.O_WRONLY|os.O_TRUNC, true
	} else if err != nil {
		return err
	}
	f, err := x.root.OpenFile(name, flags, 0o600)
	if err != nil {
		return fmt.Errorf("entry %q: %w", hdr.Name, err)
	}
	x.cw.w = f
	n, err := io.Copy(x.cw, ctxReader{x.ctx, x.tr})
	x.res.Bytes += n
	if err == nil && x.opts.KeepOwner {
		_ = f.Chown(hdr.Uid, hdr.Gid) // before Chmod: chown clears set-id bits
	}
	if err == nil {
		err = f.Chmod(x.mode(hdr))
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = x.root.Chtimes(name, hdr.ModTime, hdr.ModTime)
	}
	if err != nil {
		if !inPlace {
			_ = x.root.Remove(name)
		}
		return fmt.Errorf("entry %q: %w", hdr.Name, err)
	}
	return nil
}

// symlink makes the symlink name. Its target may point anywhere: nothing
// is ever resolved through it out of the root, nor through it at all by a
// later entry.
func (x *extraction) symlink(name string, hdr *tar.Header) error {
	if hdr.Linkname == "" || strings.ContainsRune(hdr.Linkname, 0) {
		return refuse(hdr.Name, "bad symlink")
	}
	if err := x.clear(name, hdr); err != nil {
		return err
	}
	if err := x.root.Symlink(hdr.Linkname, name); err != nil {
		return fmt.Errorf("entry %q: %w", hdr.Name, err)
	}
	x.links[name] = true
	if x.opts.KeepOwner {
		_ = x.root.Lchown(name, hdr.Uid, hdr.Gid)
	}
	return nil
}

// hardLink links name to an earlier entry of the archive (or a file
// already below the root). The link shares the target's inode, mode and
// owner; a link to a symlink is itself a symlink of the archive.
func (x *extraction) hardLink(name string, hdr *tar.Header) error {
	target, err := x.mapName(hdr.Linkname)
	if err != nil || target == "" {
		return refuse(hdr.Name, fmt.Sprintf("bad hard link target %q", hdr.Linkname))
	}
	if l := x.madeLink(target); l != "" {
		return refuse(hdr.Name, fmt.Sprintf("bad hard link target %q: it is below %q, a symlink from the archive", hdr.Linkname, l))
	}
	if err := x.clear(name, hdr); err != nil {
		return err
	}
	if err := x.root.Link(target, name); err != nil {
		return fmt.Errorf("entry %q: %w", hdr.Name, err)
	}
	if fi, err := x.root.Lstat(name); err != nil || fi.Mode()&fs.ModeSymlink != 0 {
		x.links[name] = true
	}
	return nil
}

// clear removes the non-directory at name, if any, so that a new entry
// replaces it instead of writing through it.
func (x *extraction) clear(name string, hdr *tar.Header) error {
	fi, err := x.root.Lstat(name)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("entry %q: %w", hdr.Name, err)
	}
	if fi.IsDir() {
		return fmt.Errorf("entry %q: a directory is in the way", hdr.Name)
	}
	if err := x.root.Remove(name); err != nil {
		if errors.Is(err, syscall.EBUSY) && fi.Mode().IsRegular() {
			return fmt.Errorf("entry %q: %w", hdr.Name, errMountedFile)
		}
		return fmt.Errorf("entry %q: replacing: %w", hdr.Name, err)
	}
	delete(x.links, name)
	return nil
}

// errMountedFile is clear's error for a regular file that cannot be
// removed because something is mounted over it.
var errMountedFile = errors.New("a file is mounted over it")

// finishDirs gives the directory entries their owners, modes and times,
// deepest last-listed first: entries made inside a directory change its
// time, and a read-only mode would have stopped them.
func (x *extraction) finishDirs() error {
	var first error
	for i := len(x.dirs) - 1; i >= 0; i-- {
		d := x.dirs[i]
		if x.opts.KeepOwner {
			_ = x.root.Lchown(d.name, d.hdr.Uid, d.hdr.Gid)
		}
		err := x.root.Chmod(d.name, x.mode(d.hdr))
		if err == nil {
			err = x.root.Chtimes(d.name, d.hdr.ModTime, d.hdr.ModTime)
		}
		if err != nil && first == nil {
			first = fmt.Errorf("entry %q: %w", d.hdr.Name, err)
		}
	}
	return first
}

// mode is the mode an entry gets: its permission bits less the umask,
// sticky, and setuid and setgid with KeepSetID.
func (x *extraction) mode(hdr *tar.Header) fs.FileMode {
	m := fs.FileMode(hdr.Mode).Perm() &^ x.opts.Umask.Perm()
	if hdr.Mode&0o1000 != 0 {
		m |= fs.ModeSticky
	}
	if x.opts.KeepSetID && hdr.Mode&0o4000 != 0 {
		m |= fs.ModeSetuid
	}
	if x.opts.KeepSetID && hdr.Mode&0o2000 != 0 {
		m |= fs.ModeSetgid
	}
	return m
}

// mapName checks an archive name and returns where it lands below the
// root ("" for the root itself).
func (x *extraction) mapName(name string) (string, error) {
	n, err := entryName(name)
	if err != nil || x.opts.Top == "" {
		return n, err
	}
	head, rest, _ := strings.Cut(n, "/")
	if head != x.opts.Top {
		return "", refuse(name, fmt.Sprintf("it is not below %q", x.opts.Top))
	}
	return rest, nil
}

// madeLink returns the first proper prefix of name that is a symlink this
// archive made, or "".
func (x *extraction) madeLink(name string) string {
	for i := range len(name) {
		if name[i] == '/' && x.links[name[:i]] {
			return name[:i]
		}
	}
	return ""
}

// entryName checks a tar entry name: relative, without ".." or NUL, and
// returns it cleaned; the root itself ("." or "./") is "".
func entryName(name string) (string, error) {
	if name == "" || strings.ContainsRune(name, 0) {
		return "", refuse(name, "invalid name")
	}
	if strings.HasPrefix(name, "/") {
		return "", refuse(name, "absolute paths are not allowed")
	}
	for _, part := range strings.Split(name, "/") {
		if part == ".." {
			return "", refuse(name, `".." is not allowed`)
		}
	}
	clean := path.Clean(name)
	if clean == "." {
		return "", nil
	}
	return clean, nil
}

// refuse is the error of an entry that Extract will not write.
func refuse(name, why string) error {
	return fmt.Errorf("refusing entry %q: %s", name, why)
}

// isSparse reports a GNU sparse file (old 'S' type or PAX records): its
// few stream bytes may stand for any size on disk.
func isSparse(hdr *tar.Header) bool {
	if hdr.Typeflag == tar.TypeGNUSparse {
		return true
	}
	for k := range hdr.PAXRecords {
		if strings.HasPrefix(k, "GNU.sparse.") {
			return true
		}
	}
	return false
}
