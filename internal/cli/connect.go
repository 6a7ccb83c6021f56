package cli

import (
	"errors"
	"fmt"
	"io/fs"
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
	return filepath.Join(homeDir(getenv), ".config", "noid", "config.toml")
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
// by `noid auth setup`, then, when that file does not exist, the Rust
// noid's ~/.noid/config.toml (legacy is then true), then the local unix
// sockets.
func connect(getenv func(string) string) (c *client.Client, target string, legacy bool, err error) {
	if u := getenv("NOID_URL"); u != "" {
		c, err := client.New(u, getenv("NOID_TOKEN"))
		return c, u, false, err
	}
	ac, err := readAuthConfig(getenv)
	if errors.Is(err, fs.ErrNotExist) {
		if ac, err = readLegacyConfig(getenv); err == nil {
			legacy = true
		}
	}
	if err == nil && ac.URL != "" {
		tok := ac.Token
		if t := getenv("NOID_TOKEN"); t != "" {
			tok = t
		}
		c, err := client.New(ac.URL, tok)
		return c, ac.URL, legacy, err
	}
	candidates := []string{SystemSocket}
	if home := getenv("HOME"); home != "" {
		candidates = append(candidates, filepath.Join(home, ".noid", "noid.sock"))
	}
	for _, p := range candidates {
		if fi, err := os.Stat(p); err == nil && fi.Mode()&os.ModeSocket != 0 {
			c, err := client.New("unix://"+p, getenv("NOID_TOKEN"))
			return c, "unix://" + p, false, err
		}
	}
	return nil, "", false, errdefs.WithHint(fmt.Errorf("%w: no noid-server found (looked at NOID_URL, %s, %s and %v)", errdefs.ErrUnavailable, authConfigPath(getenv), legacyConfigPath(getenv), candidates),
		"start it with `noid-server serve --config /etc/noid/config.toml` (or `systemctl start noid-server`), or point NOID_URL at it")
}
