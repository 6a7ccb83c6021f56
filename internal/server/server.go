// Package server is noid-server's API layer: it serves the REST and
// WebSocket API on a unix socket (callers identified by their peer
// credentials) and optionally on TCP (bearer tokens). It only serves: a
// handler authenticates, decodes the request, calls the VM lifecycle in
// package manager and encodes the answer. Routes, authentication and its
// rate limiter, request logs and the audit trail, errors mapped to HTTP
// statuses, the OpenAPI document and the /metrics exposition live here.
package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/noid-vm/noid/internal/config"
	"github.com/noid-vm/noid/internal/manager"
	"github.com/noid-vm/noid/internal/store"
	"github.com/noid-vm/noid/internal/unixgroup"
)

// Version is noid-server's version, set at build time with
// -ldflags "-X github.com/noid-vm/noid/internal/server.Version=…".
var Version = "0.1.0-dev"

// Server serves the noid API for one Manager.
type Server struct {
	cfg   *config.Config
	log   *slog.Logger
	mgr   *manager.Manager
	store *store.Store

	httpMu    sync.Mutex
	listeners []net.Listener
	https     []*http.Server
	closed    chan struct{}
	closeOnce sync.Once
	limiter   *authLimiter
	sessions  *sessionLimit
}

// New returns a Server for mgr, which its caller keeps owning (and closes
// after the Server). It does not start listening; call Serve. A nil log
// uses slog.Default().
func New(mgr *manager.Manager, log *slog.Logger) *Server {
	if log == nil {
		log = slog.Default()
	}
	return &Server{cfg: mgr.Config(), log: log, mgr: mgr, store: mgr.Store(), closed: make(chan struct{}), limiter: newAuthLimiter(),
		sessions: newSessionLimit(mgr.Config().Limits.SessionsPerUser)}
}

// Manager is the VM lifecycle the server serves.
func (s *Server) Manager() *manager.Manager { return s.mgr }

// Serve listens on the unix socket (and the TCP address if configured) and
// serves until ctx ends or Close is called.
func (s *Server) Serve(ctx context.Context) error {
	ul, err := listenUnix(s.cfg.Socket)
	if err != nil {
		return err
	}
	if err := s.socketAccess(); err != nil {
		ul.Close()
		return err
	}
	s.log.Info("listening", "socket", s.cfg.Socket)
	errc := make(chan error, 2)
	s.serveOn(ul, true, errc)
	if s.cfg.Listen != "" {
		tl, err := net.Listen("tcp", s.cfg.Listen)
		if err != nil {
			ul.Close()
			return fmt.Errorf("listening on %s: %w", s.cfg.Listen, err)
		}
		s.log.Info("listening", "addr", tl.Addr().String(), "tls", s.cfg.TLSCert != "")
		s.serveOn(tl, false, errc)
	}
	select {
	case <-ctx.Done():
	case <-s.closed:
	case err = <-errc:
	}
	s.shutdownHTTP()
	return err
}

// ServeListener serves the API on an existing listener; local marks a unix
// socket whose peers are identified by their credentials.
func (s *Server) ServeListener(l net.Listener, local bool) {
	s.serveOn(l, local, make(chan error, 1))
}

func (s *Server) serveOn(l net.Listener, local bool, errc chan<- error) {
	hs := &http.Server{
		Handler:           s.Handler(local),
		ReadHeaderTimeout: 10 * time.Second,
		ConnContext:       connContext,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
	}
	s.httpMu.Lock()
	s.listeners = append(s.listeners, l)
	s.https = append(s.https, hs)
	s.httpMu.Unlock()
	go func() {
		var err error
		if !local && s.cfg.TLSCert != "" {
			err = hs.ServeTLS(l, s.cfg.TLSCert, s.cfg.TLSKey)
		} else {
			err = hs.Serve(l)
		}
		if err != nil && !errors.Is(err, http.ErrServerClosed) {
			select {
			case errc <- err:
			default:
			}
		}
	}()
}

func listenUnix(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("creating socket dir: %w", err)
	}
	// A stale socket from a crashed server is removed; a live one is refused.
	if c, err := net.DialTimeout("unix", path, 200*time.Millisecond); err == nil {
		c.Close()
		return nil, fmt.Errorf("another noid-server is already listening on %s", path)
	}
	os.Remove(path)
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("listening on %s: %w", path, err)
	}
	// Only the owner until socketAccess has run (connecting needs write
	// permission, which the usual umask already withholds from others).
	if err := os.Chmod(path, 0o600); err != nil {
		l.Close()
		return nil, fmt.Errorf("setting the mode of socket %s: %w", path, err)
	}
	return l, nil
}

// socketAccess gives the unix socket to root and the socket_group (mode
// 0660), or to root alone while that group does not exist: only local
// users in the group (`noid-server add-user --local`) can connect, and the
// peer's uid then decides who they are.
func (s *Server) socketAccess() error {
	path, group := s.cfg.Socket, s.cfg.SocketGroup
	gid, ok := unixgroup.Lookup(group)
	switch {
	case ok:
		if err := os.Chown(path, -1, gid); err != nil {
			return fmt.Errorf("giving socket %s to group %s: %w", path, group, err)
		}
		s.log.Info("socket open to root and a group", "socket", path, "group", group, "gid", gid)
	case os.Geteuid() == 0:
		if err := os.Chown(path, 0, 0); err != nil {
			return fmt.Errorf("giving socket %s to root: %w", path, err)
		}
		s.log.Info("socket open to root only: socket_group does not exist (`noid-server add-user --local USER` creates it)", "socket", path, "group", group)
	}
	if err := os.Chmod(path, 0o660); err != nil {
		return fmt.Errorf("setting the mode of socket %s: %w", path, err)
	}
	return nil
}

func (s *Server) shutdownHTTP() {
	s.httpMu.Lock()
	hs := s.https
	s.https = nil
	s.httpMu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for _, h := range hs {
		h.Shutdown(ctx)
	}
}

// Close stops serving. The manager stays open: its owner closes it.
func (s *Server) Close() error {
	s.closeOnce.Do(func() {
		close(s.closed)
		s.shutdownHTTP()
	})
	return nil
}
