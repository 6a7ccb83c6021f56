package server

import (
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"
)

// limitConns wraps a TCP listener so that a client address with [http]
// max_conns_per_client connections open has any further one closed at
// once (the client sees the connection reset or closed before an answer).
// It counts TCP peers, not X-Forwarded-For: behind a reverse proxy every
// connection comes from the proxy.
func (s *Server) limitConns(l net.Listener) net.Listener {
	return &limitListener{Listener: l, max: s.cfg.HTTP.MaxConnsPerClient, open: map[string]int{}, s: s}
}

type limitListener struct {
	net.Listener
	max     int
	s       *Server
	mu      sync.Mutex
	open    map[string]int
	lastLog atomic.Int64 // unix nanoseconds of the last refusal logged
}

// Accept returns the next connection whose client address is under the cap.
func (l *limitListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		host := c.RemoteAddr().String()
		if h, _, err := net.SplitHostPort(host); err == nil {
			host = h
		}
		l.mu.Lock()
		if l.open[host] >= l.max {
			l.mu.Unlock()
			c.Close()
			l.refused(host)
			continue
		}
		l.open[host]++
		l.mu.Unlock()
		return &limitedConn{Conn: c, release: sync.OnceFunc(func() { l.release(host) })}, nil
	}
}

func (l *limitListener) release(host string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.open[host]--; l.open[host] <= 0 {
		delete(l.open, host)
	}
}

// refused counts a refused connection, and logs one at most every 10 s so
// that a flood cannot fill the log.
func (l *limitListener) refused(host string) {
	l.s.metrics.refused.Inc()
	now := time.Now().UnixNano()
	if last := l.lastLog.Load(); now-last > int64(10*time.Second) && l.lastLog.CompareAndSwap(last, now) {
		l.s.log.Warn("refusing connections over max_conns_per_client", "client", host, "max_conns_per_client", l.max)
	}
}

// limitedConn gives its place back to its client address when closed.
type limitedConn struct {
	net.Conn
	release func()
}

// Close closes the connection and releases its place.
func (c *limitedConn) Close() error {
	c.release()
	return c.Conn.Close()
}

// deadlineWriter bounds every write of a response by [http] write_timeout
// from the moment it starts, instead of from the request's arrival: a long
// operation or a long download is not cut while the client reads, and a
// client that stops reading is dropped after write_timeout.
type deadlineWriter struct {
	http.ResponseWriter
	rc *http.ResponseController
	d  time.Duration
}

func newDeadlineWriter(w http.ResponseWriter, d time.Duration) *deadlineWriter {
	rc := http.NewResponseController(w)
	// No deadline while the handler works: http.Server's WriteTimeout
	// counts from the request's arrival.
	_ = rc.SetWriteDeadline(time.Time{})
	return &deadlineWriter{ResponseWriter: w, rc: rc, d: d}
}

func (w *deadlineWriter) extend() { _ = w.rc.SetWriteDeadline(time.Now().Add(w.d)) }

// WriteHeader sends the status with a fresh write deadline.
func (w *deadlineWriter) WriteHeader(code int) {
	w.extend()
	w.ResponseWriter.WriteHeader(code)
}

// Write writes with a fresh write deadline.
func (w *deadlineWriter) Write(b []byte) (int, error) {
	w.extend()
	return w.ResponseWriter.Write(b)
}

// Flush flushes with a fresh write deadline.
func (w *deadlineWriter) Flush() {
	w.extend()
	_ = w.rc.Flush()
}

// Unwrap gives http.ResponseController and the WebSocket upgrade the
// connection's own writer.
func (w *deadlineWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }
