package server

import (
	"fmt"
	"sync"

	"github.com/noid-vm/noid/internal/errdefs"
	"github.com/noid-vm/noid/internal/store"
)

// sessionLimit counts the exec and console sessions each user has open, so
// that one user cannot make the server hold the buffers of any number of
// them ([limits] sessions_per_user).
type sessionLimit struct {
	max  int
	mu   sync.Mutex
	open map[int64]int // by user id
}

func newSessionLimit(max int) *sessionLimit {
	return &sessionLimit{max: max, open: map[int64]int{}}
}

// acquire counts a new session of u, or fails with ErrRateLimited when u
// has max open. Call the returned func when the session ends.
func (l *sessionLimit) acquire(u *store.User) (release func(), err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if n := l.open[u.ID]; n >= l.max {
		return nil, errdefs.WithHint(fmt.Errorf("%w: user %s has %d exec and console sessions open, the most allowed at once", errdefs.ErrRateLimited, u.Name, n),
			"end one of them first, or ask the admin to raise [limits] sessions_per_user")
	}
	l.open[u.ID]++
	var once sync.Once
	return func() {
		once.Do(func() {
			l.mu.Lock()
			defer l.mu.Unlock()
			if l.open[u.ID]--; l.open[u.ID] <= 0 {
				delete(l.open, u.ID)
			}
		})
	}, nil
}
