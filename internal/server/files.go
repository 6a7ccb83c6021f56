package server

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"time"

	"github.com/noid-vm/noid/internal/api"
	"github.com/noid-vm/noid/internal/errdefs"
)

// hPutFiles extracts the tar stream in the request body into ?dir= in the
// guest.
func (s *Server) hPutFiles(w http.ResponseWriter, r *http.Request) error {
	res, err := s.mgr.PutFiles(r.Context(), userOf(r.Context()), vmRef(r), r.URL.Query().Get("dir"), r.Body)
	if err != nil {
		// Read (a bounded part of) what the client still sends, so it sees
		// this answer instead of a connection reset.
		rc := http.NewResponseController(w)
		_ = rc.SetReadDeadline(time.Now().Add(10 * time.Second))
		_, _ = io.Copy(io.Discard, io.LimitReader(r.Body, 1<<30))
		return err
	}
	return writeJSON(w, http.StatusOK, res)
}

// hGetFiles streams ?path= in the guest as a tar archive, or describes it
// with ?stat=true.
func (s *Server) hGetFiles(w http.ResponseWriter, r *http.Request) error {
	q := r.URL.Query()
	p := q.Get("path")
	stat := false
	switch q.Get("stat") {
	case "", "0", "false":
	case "1", "true":
		stat = true
	default:
		return fmt.Errorf("%w: stat must be true or false", errdefs.ErrInvalidArgument)
	}
	name := vmRef(r)
	if stat {
		fi, err := s.mgr.StatFile(r.Context(), userOf(r.Context()), name, p)
		if err != nil {
			return err
		}
		return writeJSON(w, http.StatusOK, fi)
	}
	rc, err := s.mgr.GetFiles(r.Context(), userOf(r.Context()), name, p)
	if err != nil {
		return err
	}
	defer rc.Close()
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
