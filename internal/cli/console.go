package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/noid-vm/noid/client"
)

// DetachKey is the byte that detaches from a console: Ctrl-] (0x1d), as in
// telnet and virsh.
const DetachKey = 0x1d

func newConsoleCmd(e *env) *cobra.Command {
	var user string
	cmd := &cobra.Command{
		Use:   "console [<vm>]",
		Short: "Open an interactive shell in a VM (Ctrl-] detaches)",
		Long: `Open an interactive login shell on a PTY served by the VM's agent. The window
size follows your terminal. Press Ctrl-] to detach: the shell is closed and the
VM keeps running. Typing exit also ends the session. ` + "`noid exec <vm>`" + ` with no
command does the same.
` + activeHelp,
		Example: `  noid console dev
  noid console dev --user noid
  noid console            # the active VM`,
		Args:              rangeArgs(0, 1, "an optional VM name"),
		ValidArgsFunction: completeVMs(e, 1),
		RunE: func(cmd *cobra.Command, args []string) error {
			vm, err := e.firstOrActive(cmd, args)
			if err != nil {
				return err
			}
			return runConsole(cmd.Context(), e, vm, client.ExecRequest{User: user})
		},
	}
	cmd.Flags().StringVarP(&user, "user", "u", "", "log in as this user of the VM (name or uid; default: the server's, root)")
	return cmd
}

// errDetached ends a console session on the detach key.
var errDetached = errors.New("detached")

// detachReader passes input through until the detach key, then cancels.
type detachReader struct {
	r      io.Reader
	cancel context.CancelFunc
	hit    bool
}

func (d *detachReader) Read(p []byte) (int, error) {
	n, err := d.r.Read(p)
	for i := 0; i < n; i++ {
		if p[i] == DetachKey {
			d.hit = true
			d.cancel()
			return i, io.EOF
		}
	}
	return n, err
}

// runConsole opens a console in vm with req's User (empty: the server's
// default), Env and Cwd; the terminal's size is filled in here.
func runConsole(ctx context.Context, e *env, vm string, req client.ExecRequest) error {
	c, err := e.client()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	rows, cols := 24, 80
	eio := client.ExecIO{Stdout: e.stdout, Stderr: e.stderr}
	dr := &detachReader{r: e.stdin, cancel: cancel}
	eio.Stdin = dr
	if f, ok := e.stdin.(*os.File); ok && term.IsTerminal(int(f.Fd())) {
		old, err := term.MakeRaw(int(f.Fd()))
		if err == nil {
			defer term.Restore(int(f.Fd()), old)
		}
		if w, h, err := term.GetSize(int(f.Fd())); err == nil {
			rows, cols = h, w
		}
		eio.Resize = watchResize(ctx, int(f.Fd()))
		fmt.Fprintf(e.stderr, "connected to %s; press Ctrl-] to detach\r\n", vm)
	}
	req.Rows, req.Cols = rows, cols
	st, err := c.ConsoleWith(ctx, vm, req, eio)
	if dr.hit {
		fmt.Fprintf(e.stderr, "\r\ndetached from %s; the VM keeps running\r\n", vm)
		return nil
	}
	if err != nil {
		return err
	}
	if st.Message != "" {
		fmt.Fprintf(e.stderr, "noid: %s\n", st.Message)
	}
	if st.Code != 0 {
		return &exitError{code: st.Code}
	}
	return nil
}
