package config

import (
	"fmt"
	"os"
)

// Legacy holds the keys of the Rust noid's server.toml (noid-cli v0.2.x)
// that have no key of the same name here. noid-server accepts them so an
// old config starts the server; each one gives a deprecation warning
// (Config.Warnings) and is mapped to its new key where there is one. The
// original's other keys (listen, kernel, rootfs) have the same names and
// meanings here and need nothing.
type Legacy struct {
	// TrustForwardedFor is the original's trust_forwarded_for: now
	// trust_proxy.
	TrustForwardedFor *bool `toml:"trust_forwarded_for,omitempty"`
	// MaxWSSessions is the original's max_ws_sessions (WebSocket sessions
	// over all users): now [limits] sessions_per_user, which counts each
	// user's exec and console sessions.
	MaxWSSessions *int `toml:"max_ws_sessions,omitempty"`
	// ExecTimeoutSecs is the original's exec_timeout_secs (a cap on every
	// exec): no effect; a command runs until it exits or its own
	// `noid exec --timeout`.
	ExecTimeoutSecs *int64 `toml:"exec_timeout_secs,omitempty"`
	// ConsoleTimeoutSecs is the original's console_timeout_secs (a cap on
	// a console session): no effect; a console stays open while its
	// client answers the server's pings.
	ConsoleTimeoutSecs *int64 `toml:"console_timeout_secs,omitempty"`
}

// applyLegacy maps the Legacy keys onto their new keys, where there is
// one and the new key is not set too, records one warning per key in
// c.Warnings and clears them. It runs before the defaults are applied, so
// "not set" means what the file said.
func (c *Config) applyLegacy() {
	l := &c.Legacy
	if v := l.TrustForwardedFor; v != nil {
		if c.TrustProxy != *v && c.TrustProxy {
			c.warnf("trust_forwarded_for (from the Rust noid) is deprecated: use trust_proxy; trust_proxy = true is set too and wins")
		} else {
			c.TrustProxy = *v
			c.warnf("trust_forwarded_for (from the Rust noid) is deprecated: use trust_proxy; trust_proxy = %t applied", *v)
		}
	}
	if v := l.MaxWSSessions; v != nil {
		switch {
		case c.Limits.SessionsPerUser != 0:
			c.warnf("max_ws_sessions (from the Rust noid) is deprecated: use [limits] sessions_per_user; it is set too and wins (%d)", c.Limits.SessionsPerUser)
		case *v < 1 || *v > 100000:
			c.warnf("max_ws_sessions (from the Rust noid) is deprecated: use [limits] sessions_per_user; %d is out of its range 1..100000, so its default (%d) applies", *v, DefaultSessionsPerUser)
		default:
			c.Limits.SessionsPerUser = *v
			c.warnf("max_ws_sessions (from the Rust noid) is deprecated: use [limits] sessions_per_user (each user's exec and console sessions, not the server's); sessions_per_user = %d applied", *v)
		}
	}
	if l.ExecTimeoutSecs != nil {
		c.warnf("exec_timeout_secs (from the Rust noid) has no effect: commands run until they exit; give one a limit with `noid exec --timeout`")
	}
	if l.ConsoleTimeoutSecs != nil {
		c.warnf("console_timeout_secs (from the Rust noid) has no effect: a console stays open until it is closed or its client stops answering; see [http] in docs/config.md")
	}
	*l = Legacy{}
}

func (c *Config) warnf(format string, a ...any) {
	c.Warnings = append(c.Warnings, fmt.Sprintf(format, a...))
}

// The config files noid-server reads when --config is not given, in order:
// ours, then the Rust noid's.
const (
	SystemConfigPath = "/etc/noid/config.toml"
	LegacyConfigPath = "/etc/noid/server.toml"
)

// FindDefault returns the config file to read when none was named: the
// first of candidates that exists, or "" (the built-in defaults) when none
// does. noid-server calls it with SystemConfigPath and LegacyConfigPath.
func FindDefault(candidates ...string) (string, error) {
	for _, p := range candidates {
		_, err := os.Stat(p)
		if err == nil {
			return p, nil
		}
		if !os.IsNotExist(err) {
			return "", fmt.Errorf("looking for a config file at %s: %w", p, err)
		}
	}
	return "", nil
}
