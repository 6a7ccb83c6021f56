// Package servercli implements the noid-server command line: serve, image
// build, user management and storage set-up.
package servercli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"

	"github.com/noid-vm/noid/internal/config"
	"github.com/noid-vm/noid/internal/errdefs"
)

type env struct {
	stdout, stderr io.Writer
	configPath     string
	// defaultConfigs are the files looked for, in order, when --config is
	// not given (Main: ours, then the Rust noid's); empty means the
	// built-in defaults.
	defaultConfigs []string
	// configRead is the file config() read, "" for the built-in defaults.
	configRead string
}

func (e *env) config() (*config.Config, error) {
	path, err := e.configFile()
	if err != nil {
		return nil, err
	}
	cfg, err := config.Load(path)
	if err != nil {
		return nil, err
	}
	e.configRead = path
	return cfg, nil
}

// configFile is the file to read: --config, or without it the first of
// defaultConfigs that exists. A --config naming the first default (as the
// systemd unit does) that does not exist falls back to a later default
// that does, so a host set up for the Rust noid, with only
// /etc/noid/server.toml, starts.
func (e *env) configFile() (string, error) {
	if e.configPath == "" {
		return config.FindDefault(e.defaultConfigs...)
	}
	if len(e.defaultConfigs) > 0 && e.configPath == e.defaultConfigs[0] {
		p, err := config.FindDefault(e.defaultConfigs...)
		if err != nil || p == "" {
			return e.configPath, err
		}
		return p, nil
	}
	return e.configPath, nil
}

func (e *env) logger(cfg *config.Config) *slog.Logger {
	return newLogger(e.stderr, cfg, e.stderr == io.Writer(os.Stderr) && stderrIsJournal())
}

// usageError marks bad usage (exit code 2).
type usageError struct{ err error }

func (u *usageError) Error() string { return u.err.Error() }

func newRoot(e *env) *cobra.Command {
	root := &cobra.Command{
		Use:   "noid-server",
		Short: "The noid daemon: runs microVMs and serves the noid API",
		Example: `  noid-server image build --tiny
  noid-server serve --config /etc/noid/config.toml
  noid-server add-user alice`,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.SetOut(e.stdout)
	root.SetErr(e.stderr)
	root.PersistentFlags().StringVar(&e.configPath, "config", "", "config file (TOML); default: "+config.SystemConfigPath+", else "+config.LegacyConfigPath+" (the Rust noid's), else built-in defaults")
	root.SetFlagErrorFunc(func(c *cobra.Command, err error) error { return &usageError{err} })
	root.AddCommand(newServeCmd(e), newImageCmd(e), newAddUserCmd(e), newListUsersCmd(e), newRotateTokenCmd(e),
		newRemoveUserCmd(e), newStorageCmd(e), newImportCmd(e), newVersionCmd(e), newAuditCmd(e), newSetQuotaCmd(e), newDoctorCmd(e))
	return root
}

// Main runs noid-server with os.Args and returns the exit code.
func Main() int {
	e := &env{stdout: os.Stdout, stderr: os.Stderr, defaultConfigs: []string{config.SystemConfigPath, config.LegacyConfigPath}}
	root := newRoot(e)
	err := root.ExecuteContext(context.Background())
	if err == nil {
		return 0
	}
	fmt.Fprintf(e.stderr, "noid-server: %s\n", err)
	if h := errdefs.HintOf(err); h != "" {
		fmt.Fprintf(e.stderr, "hint: %s\n", h)
	}
	var ue *usageError
	if errors.As(err, &ue) || strings.HasPrefix(err.Error(), "unknown command") {
		return 2
	}
	return 1
}

// agentBinary finds noid-agent: the config, next to this executable, $PATH.
func agentBinary(cfg *config.Config) (string, error) {
	if cfg.AgentBinary != "" {
		return cfg.AgentBinary, nil
	}
	if exe, err := os.Executable(); err == nil {
		p := filepath.Join(filepath.Dir(exe), "noid-agent")
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	if p, err := exec.LookPath("noid-agent"); err == nil {
		return p, nil
	}
	return "", errdefs.WithHint(fmt.Errorf("%w: noid-agent binary not found next to noid-server or in $PATH", errdefs.ErrUnavailable),
		"build it with `make` (or `CGO_ENABLED=0 go build -o bin/noid-agent ./cmd/noid-agent`), or set agent_binary in the config")
}
