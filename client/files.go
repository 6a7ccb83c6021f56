package client

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"net/url"
	"os"
	"path"
	"path/filepath"
	"strings"
	"sync"

	"github.com/noid-vm/noid/internal/api"
	"github.com/noid-vm/noid/internal/tarfs"
)

type (
	// FileInfo describes a path in a VM (StatFile).
	FileInfo = api.FileInfo
	// PutFilesResult reports what PutFiles wrote.
	PutFilesResult = api.PutFilesResult
)

// PutFiles extracts the tar stream read from tarStream into dir (an
// absolute path, created if missing) in vm. Modes and modification times
// are kept. Entries that would land outside dir (absolute names, "..", or
// through a symlink) make the upload fail with ErrInvalidArgument; entries
// before the bad one stay.
func (c *Client) PutFiles(ctx context.Context, vm, dir string, tarStream io.Reader) (*PutFilesResult, error) {
	q := url.Values{"dir": {dir}}
	body := &trackedReader{r: tarStream}
	resp, err := c.raw(ctx, "PUT", vmPath(vm, "/files", q), body, "application/x-tar")
	if err != nil {
		if rerr := body.readErr(); rerr != nil {
			return nil, rerr // the local side failed, not the server
		}
		return nil, err
	}
	defer resp.Body.Close()
	var res PutFilesResult
	if err := json.NewDecoder(resp.Body).Decode(&res); err != nil {
		return nil, fmt.Errorf("decoding the answer to an upload into %s:%s: %w", vm, dir, err)
	}
	return &res, nil
}

// trackedReader remembers the first error of the reader it wraps, so a
// failing local source is reported as itself rather than as a broken
// request.
type trackedReader struct {
	r   io.Reader
	mu  sync.Mutex
	err error
}

func (t *trackedReader) Read(p []byte) (int, error) {
	n, err := t.r.Read(p)
	if err != nil && err != io.EOF {
		t.mu.Lock()
		if t.err == nil {
			t.err = err
		}
		t.mu.Unlock()
	}
	return n, err
}

func (t *trackedReader) readErr() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.err
}

// GetFiles returns a tar stream of p (an absolute path) in vm: a file, or a
// directory with everything below it. Symlinks are stored as links, never
// followed, and entry names start with p's base name. A missing path fails
// here with ErrNotFound; a failure during the transfer is returned by Read
// instead of io.EOF. Close the reader when done.
func (c *Client) GetFiles(ctx context.Context, vm, p string) (io.ReadCloser, error) {
	q := url.Values{"path": {p}}
	resp, err := c.raw(ctx, "GET", vmPath(vm, "/files", q), nil, "")
	if err != nil {
		return nil, err
	}
	return &trailerReader{resp: resp, what: vm + ":" + p}, nil
}

// trailerReader turns the error trailer of a file download into a read
// error.
type trailerReader struct {
	resp *http.Response
	what string
}

func (t *trailerReader) Read(p []byte) (int, error) {
	n, err := t.resp.Body.Read(p)
	if err == io.EOF {
		if msg := t.resp.Trailer.Get(api.FilesErrorTrailer); msg != "" {
			return n, fmt.Errorf("%w: downloading %s: %s", ErrUnavailable, t.what, msg)
		}
	} else if err != nil {
		return n, fmt.Errorf("downloading %s: %w", t.what, err)
	}
	return n, err
}

func (t *trailerReader) Close() error { return t.resp.Body.Close() }

// StatFile describes p (an absolute path) in vm without following a final
// symlink. A missing path returns an error wrapping ErrNotFound.
func (c *Client) StatFile(ctx context.Context, vm, p string) (*FileInfo, error) {
	q := url.Values{"path": {p}, "stat": {"true"}}
	var fi FileInfo
	if err := c.do(ctx, "GET", vmPath(vm, "/files", q), nil, &fi); err != nil {
		return nil, err
	}
	return &fi, nil
}

// CopyOptions tune CopyToVM and CopyFromVM. The zero value is usable.
type CopyOptions struct {
	// Progress, when set, is called as file content is transferred with
	// the bytes done so far and the total (-1 when unknown).
	Progress func(done, total int64)
}

