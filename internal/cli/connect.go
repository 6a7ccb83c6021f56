package cli

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/pelletier/go-toml/v2"

	"github.com/noid-vm/noid/client"
	"github.com/noid-vm/noid/internal/config"
	"github.com/noid-vm/noid/internal/errdefs"
)

// SystemSocket is where a root noid-server listens by default, reachable by
// every local user.
const SystemSocket = config.SystemSocket

// authConfig is the file written by `noid auth setup` (mode 0600).
type authConfig struct {
	URL   string `toml:"url"`
	Token string `toml:"token"`
}

// authConfigPath is ~/.config/noid/config.toml (or $XDG_CONFIG_HOME).
func authConfigPath(getenv func(string) string) string {
	if x := getenv("XDG_CONFIG_HOME"); x != "" {
		return filepath.Join(x, "noid", "config.toml")
	}
	home := getenv("HOME")
	if home == "" {
		home, _ = os.UserHomeDir()
	}
	return filepath.Join(home, ".config", "noid", "config.toml")
}

func readAuthConfig(getenv func(string) string) (*authConfig, error) {
	b, err := os.ReadFile(authConfigPath(getenv))
	if err != nil {
		return nil, err
	}
	var c authConfig
	if err := toml.Unmarshal(b, &c); err != nil {
		return nil, fmt.Errorf("reading %s: %w", authConfigPath(getenv), err)
	}
	return &c, nil
}

// connect finds the server: NOID_URL (+ NOID_TOKEN), then the file written
// by `noid auth setup`, then the local unix sockets.
func connect(getenv func(string) string) (*client.Client, string, error) {
	if u := getenv("NOID_URL"); u != "" {
		c, err := client.New(u, getenv("NOID_TOKEN"))
		return c, u, err
	}
	if ac, err := readAuthConfig(getenv); err == nil && ac.URL != "" {
		tok := ac.Token
		if t := getenv("NOID_TOKEN"); t != "" {
			tok = t
		}
		c, err := client.New(ac.URL, tok)
		return c, ac.URL, err
	}
	candidates := []string{SystemSocket}
	if home := getenv("HOME"); home != "" {
		candidates = append(candidates, filepath.Join(home, ".noid", "noid.sock"))
	}
	for _, p := range candidates {
		if fi, err := os.Stat(p); err == nil && fi.Mode()&os.ModeSocket != 0 {
			c, err := client.New("unix://"+p, getenv("NOID_TOKEN"))
			return c, "unix://" + p, err
		}
	}
	return nil, "", errdefs.WithHint(fmt.Errorf("%w: no noid-server found (looked at NOID_URL, %s and %v)", errdefs.ErrUnavailable, authConfigPath(getenv), candidates),
		"start it with `noid-server serve --config /etc/noid/config.toml` (or `systemctl start noid-server`), or point NOID_URL at it")
}
