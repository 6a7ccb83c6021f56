package server

import (
	"fmt"
	"sort"
	"sync"
	"time"

	"github.com/noid-vm/noid/internal/auth"
	"github.com/noid-vm/noid/internal/errdefs"
)

// authLimiter rate-limits failed authentication per client address and per
// token prefix. Its memory is bounded: at most maxKeys buckets are kept and
// the stalest are evicted first, so a flood of junk tokens cannot grow it.
type authLimiter struct {
	mu      sync.Mutex
	buckets map[string]*bucket
	now     func() time.Time
}

type bucket struct {
	fails   float64
	updated time.Time
}

const (
	limiterMaxKeys  = 4096
	limiterBurst    = 10.0 // failures allowed at once
	limiterPerSec   = 1.0  // failures forgiven per second
	limiterEvictAge = 10 * time.Minute
)

func newAuthLimiter() *authLimiter {
	return &authLimiter{buckets: map[string]*bucket{}, now: time.Now}
}

func (l *authLimiter) keys(addr, tok string) []string {
	k := []string{"addr:" + addr}
	if tok != "" {
		k = append(k, "tok:"+auth.ShortPrefix(tok))
	}
	return k
}

func (l *authLimiter) level(b *bucket, now time.Time) float64 {
	f := b.fails - now.Sub(b.updated).Seconds()*limiterPerSec
	if f < 0 {
		f = 0
	}
	return f
}

// allow refuses with ErrRateLimited when the address or token prefix has
// failed too often recently.
func (l *authLimiter) allow(addr, tok string) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := l.now()
	for _, k := range l.keys(addr, tok) {
		if b := l.buckets[k]; b != nil && l.level(b, now) >= limiterBurst {
			return fmt.Errorf("%w: too many failed authentication attempts; retry later", errdefs.ErrRateLimited)
		}
	}
	return nil
}

// fail records a failed attempt.
func (l *authLimiter) fail(addr, tok string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := l.now()
	for _, k := range l.keys(addr, tok) {
		b := l.buckets[k]
		if b == nil {
			if len(l.buckets) >= limiterMaxKeys {
				l.evict(now)
			}
			b = &bucket{updated: now}
			l.buckets[k] = b
		}
		b.fails = l.level(b, now) + 1
		b.updated = now
	}
}

// evict drops drained or old buckets; if the map is still full it drops
// the stalest quarter, so eviction work is amortised over many inserts.
func (l *authLimiter) evict(now time.Time) {
	for k, b := range l.buckets {
		if l.level(b, now) == 0 || now.Sub(b.updated) > limiterEvictAge {
			delete(l.buckets, k)
		}
	}
	if len(l.buckets) < limiterMaxKeys {
		return
	}
	type kv struct {
		k string
		t time.Time
	}
	all := make([]kv, 0, len(l.buckets))
	for k, b := range l.buckets {
		all = append(all, kv{k, b.updated})
	}
	sort.Slice(all, func(i, j int) bool { return all[i].t.Before(all[j].t) })
	for _, e := range all[:len(all)/4] {
		delete(l.buckets, e.k)
	}
}

// size returns the number of buckets (tests).
func (l *authLimiter) size() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.buckets)
}
