package guest

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/noid-vm/noid/internal/agent/proto"
	"github.com/noid-vm/noid/internal/tarfs"
)

// runPut extracts the tar stream the host sends on stdin into req.Dir.
func (s *session) runPut(h *handler, req proto.PutRequest) {
	ctx, cancel := streamContext(h.st)
	defer cancel()
	res, err := extractTar(ctx, req.Dir, h.st.Reader(proto.ChanStdin), os.Geteuid() == 0)
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
	ctx, cancel := streamContext(h.st)
	defer cancel()
	w := h.st.Writer(proto.ChanStdout)
	err := writeTar(ctx, req.Path, w)
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

// streamContext returns a context that is canceled when st ends (the host
// reset it, or the session was dropped), so a transfer stops walking or
// extracting.
func streamContext(st *proto.Stream) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		select {
		case <-st.Done():
			cancel()
		case <-ctx.Done():
		}
	}()
	return ctx, cancel
}

// extractTar writes the tar stream r into dir (absolute, made if missing),
// like tar run as root when asRoot: modes as they are (setuid, setgid and
// sticky included) and numeric owners kept. Nothing lands outside dir (see
// tarfs.Extract).
func extractTar(ctx context.Context, dir string, r io.Reader, asRoot bool) (proto.PutResult, error) {
	if !filepath.IsAbs(dir) {
		return proto.PutResult{}, fmt.Errorf("destination %q is not absolute", dir)
	}
	res, err := tarfs.Extract(ctx, dir, r, tarfs.Options{KeepSetID: true, KeepOwner: asRoot})
	return proto.PutResult{Entries: res.Entries, Bytes: res.Bytes}, err
}

// writeTar writes p (a file, symlink or directory tree) to w as a tar
// stream whose names start with p's base name, owners kept. Symlinks are
// stored as links, never followed.
func writeTar(ctx context.Context, p string, w io.Writer) error {
	if !filepath.IsAbs(p) {
		return fmt.Errorf("path %q is not absolute", p)
	}
	return tarfs.Write(ctx, w, filepath.Clean(p), tarfs.WriteOptions{KeepOwner: true})
}
