package server

import (
	"archive/tar"
	"errors"
	"fmt"
	"io"
	"net/http"
	"path"
	"strings"
	"time"

	"github.com/noid-vm/noid/internal/api"
	"github.com/noid-vm/noid/internal/errdefs"
)

// guestPath checks a path in the guest from a query parameter: absolute,
// without NUL bytes, and cleaned.
func guestPath(param, p string) (string, error) {
	if p == "" {
		return "", errdefs.WithHint(fmt.Errorf("%w: missing %s query parameter", errdefs.ErrInvalidArgument, param),
			"give an absolute path in the VM, e.g. ?"+param+"=/root")
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

// hPutFiles extracts the tar stream in the request body into ?dir= in the
// guest.
func (s *Server) hPutFiles(w http.ResponseWriter, r *http.Request) error {
	dir, err := guestPath("dir", r.URL.Query().Get("dir"))
	if err != nil {
		return err
	}
	name := r.PathValue("name")
	_, ac, err := s.agentFor(r.Context(), userOf(r.Context()), name)
	if err != nil {
		return err
	}
	res, err := ac.Put(r.Context(), dir, r.Body)
	if err != nil {
		// Read (a bounded part of) what the client still sends, so it sees
		// this answer instead of a connection reset.
		rc := http.NewResponseController(w)
		_ = rc.SetReadDeadline(time.Now().Add(10 * time.Second))
		_, _ = io.Copy(io.Discard, io.LimitReader(r.Body, 1<<30))
		return agentFileErr(err, name, dir)
	}
	return writeJSON(w, http.StatusOK, api.PutFilesResult{Entries: res.Entries, Bytes: res.Bytes})
}

// hGetFiles streams ?path= in the guest as a tar archive, or describes it
// with ?stat=true.
func (s *Server) hGetFiles(w http.ResponseWriter, r *http.Request) error {
	q := r.URL.Query()
	p, err := guestPath("path", q.Get("path"))
	if err != nil {
		return err
	}
	stat := false
	switch q.Get("stat") {
	case "", "0", "false":
	case "1", "true":
		stat = true
	default:
		return fmt.Errorf("%w: stat must be true or false", errdefs.ErrInvalidArgument)
	}
	name := r.PathValue("name")
	_, ac, err := s.agentFor(r.Context(), userOf(r.Context()), name)
	if err != nil {
		return err
	}
	rc, err := ac.Get(r.Context(), p)
	if err != nil {
		return agentFileErr(err, name, p)
	}
	defer rc.Close()
	if stat {
		fi, err := statFromTar(rc, p)
		if err != nil {
			return agentFileErr(err, name, p)
		}
		return writeJSON(w, http.StatusOK, fi)
	}
	w.Header().Set("Content-Type", "application/x-tar")
	w.Header().Set("Trailer", api.FilesErrorTrailer)
	w.WriteHeader(http.StatusOK)
	// Once the status is sent, errors travel in the trailer; returning one
	// would append a JSON body to the tar stream.
	if _, err := io.Copy(w, &errReader{r: rc}); err != nil {
		var re *readErr
		if errors.As(err, &re) {
			w.Header().Set(api.FilesErrorTrailer, re.err.Error())
		}
		s.log.Warn("file download ended early", "vm", name, "path", p, "request_id", requestID(r.Context()), "err", err)
	}
	return nil
}

// errReader marks errors that come from reading (the agent), as opposed to
// writing to the client.
type errReader struct{ r io.Reader }

type readErr struct{ err error }

func (e *readErr) Error() string { return e.err.Error() }
func (e *readErr) Unwrap() error { return e.err }

func (e *errReader) Read(p []byte) (int, error) {
	n, err := e.r.Read(p)
	if err != nil && err != io.EOF {
		err = &readErr{err}
	}
	return n, err
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
