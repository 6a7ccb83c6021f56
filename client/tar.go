package client

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
)

// treeSize sums the sizes of the regular files at and below p (symlinks
// are not followed).
func treeSize(p string) (int64, error) {
	var total int64
	err := filepath.WalkDir(p, func(fp string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.Type().IsRegular() {
			fi, err := d.Info()
			if err != nil {
				return err
			}
			total += fi.Size()
		}
		return nil
	})
	return total, err
}

// countWriter reports the running total of bytes written through it.
type countWriter struct {
	w     io.Writer
	n     int64
	onAdd func(total int64)
}

func (c *countWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	if n > 0 && c.onAdd != nil {
		c.onAdd(c.n)
	}
	return n, err
}

// writeLocalTar writes the local file or tree src to w as a tar stream.
// Entry names start with top; an empty top writes the contents of the
// directory src with names relative to it. Symlinks are stored as links;
// sockets, devices and fifos are skipped. Owners are root in the archive,
// modification times keep their nanoseconds (PAX). onBytes receives the
// running total of file content bytes written.
func writeLocalTar(w io.Writer, src, top string, onBytes func(int64)) error {
	tw := tar.NewWriter(w)
	cw := &countWriter{w: tw, onAdd: onBytes}
	err := filepath.WalkDir(src, func(fp string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		mode := fi.Mode()
		if !mode.IsRegular() && !mode.IsDir() && mode&fs.ModeSymlink == 0 {
			return nil // sockets, devices, fifos
		}
		rel, err := filepath.Rel(src, fp)
		if err != nil {
			return err
		}
		rel = filepath.ToSlash(rel)
		var name string
		switch {
		case top == "" && rel == ".":
			return nil // the directory itself: only its contents are copied
		case top == "":
			name = rel
		case rel == ".":
			name = top
		default:
			name = top + "/" + rel
		}
		var link string
		if mode&fs.ModeSymlink != 0 {
			if link, err = os.Readlink(fp); err != nil {
				return err
			}
		}
		hdr, err := tar.FileInfoHeader(fi, link)
		if err != nil {
			return fmt.Errorf("%s: %w", fp, err)
		}
		hdr.Name = name
		if mode.IsDir() {
			hdr.Name += "/"
		}
		hdr.Format = tar.FormatPAX
		hdr.Uid, hdr.Gid, hdr.Uname, hdr.Gname = 0, 0, "", ""
		hdr.AccessTime, hdr.ChangeTime = time.Time{}, time.Time{}
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		if mode.IsRegular() {
			f, err := os.Open(fp)
			if err != nil {
				return err
			}
			_, err = io.CopyN(cw, f, hdr.Size)
			f.Close()
			if errors.Is(err, io.EOF) {
				err = errors.New("the file shrank while it was being copied")
			}
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

// extractor writes a tar stream from a VM (GetFiles) to the local disk.
type extractor struct {
	// onBytes receives the running total of file content bytes written.
	onBytes func(int64)
}

// entryName validates a tar entry name: relative, without "..", cleaned.
// The root itself ("." or "") returns "".
func entryName(name string) (string, error) {
	if name == "" || strings.ContainsRune(name, 0) {
		return "", fmt.Errorf("refusing entry %q: invalid name", name)
	}
	if strings.HasPrefix(name, "/") {
		return "", fmt.Errorf("refusing entry %q: absolute paths are not allowed", name)
	}
	for _, part := range strings.Split(name, "/") {
		if part == ".." {
			return "", fmt.Errorf("refusing entry %q: \"..\" is not allowed", name)
		}
	}
	clean := path.Clean(name)
	if clean == "." {
		return "", nil
	}
	return clean, nil
}

// run extracts the tar stream r, whose entry names all start with srcBase,
// to dst (see CopyFromVM for the rules).
func (x *extractor) run(r io.Reader, srcBase, dst string, contents bool) (*CopyResult, error) {
	tr := tar.NewReader(r)
	first, err := tr.Next()
	if err == io.EOF {
		return nil, errors.New("the VM sent nothing (a socket, device or fifo cannot be copied)")
	}
	if err != nil {
		return nil, fmt.Errorf("reading the archive: %w", err)
	}
	srcIsDir := first.Typeflag == tar.TypeDir
	// under maps an archive name to its place below the extraction root;
	// names outside srcBase are refused.
	under := func(name, newTop string) (string, error) {
		n, err := entryName(name)
		if err != nil {
			return "", err
		}
		head, rest, _ := strings.Cut(n, "/")
		if head != srcBase {
			return "", fmt.Errorf("refusing entry %q: it is not below %q", name, srcBase)
		}
		if newTop == "" {
			return rest, nil
		}
		if rest == "" {
			return newTop, nil
		}
		return newTop + "/" + rest, nil
	}
	var dir, top string
	var mapName func(string) (string, error)
	if contents {
		if !srcIsDir {
			return nil, fmt.Errorf("%s is not a directory, so it has no contents to copy", srcBase)
		}
		dir = dst
		mapName = func(n string) (string, error) { return under(n, "") }
	} else {
		into := strings.HasSuffix(dst, "/") || strings.HasSuffix(dst, string(filepath.Separator)+".") || dst == "."
		fi, err := os.Stat(dst)
		switch {
		case err == nil && fi.IsDir():
			into = true
		case err == nil && srcIsDir:
			return nil, fmt.Errorf("cannot overwrite non-directory %s with a directory", dst)
		case err != nil && !errors.Is(err, fs.ErrNotExist):
			return nil, err
		}
		if into {
			dir, top = dst, srcBase
		} else {
			dir, top = filepath.Dir(dst), filepath.Base(dst)
		}
		newTop := top
		mapName = func(n string) (string, error) { return under(n, newTop) }
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("creating %s: %w", dir, err)
	}
	root, err := os.OpenRoot(dir)
	if err != nil {
		return nil, fmt.Errorf("opening %s: %w", dir, err)
	}
	defer root.Close()
	res := &CopyResult{Dest: filepath.Join(dir, top)}
	type dirMeta struct {
		name  string
		mode  os.FileMode
		mtime time.Time
	}
	var dirs []dirMeta
	finishDirs := func() error {
		// Last, and deepest first: creating entries inside a directory
		// changes its mtime, and a read-only mode would stop them.
		for i := len(dirs) - 1; i >= 0; i-- {
			if err := root.Chmod(dirs[i].name, dirs[i].mode); err != nil {
				return err
			}
			if err := root.Chtimes(dirs[i].name, dirs[i].mtime, dirs[i].mtime); err != nil {
				return err
			}
		}
		return nil
	}
	cw := &countWriter{w: io.Discard, onAdd: x.onBytes}
	for hdr := first; ; {
		name, err := mapName(hdr.Name)
		if err != nil {
			return res, err
		}
		rootName := name
		if rootName == "" {
			rootName = "."
		}
		// No setuid or setgid bits from a VM on the host.
		mode := os.FileMode(hdr.Mode).Perm()
		if hdr.Mode&0o1000 != 0 {
			mode |= os.ModeSticky
		}
		if name != "" {
			if parent := path.Dir(name); parent != "." {
				if err := root.MkdirAll(parent, 0o755); err != nil {
					return res, fmt.Errorf("entry %q: creating its directory: %w", hdr.Name, err)
				}
			}
		}
		counted := true
		switch hdr.Typeflag {
		case tar.TypeDir:
			if name == "" {
				counted = false // the contents' root: dst itself keeps its mode
				break
			}
			if fi, err := root.Lstat(rootName); err == nil && !fi.IsDir() {
				if err := root.Remove(rootName); err != nil {
					return res, fmt.Errorf("entry %q: replacing: %w", hdr.Name, err)
				}
			}
			if err := root.Mkdir(rootName, 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
				return res, fmt.Errorf("entry %q: %w", hdr.Name, err)
			}
			if err := root.Chmod(rootName, 0o700|mode); err != nil {
				return res, fmt.Errorf("entry %q: %w", hdr.Name, err)
			}
			dirs = append(dirs, dirMeta{rootName, mode, hdr.ModTime})
		case tar.TypeReg:
			if name == "" {
				return res, fmt.Errorf("refusing entry %q: not a file name", hdr.Name)
			}
			if err := removeNonDir(root, name); err != nil {
				return res, fmt.Errorf("entry %q: %w", hdr.Name, err)
			}
			f, err := root.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
			if err != nil {
				return res, fmt.Errorf("entry %q: %w", hdr.Name, err)
			}
			cw.w = f
			n, err := io.Copy(cw, tr)
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
				return res, fmt.Errorf("refusing entry %q: bad symlink", hdr.Name)
			}
			if err := removeNonDir(root, name); err != nil {
				return res, fmt.Errorf("entry %q: %w", hdr.Name, err)
			}
			// The link may point anywhere; nothing is written through it,
			// because root refuses paths that leave it.
			if err := root.Symlink(hdr.Linkname, name); err != nil {
				return res, fmt.Errorf("entry %q: %w", hdr.Name, err)
			}
		case tar.TypeLink:
			target, err := mapName(hdr.Linkname)
			if err != nil || target == "" || name == "" {
				return res, fmt.Errorf("refusing entry %q: bad hard link target %q", hdr.Name, hdr.Linkname)
			}
			if err := removeNonDir(root, name); err != nil {
				return res, fmt.Errorf("entry %q: %w", hdr.Name, err)
			}
			if err := root.Link(target, name); err != nil {
				return res, fmt.Errorf("entry %q: %w", hdr.Name, err)
			}
		default:
			counted = false // devices, fifos, PAX globals: skipped
		}
		if counted {
			res.Entries++
		}
		hdr, err = tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return res, fmt.Errorf("reading the archive: %w", err)
		}
	}
	if err := finishDirs(); err != nil {
		return res, err
	}
	return res, nil
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
		return errors.New("a directory is in the way")
	}
	return root.Remove(name)
}
