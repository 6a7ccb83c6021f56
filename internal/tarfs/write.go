// Package tarfs moves tar streams to and from a file system: Write walks a
// local file or tree into a tar stream and Extract writes a tar stream to
// disk. Both ends of `noid cp` use it: the host client (downloads from a
// VM are extracted here, uploads are written here) and the guest agent
// (the reverse), each with the options that fit its side.
//
// Extract treats the stream as hostile. Nothing it writes lands outside the
// destination:
//
//   - names that are absolute, hold "..", or (with Options.Top) are not the
//     top entry or below it are refused;
//   - every path is resolved inside an os.Root opened on the destination
//     itself (never on its parent), so no symlink, from the archive or
//     already on disk, and no ".." in a link target is followed out of it;
//   - a path through a symlink the archive itself made is refused even
//     where it would stay inside, and so is a hard link to such a path;
//   - an existing non-directory at an entry's path is removed and replaced,
//     never written through; a hard link never shares an inode outside;
//   - devices and fifos are skipped, sparse files (a few stream bytes that
//     would expand to any size on disk) are refused, and content is
//     streamed to disk, never held in memory; a file whose content is cut
//     short is removed.
//
// Modes are limited by Options.Umask, setuid and setgid bits are dropped
// unless Options.KeepSetID, and owners are kept only with
// Options.KeepOwner (the guest agent, as root, like tar run as root).
//
// Go's os.Root (Go 1.24+) does not use openat2 on Linux: it opens one path
// component at a time with O_NOFOLLOW relative to the previous one,
// expands symlinks itself and restarts from the root on "..", failing with
// "path escapes from parent" when a name or link target would leave the
// root. The extractor relies on that for every open, mkdir, link, chmod,
// chown and chtimes.
package tarfs

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"time"
)

// WriteOptions tune Write. The zero value writes src under its own base
// name with root as every entry's owner.
type WriteOptions struct {
	// Name is the archive name of src itself; what is below src is stored
	// as Name/rel. Empty means src's own base name ("." for "/").
	Name string
	// NoTop leaves out the entry of the directory src itself: the archive
	// holds its contents (a "dir/." copy). Name is then ignored.
	NoTop bool
	// KeepOwner stores each entry's numeric owner and group; otherwise
	// every entry belongs to root (0:0). Owner names are never stored.
	KeepOwner bool
	// OnBytes, when set, receives the running total of file content bytes
	// written.
	OnBytes func(total int64)
}

// Write walks the local file or tree src and writes it to w as a tar
// stream (PAX, so modification times keep their nanoseconds). Symlinks
// are stored as links and never followed, src included; sockets, devices
// and fifos are skipped. A file that shrinks while it is read fails the
// write. Write stops when ctx is done.
func Write(ctx context.Context, w io.Writer, src string, opts WriteOptions) error {
	top := opts.Name
	if top == "" {
		if top = filepath.Base(src); top == string(filepath.Separator) {
			top = "."
		}
	}
	tw := tar.NewWriter(w)
	cw := &countWriter{w: tw, onAdd: opts.OnBytes}
	err := filepath.WalkDir(src, func(fp string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if err := ctx.Err(); err != nil {
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
		case opts.NoTop && rel == ".":
			return nil // the directory itself: only its contents
		case opts.NoTop:
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
		hdr.Uname, hdr.Gname = "", ""
		hdr.AccessTime, hdr.ChangeTime = time.Time{}, time.Time{}
		if !opts.KeepOwner {
			hdr.Uid, hdr.Gid = 0, 0
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return fmt.Errorf("%s: %w", fp, err)
		}
		if mode.IsRegular() {
			return writeContent(ctx, cw, fp, hdr.Size)
		}
		return nil
	})
	if err != nil {
		return err
	}
	return tw.Close()
}

// writeContent copies the first size bytes of the file fp to w.
func writeContent(ctx context.Context, w io.Writer, fp string, size int64) error {
	f, err := os.Open(fp)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = io.CopyN(w, ctxReader{ctx, f}, size)
	if errors.Is(err, io.EOF) {
		err = errors.New("the file shrank while it was being copied")
	}
	if err != nil {
		return fmt.Errorf("%s: %w", fp, err)
	}
	return nil
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

// ctxReader fails reads once ctx is done, so a long copy stops.
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}