func (o *CopyOptions) progress() func(done, total int64) {
	if o == nil || o.Progress == nil {
		return func(int64, int64) {}
	}
	return o.Progress
}

// CopyResult reports a finished copy.
type CopyResult struct {
	// Entries is the number of files, directories and links copied.
	Entries int
	// Bytes is the number of file content bytes copied.
	Bytes int64
	// Dest is where the top of the copy landed (the path of the copied file
	// or directory; the destination directory for a "dir/." copy).
	Dest string
}

// CopyToVM copies the local file or directory src into vm at dst (an
// absolute path), like `cp -r` with modes and modification times kept:
//
//   - if dst is an existing directory, or ends with "/", src is copied into
//     it under its own name (dst is created if missing);
//   - otherwise src is copied to dst itself (replacing a file there);
//   - if src ends with "/." (or is "."), the contents of the directory src
//     are copied into the directory dst.
//
// Symlinks are copied as links, never followed (nor is src itself when it
// is one); sockets, devices and fifos are skipped. Files are owned by root
// in the VM. The VM's agent refuses entries that would land outside the
// destination.
func (c *Client) CopyToVM(ctx context.Context, vm, src, dst string, opts *CopyOptions) (*CopyResult, error) {
	if !strings.HasPrefix(dst, "/") {
		return nil, fmt.Errorf("%w: destination %q must be an absolute path in the VM", ErrInvalidArgument, dst)
	}
	contents := isContentsPath(src)
	srcClean := filepath.Clean(src)
	fi, err := os.Lstat(srcClean)
	if err != nil {
		var pe *fs.PathError
		if errors.As(err, &pe) {
			err = pe.Err // the path is in the message already
		}
		return nil, fmt.Errorf("copying %s: %w", src, err)
	}
	if contents && !fi.IsDir() {
		return nil, fmt.Errorf("%w: %s is not a directory, so it has no contents to copy", ErrInvalidArgument, srcClean)
	}
	abs, err := filepath.Abs(srcClean)
	if err != nil {
		return nil, fmt.Errorf("copying %s: %w", src, err)
	}
	if abs == "/" && !contents {
		return nil, fmt.Errorf("%w: refusing to copy / itself; copy its contents with /.", ErrInvalidArgument)
	}
	// Work out the directory to extract into and the archive's top name.
	dir, top := path.Clean(dst), ""
	if !contents {
		top = filepath.Base(abs)
		into := strings.HasSuffix(dst, "/")
		if !into {
			dfi, err := c.statFollow(ctx, vm, path.Clean(dst))
			switch {
			case errors.Is(err, ErrNotFound):
			case err != nil:
				return nil, err
			case dfi.Type == api.FileTypeDir:
				into = true
			case fi.IsDir():
				return nil, fmt.Errorf("%w: cannot overwrite non-directory %s:%s with directory %s", ErrInvalidArgument, vm, dst, src)
			}
		}
		if !into {
			dir, top = path.Dir(path.Clean(dst)), path.Base(path.Clean(dst))
			if top == "/" || top == "." {
				return nil, fmt.Errorf("%w: bad destination %q", ErrInvalidArgument, dst)
			}
		}
	}
	total, err := treeSize(srcClean)
	if err != nil {
		return nil, fmt.Errorf("copying %s: %w", src, err)
	}
	progress := opts.progress()
	pr, pw := io.Pipe()
	writerDone := make(chan struct{})
	wopts := tarfs.WriteOptions{Name: top, NoTop: contents, OnBytes: func(done int64) { progress(done, total) }}
	go func() {
		defer close(writerDone)
		pw.CloseWithError(tarfs.Write(ctx, pw, srcClean, wopts))
	}()
	res, err := c.PutFiles(ctx, vm, dir, pr)
	pr.CloseWithError(errors.New("upload finished"))
	<-writerDone // no progress calls after we return
	if err != nil {
		return nil, fmt.Errorf("copying %s to %s:%s: %w", src, vm, dst, err)
	}
	return &CopyResult{Entries: res.Entries, Bytes: res.Bytes, Dest: path.Join(dir, top)}, nil
}

