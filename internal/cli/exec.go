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
	var envs []string
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
Ctrl-C is passed to the remote process. With no command, it opens the console.
The command runs as root, or as --user (a user of the VM's /etc/passwd; the
images have noid, with passwordless sudo on Debian) or the server's default.

What comes before -- is the VM, what comes after it is the command:
  noid exec dev -- ls    runs ls in dev
  noid exec -- ls        runs ls in the active VM
  noid exec dev          opens a console in dev
  noid exec              opens a console in the active VM
Without --, the first argument is the VM and the rest is the command
(noid exec dev ls), so a command with flags needs --.
` + activeHelp,
		Example: `  noid exec dev -- uname -r
  echo hi | noid exec dev -- cat
  noid exec dev -e API_KEY=secret -w /srv -- ./run.sh
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
			if len(argv) == 0 {
				return runConsole(cmd.Context(), e, vm, user)
			}
			envMap := map[string]string{}
			for _, kv := range envs {
				k, v, ok := strings.Cut(kv, "=")
				if !ok || k == "" {
					return usagef("-e needs KEY=VALUE, got %q", kv)
				}
				envMap[k] = v
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
	f.StringArrayVarP(&envs, "env", "e", nil, "set an environment variable KEY=VALUE (repeatable)")
	f.StringVarP(&cwd, "workdir", "w", "", "working directory in the VM")
	f.BoolVarP(&tty, "tty", "t", false, "allocate a pseudo-terminal")
	f.DurationVar(&timeout, "timeout", 0, "kill the command after this long (exit code 124)")
	f.StringVarP(&user, "user", "u", "", "run as this user of the VM (name or uid; default: the server's, root)")
	return cmd
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
