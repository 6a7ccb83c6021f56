package guest

import (
	"archive/tar"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strings"
	"time"

	"github.com/noid-vm/noid/internal/agent/proto"
)

// runPut extracts the tar stream the host sends on stdin into req.Dir.
func (s *session) runPut(h *handler, req proto.PutRequest) {
	res, err := extractTar(req.Dir, h.st.Reader(proto.ChanStdin), os.Geteuid() == 0)
	e := proto.Exit{Result: proto.Marshal(res)}
	if err != nil {
		e.Code, e.Error = 1, err.Error()
		s.a.log.Warn("put failed", "dir", req.Dir, "err", err)
	} else {
		s.a.log.Info("put", "dir", req.Dir, "entries", res.Entries, "bytes", res.Bytes)
	}
	s.finish(h, e)
}

// runGet sends req.Path as a tar stream on stdout.
func (s *session) runGet(h *handler, req proto.GetRequest) {
	w := h.st.Writer(proto.ChanStdout)
	err := writeTar(req.Path, w)
	if err == nil {
		err = w.Close()
	}
	e := proto.Exit{}
	if err != nil {
		e.Code, e.Error = 1, err.Error()
		s.a.log.Warn("get failed", "path", req.Path, "err", err)
	}
	s.finish(h, e)
}

// entryName validates a tar entry name and returns it relative to the
// extraction root. Absolute names and names with ".." are refused; "." and
// "" (the root itself) return "".
func entryName(name string) (string, error) {
	if name == "" || strings.ContainsRune(name, 0) {
		return "", fmt.Errorf("invalid entry name %q", name)
	}
	if strings.HasPrefix(name, "/") {
		return "", fmt.Errorf("entry %q: absolute paths are refused", name)
	}
	for _, part := range strings.Split(name, "/") {
		if part == ".." {
			return "", fmt.Errorf("entry %q: \"..\" is refused", name)
		}
	}
	clean := path.Clean(name)
	if clean == "." {
		return "", nil
	}
	return clean, nil
}

// extractTar writes the tar stream r into dir, which is created if missing.
// All file system access goes through an os.Root, so neither ".." nor a
// symlink (from the archive or already on disk) can make it write outside
// dir. An existing non-directory at an entry's path is replaced. Modes,
// modification times and (with chown) ownership are kept.
func extractTar(dir string, r io.Reader, chown bool) (proto.PutResult, error) {
	var res proto.PutResult
	if !filepath.IsAbs(dir) {
		return res, fmt.Errorf("destination %q is not absolute", dir)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return res, fmt.Errorf("creating %s: %w", dir, err)
	}
	root, err := os.OpenRoot(dir)
	if err != nil {
		return res, fmt.Errorf("opening %s: %w", dir, err)
	}
	defer root.Close()
	type dirTime struct {
		name  string
		mtime time.Time
	}
	var dirs []dirTime
	defer func() {
		// Directory times last: creating entries inside changes them.
		for i := len(dirs) - 1; i >= 0; i-- {
			_ = root.Chtimes(dirs[i].name, dirs[i].mtime, dirs[i].mtime)
		}
	}()
	tr := tar.NewReader(r)
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			return res, nil
		}
		if err != nil {
			return res, fmt.Errorf("reading tar stream: %w", err)
		}
		name, err := entryName(hdr.Name)
		if err != nil {
			return res, err
		}
		rootName := name
		if rootName == "" {
			rootName = "."
		}
		mode := os.FileMode(hdr.Mode).Perm() | tarSpecialBits(hdr.Mode)
		if name != "" {
			if parent := path.Dir(name); parent != "." {
				if err := root.MkdirAll(parent, 0o755); err != nil {
					return res, fmt.Errorf("entry %q: creating parent: %w", hdr.Name, err)
				}
			}
		}
		switch hdr.Typeflag {
		case tar.TypeDir:
			if fi, err := root.Lstat(rootName); err == nil && !fi.IsDir() {
				if err := root.Remove(rootName); err != nil {
					return res, fmt.Errorf("entry %q: replacing: %w", hdr.Name, err)
				}
			}
			if err := root.Mkdir(rootName, 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
				return res, fmt.Errorf("entry %q: %w", hdr.Name, err)
			}
			if err := root.Chmod(rootName, mode); err != nil {
				return res, fmt.Errorf("entry %q: %w", hdr.Name, err)
			}
			dirs = append(dirs, dirTime{rootName, hdr.ModTime})
		case tar.TypeReg:
			if name == "" {
				return res, fmt.Errorf("entry %q: not a file name", hdr.Name)
			}
			if err := removeNonDir(root, name); err != nil {
				return res, fmt.Errorf("entry %q: %w", hdr.Name, err)
			}
			f, err := root.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
			if err != nil {
				return res, fmt.Errorf("entry %q: %w", hdr.Name, err)
			}
			n, err := io.Copy(f, tr)
			res.Bytes += n
			if err == nil {
				err = f.Chmod(mode)
			}
			if cerr := f.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				return res, fmt.Errorf("entry %q: %w", hdr.Name, err)
			}
			if err := root.Chtimes(name, hdr.ModTime, hdr.ModTime); err != nil {
				return res, fmt.Errorf("entry %q: %w", hdr.Name, err)
			}
		case tar.TypeSymlink:
			if name == "" || hdr.Linkname == "" {
				return res, fmt.Errorf("entry %q: bad symlink", hdr.Name)
			}
			if err := removeNonDir(root, name); err != nil {
				return res, fmt.Errorf("entry %q: %w", hdr.Name, err)
			}
			// The link itself may point anywhere; later entries cannot be
			// written through it because root refuses escaping paths.
			if err := root.Symlink(hdr.Linkname, name); err != nil {
				return res, fmt.Errorf("entry %q: %w", hdr.Name, err)
			}
		case tar.TypeLink:
			target, err := entryName(hdr.Linkname)
			if err != nil || target == "" || name == "" {
				return res, fmt.Errorf("entry %q: bad hard link target %q", hdr.Name, hdr.Linkname)
			}
			if err := removeNonDir(root, name); err != nil {
				return res, fmt.Errorf("entry %q: %w", hdr.Name, err)
			}
			if err := root.Link(target, name); err != nil {
				return res, fmt.Errorf("entry %q: %w", hdr.Name, err)
			}
		default:
			continue // devices, fifos, PAX globals: skipped
		}
		if chown && name != "" && hdr.Typeflag != tar.TypeLink { // a hard link shares its target's inode
			_ = root.Lchown(rootName, hdr.Uid, hdr.Gid)
			if hdr.Typeflag != tar.TypeSymlink && hdr.Typeflag != tar.TypeDir {
				// chown clears set-id bits; restore the mode.
				_ = root.Chmod(rootName, mode)
			}
		}
		res.Entries++
	}
}

