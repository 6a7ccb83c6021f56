package config

import (
	"fmt"
	"time"
)

// HTTP is the [http] section: how the API server treats connections and
// requests.
type HTTP struct {
	// ShutdownTimeout is how long a stopping server lets requests in flight
	// (creates, checkpoints, exec streams, …) finish before it cancels them
	// and exits. VMs keep running either way. Default "30s".
	ShutdownTimeout string `toml:"shutdown_timeout"`
	// IdleTimeout closes a keep-alive connection that has carried no
	// request for this long. Default "2m".
	IdleTimeout string `toml:"idle_timeout"`
	// WriteTimeout bounds each write of a response to a client: a client
	// that reads nothing for this long is disconnected. Long operations
	// and streams are not cut by it while they make progress; exec and
	// console streams are kept alive with WebSocket pings instead.
	// Default "1m".
	WriteTimeout string `toml:"write_timeout"`
	// MaxConnsPerClient caps the open TCP connections of one client
	// address (the TCP peer, also with trust_proxy); further ones are
	// closed at once. The unix socket has no cap. Default 64.
	MaxConnsPerClient int `toml:"max_conns_per_client"`
}

// The [http] defaults.
const (
	DefaultShutdownTimeout   = 30 * time.Second
	DefaultIdleTimeout       = 2 * time.Minute
	DefaultWriteTimeout      = time.Minute
	DefaultMaxConnsPerClient = 64
)

func (h *HTTP) applyDefaults() {
	if h.ShutdownTimeout == "" {
		h.ShutdownTimeout = DefaultShutdownTimeout.String()
	}
	if h.IdleTimeout == "" {
		h.IdleTimeout = DefaultIdleTimeout.String()
	}
	if h.WriteTimeout == "" {
		h.WriteTimeout = DefaultWriteTimeout.String()
	}
	if h.MaxConnsPerClient == 0 {
		h.MaxConnsPerClient = DefaultMaxConnsPerClient
	}
}

func (h *HTTP) validate() error {
	for _, d := range []struct{ key, val string }{
		{"shutdown_timeout", h.ShutdownTimeout}, {"idle_timeout", h.IdleTimeout}, {"write_timeout", h.WriteTimeout},
	} {
		v, err := time.ParseDuration(d.val)
		if err != nil || v <= 0 {
			return fmt.Errorf("http.%s must be a positive duration like \"30s\" or \"2m\", got %q", d.key, d.val)
		}
	}
	if h.MaxConnsPerClient < 0 {
		return fmt.Errorf("http.max_conns_per_client must not be negative, got %d", h.MaxConnsPerClient)
	}
	return nil
}

// Shutdown is [http] shutdown_timeout.
func (h *HTTP) Shutdown() time.Duration {
	return mustDuration(h.ShutdownTimeout, DefaultShutdownTimeout)
}

// Idle is [http] idle_timeout.
func (h *HTTP) Idle() time.Duration { return mustDuration(h.IdleTimeout, DefaultIdleTimeout) }

// Write is [http] write_timeout.
func (h *HTTP) Write() time.Duration { return mustDuration(h.WriteTimeout, DefaultWriteTimeout) }

// mustDuration parses a validated duration, or gives def for one that was
// never validated (a Config built in Go).
func mustDuration(s string, def time.Duration) time.Duration {
	d, err := time.ParseDuration(s)
	if err != nil || d <= 0 {
		return def
	}
	return d
}
