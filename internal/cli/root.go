// Package cli implements the noid command line, one file per command. Every
// command talks to noid-server through the public client package.
package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/noid-vm/noid/client"
)

// Version is the CLI's version, set at build time.
var Version = "0.1.0-dev"

// exitError carries a process exit code (for exec) without printing anything.
type exitError struct{ code int }

func (e *exitError) Error() string { return fmt.Sprintf("exit status %d", e.code) }

// usageError marks bad command-line usage (exit code 2).
type usageError struct{ err error }

func (e *usageError) Error() string { return e.err.Error() }
func (e *usageError) Unwrap() error { return e.err }

func usagef(format string, a ...any) error { return &usageError{fmt.Errorf(format, a...)} }

// env is what every command needs: streams and a lazily built client.
type env struct {
	stdin          io.Reader
	stdout, stderr io.Writer
	getenv         func(string) string
	getwd          func() (string, error)
	cl             *client.Client
	clErr          error
	resolved       bool
	target         string
	// active is set once a command used the active VM instead of an
	// explicit name: the name and where it came from.
	active, activeFrom string
	// progressDelay is how long work runs before progress is shown on a
	// terminal (short jobs stay silent).
	progressDelay time.Duration
	// isTTY reports whether w is a terminal; tests replace it.
	isTTY func(w io.Writer) bool
}

// newEnv returns an env with the defaults filled in.
func newEnv(stdin io.Reader, stdout, stderr io.Writer, getenv func(string) string) *env {
	return &env{stdin: stdin, stdout: stdout, stderr: stderr, getenv: getenv, getwd: os.Getwd,
		progressDelay: 500 * time.Millisecond, isTTY: isTerminal}
}

// isTerminal reports whether w is a terminal.
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	return ok && term.IsTerminal(int(f.Fd()))
}

func (e *env) client() (*client.Client, error) {
	if !e.resolved {
		e.resolved = true
		var legacy bool
		e.cl, e.target, legacy, e.clErr = connect(e.getenv)
		if legacy && e.clErr == nil {
			e.offerMigrate()
		}
	}
	return e.cl, e.clErr
}

// exactArgs is cobra.ExactArgs with a usage error and a readable message.
func exactArgs(n int, names string) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if len(args) != n {
			return usagef("%s needs %s (got %d arguments); see `%s --help`", cmd.Name(), names, len(args), cmd.CommandPath())
		}
		return nil
	}
}

func rangeArgs(min, max int, names string) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if len(args) < min || len(args) > max {
			return usagef("%s takes %s (got %d arguments); see `%s --help`", cmd.Name(), names, len(args), cmd.CommandPath())
		}
		return nil
	}
}

// newRoot builds the command tree.
func newRoot(e *env) *cobra.Command {
	root := &cobra.Command{
		Use:   "noid",
		Short: "noid: microVMs with instant checkpoint, rewind and clone",
		Long: `noid gives every agent, test run or developer a real Linux VM that is as cheap as a process.

It talks to noid-server over the local unix socket (no set-up) or over HTTPS
with a token (NOID_URL and NOID_TOKEN, or ` + "`noid auth setup`" + `).`,
		Example: `  noid create dev
  noid exec dev -- uname -a
  noid checkpoint dev clean
  noid restore dev clean
  noid use dev && noid exec -- ls /     # dev is now the active VM here`,
		SilenceUsage:      true,
		SilenceErrors:     true,
		CompletionOptions: cobra.CompletionOptions{DisableDefaultCmd: true},
	}
	var showVersion bool
	root.Flags().BoolVar(&showVersion, "version", false, "print the client's version and the server's (as `noid version`)")
	root.RunE = func(cmd *cobra.Command, args []string) error {
		if showVersion {
			return printVersion(cmd.Context(), e, false)
		}
		return cmd.Help()
	}
	root.SetIn(e.stdin)
	root.SetOut(e.stdout)
	root.SetErr(e.stderr)
	root.SetFlagErrorFunc(func(c *cobra.Command, err error) error {
		return &usageError{fmt.Errorf("%v; see `%s --help`", err, c.CommandPath())}
	})
	root.AddCommand(
		newCreateCmd(e), newExecCmd(e), newConsoleCmd(e), newListCmd(e), newInfoCmd(e), newDestroyCmd(e),
		newLogsCmd(e), newCheckpointCmd(e), newCheckpointsCmd(e), newRestoreCmd(e), newWhoamiCmd(e),
		newAuthCmd(e), newVersionCmd(e), newGoldenCmd(e), newRemoteCmd(e), newUseCmd(e), newCurrentCmd(e), newCpCmd(e),
		newCompletionCmd(e),
	)
	// cobra's help command, with an example like every other command.
	root.InitDefaultHelpCmd()
	for _, c := range root.Commands() {
		if c.Name() == "help" {
			c.Example = "  noid help exec\n  noid help checkpoint rm"
		}
	}
	return root
}

// Main runs the CLI with os.Args and returns the process exit code.
func Main() int {
	return run(newEnv(os.Stdin, os.Stdout, os.Stderr, os.Getenv), os.Args[1:])
}

// Run runs the CLI with explicit streams and environment (tests).
func Run(args []string, stdin io.Reader, stdout, stderr io.Writer, getenv func(string) string) int {
	return run(newEnv(stdin, stdout, stderr, getenv), args)
}

func run(e *env, args []string) int {
	root := newRoot(e)
	root.SetArgs(args)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	err := root.ExecuteContext(ctx)
	if err == nil {
		return 0
	}
	var ee *exitError
	if errors.As(err, &ee) {
		return ee.code
	}
	fmt.Fprintf(e.stderr, "noid: %s\n", err)
	if h := hintFor(e, err); h != "" {
		fmt.Fprintf(e.stderr, "hint: %s\n", h)
	}
	var ue *usageError
	if errors.As(err, &ue) || strings.HasPrefix(err.Error(), "unknown command") {
		return 2
	}
	return 1
}