func tarSpecialBits(m int64) os.FileMode {
	var mode os.FileMode
	if m&0o4000 != 0 {
		mode |= os.ModeSetuid
	}
	if m&0o2000 != 0 {
		mode |= os.ModeSetgid
	}
	if m&0o1000 != 0 {
		mode |= os.ModeSticky
	}
	return mode
}

// removeNonDir removes whatever non-directory sits at name, so a new entry
// replaces it instead of writing through it.
func removeNonDir(root *os.Root, name string) error {
	fi, err := root.Lstat(name)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if fi.IsDir() {
		return fmt.Errorf("a directory is in the way")
	}
	return root.Remove(name)
}

// writeTar writes p (a file, symlink or directory tree) to w as a tar
// stream whose names start with p's base name. Symlinks are stored as
// links, never followed.
func writeTar(p string, w io.Writer) error {
	if !filepath.IsAbs(p) {
		return fmt.Errorf("path %q is not absolute", p)
	}
	p = filepath.Clean(p)
	if _, err := os.Lstat(p); err != nil {
		return err
	}
	parent := filepath.Dir(p)
	tw := tar.NewWriter(w)
	err := filepath.WalkDir(p, func(fp string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		var link string
		if fi.Mode()&fs.ModeSymlink != 0 {
			if link, err = os.Readlink(fp); err != nil {
				return err
			}
		}
		hdr, err := tar.FileInfoHeader(fi, link)
		if err != nil {
			return fmt.Errorf("%s: %w", fp, err)
		}
		rel, err := filepath.Rel(parent, fp)
		if err != nil {
			return err
		}
		if p == "/" {
			rel = "."
		}
		hdr.Name = filepath.ToSlash(rel)
		if fi.IsDir() {
			hdr.Name += "/"
		}
		hdr.Uname, hdr.Gname = "", ""
		hdr.Format = tar.FormatPAX // keeps sub-second mtimes
		if !fi.Mode().IsRegular() && !fi.IsDir() && fi.Mode()&fs.ModeSymlink == 0 {
			return nil // sockets, devices, fifos
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		if fi.Mode().IsRegular() {
			f, err := os.Open(fp)
			if err != nil {
				return err
			}
			_, err = io.CopyN(tw, f, hdr.Size)
			f.Close()
			if err != nil {
				return fmt.Errorf("%s: %w", fp, err)
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	return tw.Close()
}
