package cli

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/pelletier/go-toml/v2"
)

// legacyClientConfig is the Rust noid's client config, ~/.noid/config.toml:
// a [server] section with url and token (other keys are ignored).
type legacyClientConfig struct {
	Server *authConfig `toml:"server"`
}

// legacyConfigPath is the Rust noid's client config file.
func legacyConfigPath(getenv func(string) string) string {
	return filepath.Join(homeDir(getenv), ".noid", "config.toml")
}

// homeDir is $HOME, or the user's home from the system.
func homeDir(getenv func(string) string) string {
	home := getenv("HOME")
	if home == "" {
		home, _ = os.UserHomeDir()
	}
	return home
}

// readLegacyConfig reads the Rust noid's client config. A file without a
// [server] url gives fs.ErrNotExist, as a missing file does.
func readLegacyConfig(getenv func(string) string) (*authConfig, error) {
	path := legacyConfigPath(getenv)
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var c legacyClientConfig
	if err := toml.Unmarshal(b, &c); err != nil {
		return nil, fmt.Errorf("reading %s: %w", path, err)
	}
	if c.Server == nil || c.Server.URL == "" {
		return nil, fmt.Errorf("%s has no [server] url: %w", path, fs.ErrNotExist)
	}
	return c.Server, nil
}

// writeAuthConfig writes ac to our client config file (mode 0600, by a
// rename, so a reader never sees half a file).
func writeAuthConfig(getenv func(string) string, ac authConfig) (string, error) {
	path := authConfigPath(getenv)
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return "", fmt.Errorf("creating %s: %w", filepath.Dir(path), err)
	}
	b, err := toml.Marshal(ac)
	if err != nil {
		return "", err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return "", fmt.Errorf("writing %s: %w", path, err)
	}
	if err := os.Chmod(tmp, 0o600); err != nil {
		return "", err
	}
	if err := os.Rename(tmp, path); err != nil {
		return "", fmt.Errorf("writing %s: %w", path, err)
	}
	return path, nil
}

// migrateOfferedPath marks that the offer to migrate the Rust noid's
// config was printed, so it is printed once.
func migrateOfferedPath(getenv func(string) string) string {
	return filepath.Join(filepath.Dir(authConfigPath(getenv)), "migrate-offered")
}

// offerMigrate prints, the first time the Rust noid's config is used, how
// to move it into ours; later uses are silent.
func (e *env) offerMigrate() {
	mark := migrateOfferedPath(e.getenv)
	if _, err := os.Stat(mark); err == nil {
		return
	}
	fmt.Fprintf(e.stderr, "noid: using the server and token of the Rust noid's %s; `noid auth migrate` copies them to %s (the old file stays)\n",
		legacyConfigPath(e.getenv), authConfigPath(e.getenv))
	if os.MkdirAll(filepath.Dir(mark), 0o700) == nil {
		os.WriteFile(mark, nil, 0o600)
	}
}

// migrateLegacyConfig copies the Rust noid's client config into ours,
// leaving the old file as it is. An existing config of ours is kept
// unless force.
func migrateLegacyConfig(getenv func(string) string, force bool) (*authConfig, string, error) {
	old, err := readLegacyConfig(getenv)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, "", usagef("nothing to migrate: %s (the Rust noid's client config, with a [server] url) was not found", legacyConfigPath(getenv))
	}
	if err != nil {
		return nil, "", err
	}
	if _, err := os.Stat(authConfigPath(getenv)); err == nil && !force {
		return nil, "", usagef("%s already exists; it was left as is (use --force to replace it)", authConfigPath(getenv))
	}
	path, err := writeAuthConfig(getenv, authConfig{URL: old.URL, Token: old.Token})
	return old, path, err
}