// statFollow is StatFile that follows symlinks (a few levels).
func (c *Client) statFollow(ctx context.Context, vm, p string) (*FileInfo, error) {
	for i := 0; i < 8; i++ {
		fi, err := c.StatFile(ctx, vm, p)
		if err != nil || fi.Type != api.FileTypeSymlink {
			return fi, err
		}
		t := fi.LinkTarget
		if !strings.HasPrefix(t, "/") {
			t = path.Join(path.Dir(p), t)
		}
		p = path.Clean(t)
	}
	return nil, fmt.Errorf("%w: too many levels of symlinks at %s:%s", ErrInvalidArgument, vm, p)
}

// isContentsPath reports whether p names a directory's contents ("dir/."
// or ".").
func isContentsPath(p string) bool {
	return p == "." || strings.HasSuffix(p, "/.")
}

// CopyFromVM copies the file or directory src (an absolute path) in vm to
// the local path dst, with the same rules as CopyToVM: into dst when it is
// an existing directory or ends with "/", to dst itself otherwise, and the
// contents of src when it ends with "/.". Modification times are kept, and
// modes less the process umask and without setuid and setgid bits; files
// belong to the caller.
//
// What the VM sends is not trusted. Everything lands at or below the
// copy's own place (dst, or dst/<name> for a copy into a directory), which
// is the root of the extraction: entries with absolute names, "..", other
// top names, paths through a symlink the archive made, symlinks (from the
// archive or already on disk) or hard links leading out of it, sparse
// files, and for a single-file source any entry but that file, are refused
// and end the copy with an error; devices and fifos are skipped. A symlink
// already at the copy's place is replaced, never followed. See
// internal/tarfs for the details.
func (c *Client) CopyFromVM(ctx context.Context, vm, src, dst string, opts *CopyOptions) (*CopyResult, error) {
	if !strings.HasPrefix(src, "/") {
		return nil, fmt.Errorf("%w: source %q must be an absolute path in the VM", ErrInvalidArgument, src)
	}
	contents := isContentsPath(src)
	srcClean := path.Clean(src)
	if srcClean == "/" {
		return nil, fmt.Errorf("%w: refusing to copy the whole file system of %s; name a directory", ErrInvalidArgument, vm)
	}
	progress := opts.progress()
	total := int64(-1)
	if opts != nil && opts.Progress != nil {
		if fi, err := c.StatFile(ctx, vm, srcClean); err == nil && fi.Type == api.FileTypeFile {
			total = fi.Size
		}
	}
	rc, err := c.GetFiles(ctx, vm, srcClean)
	if err != nil {
		return nil, fmt.Errorf("copying %s:%s: %w", vm, src, err)
	}
	defer rc.Close()
	// Where the copy lands: dst itself, or dst/<name> for a copy into a
	// directory. That place, never its parent, is the extraction's root.
	top := path.Base(srcClean)
	dest := dst
	if !contents {
		into := strings.HasSuffix(dst, "/") || strings.HasSuffix(dst, string(filepath.Separator)) || isContentsPath(dst)
		fi, err := os.Stat(dst)
		switch {
		case err == nil && fi.IsDir():
			into = true
		case err != nil && !errors.Is(err, fs.ErrNotExist):
			return nil, fmt.Errorf("copying %s:%s to %s: %w", vm, src, dst, err)
		}
		if into {
			dest = filepath.Join(dst, top)
		}
	}
	xopts := tarfs.Options{
		Top:      top,
		Contents: contents,
		Umask:    processUmask(),
		OnBytes:  func(done int64) { progress(done, total) },
	}
	res, err := tarfs.Extract(ctx, dest, rc, xopts)
	if errors.Is(err, tarfs.ErrEmpty) {
		err = errors.New("the VM sent nothing (a socket, device or fifo cannot be copied)")
	}
	if err != nil {
		return nil, fmt.Errorf("copying %s:%s to %s: %w", vm, src, dst, err)
	}
	return &CopyResult{Entries: res.Entries, Bytes: res.Bytes, Dest: filepath.Clean(dest)}, nil
}

// treeSize sums the sizes of the regular files at and below p (symlinks
// are not followed): the total for CopyToVM's progress.
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
