package manager

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
	"path"
	"strings"

	"github.com/noid-vm/noid/internal/api"
	"github.com/noid-vm/noid/internal/errdefs"
	"github.com/noid-vm/noid/internal/store"
)

// guestPath checks a path in the guest: absolute, without NUL bytes, and
// cleaned. param names it in errors.
func guestPath(param, p string) (string, error) {
	if p == "" {
		return "", errdefs.WithHint(fmt.Errorf("%w: no %s given", errdefs.ErrInvalidArgument, param),
			"give an absolute path in the VM, e.g. /root")
	}
	if !strings.HasPrefix(p, "/") || strings.ContainsRune(p, 0) {
		return "", errdefs.WithHint(fmt.Errorf("%w: %s %q must be an absolute path in the VM", errdefs.ErrInvalidArgument, param, p),
			"paths in the VM start with /, e.g. vm:/root/file")
	}
	return path.Clean(p), nil
}

// agentFileErr classifies an error of an agent put or get. Connection
// problems keep their class; errors the agent reports (a missing path, a
// refused tar entry, a full disk) are the request's.
func agentFileErr(err error, vm, p string) error {
	if errors.Is(err, errdefs.ErrUnavailable) || errors.Is(err, errdefs.ErrNotRunning) {
		return err
	}
	// The agent client says "agent put DIR: …" or "agent get PATH: …".
	msg := err.Error()
	for _, pre := range []string{"agent put " + p + ": ", "agent get " + p + ": "} {
		msg = strings.TrimPrefix(msg, pre)
	}
	switch {
	case strings.Contains(msg, "no such file or directory"):
		return errdefs.WithHint(fmt.Errorf("vm %q has no %s (%w)", vm, p, errdefs.ErrNotFound),
			"check the path with `noid exec "+vm+" -- ls -la "+path.Dir(p)+"`")
	case strings.Contains(msg, "no space left"):
		return errdefs.WithHint(fmt.Errorf("vm %q: %s (%w)", vm, msg, errdefs.ErrResourceExhausted),
			"free space in the VM, or create it with a larger --disk-size")
	case strings.Contains(msg, "refusing entry") || strings.Contains(msg, "escapes") ||
		// (as older agents say it)
		strings.Contains(msg, "refused") || strings.Contains(msg, "bad hard link") || strings.Contains(msg, "bad symlink"):
		return errdefs.WithHint(fmt.Errorf("vm %q refused the upload into %s: %s (%w)", vm, p, msg, errdefs.ErrInvalidArgument),
			"tar entries must stay inside the destination (no absolute paths, \"..\" or writes through symlinks)")
	}
	return fmt.Errorf("vm %q: %s (%w)", vm, msg, errdefs.ErrInvalidArgument)
}

// PutFiles extracts the tar stream r into dir (an absolute path, created if
// missing) in the user's VM vm.
func (m *Manager) PutFiles(ctx context.Context, u *store.User, vm, dir string, r io.Reader) (*api.PutFilesResult, error) {
	dir, err := guestPath("dir", dir)
	if err != nil {
		return nil, err
	}
	_, ac, err := m.agentFor(ctx, u, vm)
	if err != nil {
		return nil, err
	}
	res, err := ac.Put(ctx, dir, r)
	if err != nil {
		return nil, agentFileErr(err, vm, dir)
	}
	return &api.PutFilesResult{Entries: res.Entries, Bytes: res.Bytes}, nil
}

// GetFiles returns a tar stream of p (an absolute path) in the user's VM
// vm: a file, or a directory with everything below it. A failure during
// the transfer is returned by Read. Close the reader when done.
func (m *Manager) GetFiles(ctx context.Context, u *store.User, vm, p string) (io.ReadCloser, error) {
	p, err := guestPath("path", p)
	if err != nil {
		return nil, err
	}
	_, ac, err := m.agentFor(ctx, u, vm)
	if err != nil {
		return nil, err
	}
	rc, err := ac.Get(ctx, p)
	if err != nil {
		return nil, agentFileErr(err, vm, p)
	}
	return rc, nil
}

// StatFile describes p (an absolute path) in the user's VM vm without
// following a final symlink.
func (m *Manager) StatFile(ctx context.Context, u *store.User, vm, p string) (*api.FileInfo, error) {
	rc, err := m.GetFiles(ctx, u, vm, p)
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	p = path.Clean(p)
	fi, err := statFromTar(rc, p)
	if err != nil {
		return nil, agentFileErr(err, vm, p)
	}
	return fi, nil
}

// statFromTar describes p from the first header of the agent's tar stream
// of it.
func statFromTar(r io.Reader, p string) (*api.FileInfo, error) {
	hdr, err := tar.NewReader(r).Next()
	if err != nil {
		if err == io.EOF {
			err = errors.New("empty archive")
		}
		return nil, fmt.Errorf("reading %s: %w", p, err)
	}
	fi := &api.FileInfo{Path: p, Mode: uint32(hdr.Mode & 0o7777), ModTime: hdr.ModTime.UTC()}
	switch hdr.Typeflag {
	case tar.TypeDir:
		fi.Type = api.FileTypeDir
	case tar.TypeSymlink:
		fi.Type, fi.LinkTarget = api.FileTypeSymlink, hdr.Linkname
	default:
		fi.Type, fi.Size = api.FileTypeFile, hdr.Size
	}
	return fi, nil
}
