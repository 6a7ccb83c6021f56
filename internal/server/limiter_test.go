package server

import (
	"errors"
	"fmt"
	"net/http"
	"testing"
	"time"

	"github.com/noid-vm/noid/internal/auth"
	"github.com/noid-vm/noid/internal/errdefs"
)

func TestAuthLimiter(t *testing.T) {
	now := time.Unix(1000, 0)
	l := newAuthLimiter()
	l.now = func() time.Time { return now }
	tok := auth.NewToken()
	for i := 0; i < int(limiterBurst); i++ {
		if err := l.allow("1.2.3.4", tok); err != nil {
			t.Fatalf("attempt %d refused: %v", i, err)
		}
		l.fail("1.2.3.4", tok)
	}
	if err := l.allow("1.2.3.4", auth.NewToken()); !errors.Is(err, errdefs.ErrRateLimited) {
		t.Fatalf("address not limited: %v", err)
	}
	// The same token prefix from another address is limited too.
	if err := l.allow("5.6.7.8", tok); !errors.Is(err, errdefs.ErrRateLimited) {
		t.Fatalf("token prefix not limited: %v", err)
	}
	if err := l.allow("5.6.7.8", auth.NewToken()); err != nil {
		t.Fatalf("innocent address limited: %v", err)
	}
	// It drains with time.
	now = now.Add(5 * time.Second)
	if err := l.allow("1.2.3.4", ""); err != nil {
		t.Fatalf("not drained: %v", err)
	}
	// A flood of junk stays bounded in memory.
	for i := 0; i < 30000; i++ {
		l.fail(fmt.Sprintf("10.%d.%d.%d", i>>16&255, i>>8&255, i&255), auth.NewToken())
	}
	if n := l.size(); n > limiterMaxKeys {
		t.Fatalf("limiter holds %d buckets", n)
	}
}

func TestClientAddr(t *testing.T) {
	r, _ := http.NewRequest("GET", "/", nil)
	r.RemoteAddr = "10.0.0.9:5555"
	r.Header.Add("X-Forwarded-For", "6.6.6.6, 1.2.3.4")
	if got := clientAddr(r, false); got != "10.0.0.9" {
		t.Errorf("untrusted proxy: %q", got)
	}
	if got := clientAddr(r, true); got != "1.2.3.4" {
		t.Errorf("trusted proxy: %q, want the entry the proxy appended", got)
	}
	r.Header.Add("X-Forwarded-For", "5.5.5.5")
	if got := clientAddr(r, true); got != "5.5.5.5" {
		t.Errorf("two header lines: %q", got)
	}
}
