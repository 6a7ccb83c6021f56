package network

import (
	"net"
	"net/netip"
	"sync"
	"time"
)

// maxDNSSources bounds the per-source state of a sourceLimiter. Sources
// with nothing in flight and a full bucket are forgotten first; when all
// of them are busy, new sources are refused until some are not.
const maxDNSSources = 4096

// sourceLimiter is the DNS server's admission control: a token bucket per
// source address (rate per second, bursts of twice that), and caps on what
// one source has in flight (UDP queries being answered, open TCP
// connections) and on the TCP connections of all sources together.
type sourceLimiter struct {
	rate      float64
	burst     float64
	perSource int // in-flight queries, and TCP connections, per source
	maxConns  int // TCP connections of all sources

	mu      sync.Mutex
	sources map[netip.Addr]*sourceState
	conns   int
	now     func() time.Time
}

type sourceState struct {
	tokens   float64
	last     time.Time
	inflight int
	conns    int
}

func newSourceLimiter(rate float64, concurrency int) *sourceLimiter {
	return &sourceLimiter{rate: rate, burst: 2 * rate, perSource: max(1, concurrency/4), maxConns: concurrency,
		sources: map[netip.Addr]*sourceState{}, now: time.Now}
}

// source returns a's state with its bucket refilled, or nil when the table
// is full of busy sources. The caller holds l.mu.
func (l *sourceLimiter) source(a netip.Addr) *sourceState {
	now := l.now()
	st := l.sources[a]
	if st == nil {
		if len(l.sources) >= maxDNSSources {
			for k, o := range l.sources {
				if o.inflight == 0 && o.conns == 0 && o.tokens+now.Sub(o.last).Seconds()*l.rate >= l.burst {
					delete(l.sources, k)
				}
			}
			if len(l.sources) >= maxDNSSources {
				return nil
			}
		}
		st = &sourceState{tokens: l.burst, last: now}
		l.sources[a] = st
	}
	st.tokens = min(l.burst, st.tokens+now.Sub(st.last).Seconds()*l.rate)
	st.last = now
	return st
}

// admit takes a token and an in-flight slot of a for one query, and
// reports false when a has neither to spare. Call done after an admitted
// query.
func (l *sourceLimiter) admit(a netip.Addr) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	st := l.source(a)
	if st == nil || st.tokens < 1 || st.inflight >= l.perSource {
		return false
	}
	st.tokens--
	st.inflight++
	return true
}

// done ends an admitted query of a.
func (l *sourceLimiter) done(a netip.Addr) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if st := l.sources[a]; st != nil && st.inflight > 0 {
		st.inflight--
	}
}

// openConn admits a TCP connection from a.
func (l *sourceLimiter) openConn(a netip.Addr) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	st := l.source(a)
	if st == nil || l.conns >= l.maxConns || st.conns >= l.perSource {
		return false
	}
	st.conns++
	l.conns++
	return true
}

// closeConn ends an admitted TCP connection of a.
func (l *sourceLimiter) closeConn(a netip.Addr) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if st := l.sources[a]; st != nil && st.conns > 0 {
		st.conns--
		l.conns--
	}
}

// limitListener closes, at once, the TCP connections its limiter does not
// admit, and never fails Accept for them (the DNS server would stop).
type limitListener struct {
	net.Listener
	limits *sourceLimiter
}

// Accept returns the next admitted connection.
func (l *limitListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		var src netip.Addr
		if ta, ok := c.RemoteAddr().(*net.TCPAddr); ok {
			src = ta.AddrPort().Addr().Unmap()
		}
		if !l.limits.openConn(src) {
			c.Close()
			continue
		}
		return &limitConn{Conn: c, release: func() { l.limits.closeConn(src) }}, nil
	}
}

// limitConn gives its slot back once, when closed.
type limitConn struct {
	net.Conn
	once    sync.Once
	release func()
}

// Close closes the connection and releases its slot.
func (c *limitConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(c.release)
	return err
}
