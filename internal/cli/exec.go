package cli

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/noid-vm/noid/client"
)

func newExecCmd(e *env) *cobra.Command {
	var envs, envFiles []string
	var cwd string
	var tty bool
	var timeout time.Duration
	var user string
	cmd := &cobra.Command{
		Use:   "exec [<vm>] [flags] [-- <command> [args...]]",
		Short: "Run a command in a VM",
		Long: `Run a command in a VM. stdout and stderr are streamed separately as they are
produced, stdin is forwarded, and noid exec exits with the command's exit code:
127 if the command does not exist, 126 if it cannot be executed, as in a shell.
Ctrl-C is passed to the remote process. With no command, it opens the console,
with the -e, --env-file and -w settings applied to its shell.
The command runs as root, or as --user (a user of the VM's /etc/passwd; the
images have noid, with passwordless sudo on Debian) or the server's default.

What comes before -- is the VM, what comes after it is the command:
  noid exec dev -- ls    runs ls in dev
  noid exec -- ls        runs ls in the active VM
  noid exec dev          opens a console in dev
  noid exec              opens a console in the active VM
Without --, the first argument is the VM and the rest is the command
(noid exec dev ls), so a command with flags needs --.

Environment: -e KEY=VALUE sets a variable; -e KEY passes KEY's value from
your own environment, and --env-file FILE reads KEY=VALUE and KEY lines
from a file (# starts a comment), so secrets stay out of the command line
that ps shows. A KEY that is not set in your environment is left out.
-e wins over --env-file, and a later file over an earlier one.
` + activeHelp,
		Example: `  noid exec dev -- uname -r
  echo hi | noid exec dev -- cat
  noid exec dev -e DEBUG=1 -w /srv -- ./run.sh
  API_KEY=… noid exec dev -e API_KEY -- ./deploy.sh
  noid exec dev --env-file .env -- ./run.sh
  noid exec dev -e STAGE=test       # a console whose shell has STAGE=test
  noid exec dev -t -- top
  noid exec dev --timeout 30s -- make test
  noid exec dev --user noid -- sh -c 'sudo apt-get update && sudo apt-get install -y git'
  noid use dev && noid exec -- ls -la /root`,
		Args: func(cmd *cobra.Command, args []string) error {
			if d := cmd.ArgsLenAtDash(); d > 1 {
				return usagef("exec takes at most one VM name before `--`, got %q", args[:d])
			}
			return nil
		},
		ValidArgsFunction: completeVMs(e, 1),
		RunE: func(cmd *cobra.Command, args []string) error {
			explicit, argv := "", args
			if d := cmd.ArgsLenAtDash(); d != 0 && len(args) > 0 {
				explicit, argv = args[0], args[1:]
			}
			vm, err := e.vmName(cmd, explicit)
			if err != nil {
				return err
			}
			envMap, err := execEnv(envFiles, envs, os.LookupEnv)
			if err != nil {
				return err
			}
			if len(argv) == 0 {
				// A console with the environment and working directory
				// asked for (-t and --timeout do not apply to it).
				return runConsole(cmd.Context(), e, vm, client.ExecRequest{User: user, Env: envMap, Cwd: cwd})
			}
			if timeout < 0 {
				return usagef("--timeout must not be negative")
			}
			c, err := e.client()
			if err != nil {
				return err
			}
			req := client.ExecRequest{Argv: argv, Env: envMap, Cwd: cwd, TTY: tty, TimeoutMs: timeout.Milliseconds(), User: user}
			st, err := execInteractive(cmd.Context(), e, c, vm, req)
			if err != nil {
				return err
			}
			if st.Message != "" {
				fmt.Fprintf(e.stderr, "noid: %s\n", st.Message)
			}
			if st.TimedOut {
				fmt.Fprintf(e.stderr, "noid: command timed out after %s\n", timeout)
			}
			if st.Code != 0 {
				return &exitError{code: st.Code}
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringArrayVarP(&envs, "env", "e", nil, "set an environment variable: KEY=VALUE, or KEY to pass your own value of KEY (repeatable)")
	f.StringArrayVar(&envFiles, "env-file", nil, "read environment variables from a file of KEY=VALUE and KEY lines (repeatable)")
	f.StringVarP(&cwd, "workdir", "w", "", "working directory in the VM")
	f.BoolVarP(&tty, "tty", "t", false, "allocate a pseudo-terminal")
	f.DurationVar(&timeout, "timeout", 0, "kill the command after this long (exit code 124)")
	f.StringVarP(&user, "user", "u", "", "run as this user of the VM (name or uid; default: the server's, root)")
	return cmd
}

// execEnv builds an exec's environment as docker run does: the --env-file
// files in order, then the -e flags. A KEY=VALUE entry sets KEY; a bare KEY
// takes its value from lookup (the caller's environment) and is left out
// when that has none. In a file, blank lines and lines starting with # are
// skipped, leading white space and a CRLF's CR are ignored and the value is
// the rest of the line, as it is.
func execEnv(files, flags []string, lookup func(string) (string, bool)) (map[string]string, error) {
	env := map[string]string{}
	set := func(kv, where string) error {
		k, v, ok := strings.Cut(kv, "=")
		if k == "" || strings.ContainsAny(k, " \t") {
			return usagef("%s: %q is not KEY=VALUE or KEY", where, kv)
		}
		if !ok {
			if v, ok = lookup(k); !ok {
				return nil
			}
		}
		env[k] = v
		return nil
	}
	for _, name := range files {
		b, err := os.ReadFile(name)
		if err != nil {
			return nil, usagef("--env-file: %v", err)
		}
		text := strings.TrimPrefix(string(b), "\ufeff")
		for i, line := range strings.Split(text, "\n") {
			line = strings.TrimLeft(strings.TrimSuffix(line, "\r"), " \t")
			if line == "" || strings.HasPrefix(line, "#") {
				continue
			}
			if err := set(line, fmt.Sprintf("--env-file %s line %d", name, i+1)); err != nil {
				return nil, err
			}
		}
	}
	for _, kv := range flags {
		if err := set(kv, "-e"); err != nil {
			return nil, err
		}
	}
	return env, nil
}

// execInteractive runs req with the local terminal and signals wired up.
func execInteractive(ctx context.Context, e *env, c *client.Client, vm string, req client.ExecRequest) (client.ExitStatus, error) {
	eio := client.ExecIO{Stdin: e.stdin, Stdout: e.stdout, Stderr: e.stderr}
	sigs := make(chan syscall.Signal, 4)
	eio.Signals = sigs
	local := make(chan os.Signal, 4)
	fwd := []os.Signal{syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGQUIT}
	signal.Notify(local, fwd...)
	defer signal.Stop(local)
	go func() {
		for s := range local {
			if ss, ok := s.(syscall.Signal); ok {
				select {
				case sigs <- ss:
				default:
				}
			}
		}
	}()
	if req.TTY {
		if f, ok := e.stdin.(*os.File); ok && term.IsTerminal(int(f.Fd())) {
			old, err := term.MakeRaw(int(f.Fd()))
			if err == nil {
				defer term.Restore(int(f.Fd()), old)
			}
			if w, h, err := term.GetSize(int(f.Fd())); err == nil {
				req.Rows, req.Cols = h, w
			}
			eio.Resize = watchResize(ctx, int(f.Fd()))
		}
	}
	return c.Exec(ctx, vm, req, eio)
}

// watchResize reports terminal size changes (SIGWINCH).
func watchResize(ctx context.Context, fd int) <-chan client.WindowSize {
	out := make(chan client.WindowSize, 1)
	ch := make(chan os.Signal, 1)
	signal.Notify(ch, syscall.SIGWINCH)
	go func() {
		defer signal.Stop(ch)
		for {
			select {
			case <-ctx.Done():
				return
			case <-ch:
				if w, h, err := term.GetSize(fd); err == nil {
					select {
					case out <- client.WindowSize{Rows: h, Cols: w}:
					default:
					}
				}
			}
		}
	}()
	return out
}
