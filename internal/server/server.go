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

	// baseCtx is the parent of every request's context; shutdown cancels
	// it, with errShuttingDown, when its deadline passes.
	baseCtx    context.Context
	cancelBase context.CancelCauseFunc
	reqs       requests
	stopOnce   sync.Once

	metrics     *httpMetrics
	metricsOnce sync.Once
	promHandler http.Handler

	// sessions bounds each user's open exec and console sessions.
	sessions *sessionLimit
}

// errShuttingDown is the cause of the cancellation of the requests still
// running when a stopping server's shutdown_timeout has passed.
var errShuttingDown = errors.New("noid-server is shutting down")

// shutdownGrace is how long requests get to return once they have been
// cancelled, before the server stops without them.
const shutdownGrace = 10 * time.Second

// New returns a Server for mgr, which its caller keeps owning (and closes
// after the Server). It does not start listening; call Serve. A nil log
// uses slog.Default().
func New(mgr *manager.Manager, log *slog.Logger) *Server {
	if log == nil {
		log = slog.Default()
	}
	base, cancel := context.WithCancelCause(context.Background())
	return &Server{cfg: mgr.Config(), log: log, mgr: mgr, store: mgr.Store(), closed: make(chan struct{}), limiter: newAuthLimiter(),
		baseCtx: base, cancelBase: cancel, metrics: newHTTPMetrics(), sessions: newSessionLimit(mgr.Config().Limits.SessionsPerUser)}
}

// Manager is the VM lifecycle the server serves.
func (s *Server) Manager() *manager.Manager { return s.mgr }

// Serve listens on the unix socket (and the TCP address if configured) and
// serves until ctx ends or Close is called. It then stops accepting
// connections, lets the requests in flight run for up to [http]
// shutdown_timeout, cancels those still running and returns once they have
// (or after a short grace, without them).
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
			s.shutdown(0)
			return fmt.Errorf("listening on %s: %w", s.cfg.Listen, err)
		}
		s.log.Info("listening", "addr", tl.Addr().String(), "tls", s.cfg.TLSCert != "", "max_conns_per_client", s.cfg.HTTP.MaxConnsPerClient)
		s.serveOn(s.limitConns(tl), false, errc)
	}
	select {
	case <-ctx.Done():
	case <-s.closed:
	case err = <-errc:
	}
	s.shutdown(s.cfg.HTTP.Shutdown())
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
		// Responses the server writes outside the routes (a malformed
		// request, say); the routes bound each write themselves.
		WriteTimeout: s.cfg.HTTP.Write(),
		IdleTimeout:  s.cfg.HTTP.Idle(),
		ConnContext:  connContext,
		BaseContext:  func(net.Listener) context.Context { return s.baseCtx },
		ErrorLog:     slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
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

// shutdown stops accepting connections, waits up to timeout for the
// requests in flight, cancels those still running (exec and console
// streams then tell their clients that the server is shutting down) and
// waits up to shutdownGrace for them to return before it closes the
// connections that are left. The manager, and so every VM, is untouched.
// Only the first call works; later ones wait for it to finish.
func (s *Server) shutdown(timeout time.Duration) {
	s.stopOnce.Do(func() { s.stop(timeout) })
}

func (s *Server) stop(timeout time.Duration) {
	s.httpMu.Lock()
	hs := s.https
	s.https = nil
	s.httpMu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	var wg sync.WaitGroup
	for _, h := range hs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			h.Shutdown(ctx) // closes the listeners at once
		}()
	}
	if n := s.reqs.count(); n > 0 {
		s.log.Info("shutting down: waiting for the requests in flight", "requests", n, "timeout", timeout.String())
	}
	select {
	case <-s.reqs.idle():
	case <-ctx.Done():
	}
	if n := s.reqs.count(); n > 0 {
		s.log.Warn("shutting down: cancelling the requests still in flight", "requests", n, "timeout", timeout.String())
	}
	s.cancelBase(errShuttingDown)
	select {
	case <-s.reqs.idle():
	case <-time.After(shutdownGrace):
		s.log.Error("shutting down without the requests that did not end when cancelled", "requests", s.reqs.count())
	}
	cancel()
	wg.Wait()
	for _, h := range hs {
		h.Close()
	}
}

// requests counts the requests being served, streams included.
type requests struct {
	mu   sync.Mutex
	n    int
	zero chan struct{} // closed when n drops to 0
}

func (r *requests) add() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.n == 0 {
		r.zero = make(chan struct{})
	}
	r.n++
}

func (r *requests) done() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.n--
	if r.n == 0 {
		close(r.zero)
	}
}

func (r *requests) count() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.n
}

// idle is closed once no request is being served.
func (r *requests) idle() <-chan struct{} {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.n == 0 {
		c := make(chan struct{})
		close(c)
		return c
	}
	return r.zero
}

// Close stops serving at once: requests in flight are cancelled. The
// manager stays open: its owner closes it.
func (s *Server) Close() error {
	s.closeOnce.Do(func() {
		close(s.closed)
		s.shutdown(0)
	})
	return nil
}
