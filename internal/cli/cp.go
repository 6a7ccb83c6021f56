package cli

import (
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/noid-vm/noid/client"
	"github.com/noid-vm/noid/internal/api"
)

// cpArg is one side of `noid cp`.
type cpArg struct {
	remote bool   // VM:PATH (or :PATH for the active VM)
	vm     string // empty with :PATH until resolved
	path   string
	stdio  bool // "-": a tar stream on stdin or stdout
}

// parseCpArg reads VM:PATH, :PATH, - or a local path. A local path that
// contains a colon can be written as ./a:b.
func parseCpArg(s string) cpArg {
	if s == "-" {
		return cpArg{stdio: true, path: s}
	}
	if strings.HasPrefix(s, "/") || strings.HasPrefix(s, ".") {
		return cpArg{path: s}
	}
	if name, p, ok := strings.Cut(s, ":"); ok && (name == "" || api.ValidateVMRef(name) == nil) {
		return cpArg{remote: true, vm: name, path: p}
	}
	return cpArg{path: s}
}

func newCpCmd(e *env) *cobra.Command {
	var quiet bool
	cmd := &cobra.Command{
		Use:   "cp <src> <dst>",
		Short: "Copy files and directories between the host and a VM",
		Long: `Copy a file or a directory tree between the host and a VM, in either direction.
One side is VM:PATH (PATH absolute in the VM), or :PATH for the active VM (see
` + "`noid use`" + `); the other is a local path. The data streams as tar through the VM's
agent; modes and modification times are kept.

Like cp -r: when the destination is an existing directory, or ends with /, the
source is copied into it under its own name; otherwise it is copied to the
destination name itself. A source ending in /. copies the contents of that
directory. Symlinks are copied as links and never followed. Files copied into a
VM belong to root; files copied out belong to you, with modes limited by your
umask and without setuid/setgid bits.

Entries that would land outside the destination, through "..", an absolute
name or a symlink (in the data or already on the receiving side), are refused
and the copy fails; so is anything but the file itself when copying a file out
of a VM. Devices and fifos are skipped. A - instead of the local path reads or writes a tar stream
on stdin or stdout. Progress is shown on a terminal for long copies; piped or
with --quiet, cp prints nothing.`,
		Example: `  noid cp ./src dev:/root/            # -> /root/src in the VM
  noid cp dev:/var/log/app.log .       # -> ./app.log
  noid cp dev:/etc/os-release ./os.txt # copy under another name
  noid cp ./site/. dev:/srv/www        # the contents of ./site
  noid cp ./notes.md :/root/           # the active VM
  tar -C build -c . | noid cp - dev:/opt/app`,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) != 2 {
				return usagef("cp needs a source and a destination, one of them VM:PATH (got %d arguments); see `noid cp --help`", len(args))
			}
			src, dst := parseCpArg(args[0]), parseCpArg(args[1])
			switch {
			case src.remote == dst.remote && !src.remote:
				return usagef("cp needs one side in a VM, written VM:PATH (or :PATH for the active VM)")
			case src.remote && dst.remote:
				return usagef("cp copies between the host and a VM; to copy from VM to VM, go through the host")
			}
			for _, a := range []cpArg{src, dst} {
				if a.remote && !strings.HasPrefix(a.path, "/") {
					return usagef("the path in the VM must be absolute: %s:/%s", a.vm, strings.TrimPrefix(a.path, "/"))
				}
			}
			return nil
		},
		ValidArgsFunction: func(cmd *cobra.Command, args []string, toComplete string) ([]string, cobra.ShellCompDirective) {
			if strings.Contains(toComplete, ":") || strings.HasPrefix(toComplete, ".") || strings.HasPrefix(toComplete, "/") {
				return nil, cobra.ShellCompDirectiveDefault
			}
			var out []string
			for _, n := range vmNames(e, cmd.Context(), toComplete) {
				out = append(out, n+":/")
			}
			return out, cobra.ShellCompDirectiveNoSpace | cobra.ShellCompDirectiveDefault
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			src, dst := parseCpArg(args[0]), parseCpArg(args[1])
			remote := &src
			if dst.remote {
				remote = &dst
			}
			vm, err := e.vmName(cmd, remote.vm)
			if err != nil {
				return err
			}
			remote.vm = vm
			c, err := e.client()
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			start := time.Now()
			if dst.remote {
				if src.stdio {
					res, err := c.PutFiles(ctx, vm, dst.path, e.stdin)
					if err != nil {
						return fmt.Errorf("extracting the tar stream from stdin into %s:%s: %w", vm, dst.path, err)
					}
					e.newProgress("", quiet).finish(fmt.Sprintf("extracted %d entries (%s) into %s:%s in %s", res.Entries, bytesHuman(res.Bytes), vm, dst.path, human(time.Since(start))))
					return nil
				}
				p := e.newProgress("copying to "+vm+":"+dst.path, quiet)
				res, err := c.CopyToVM(ctx, vm, src.path, dst.path, &client.CopyOptions{Progress: p.update})
				if err != nil {
					p.finish("")
					return err
				}
				p.finish(fmt.Sprintf("copied %s to %s:%s: %d entries, %s in %s", src.path, vm, res.Dest, res.Entries, bytesHuman(res.Bytes), human(time.Since(start))))
				return nil
			}
			if dst.stdio {
				rc, err := c.GetFiles(ctx, vm, src.path)
				if err != nil {
					return fmt.Errorf("copying %s:%s: %w", vm, src.path, err)
				}
				defer rc.Close()
				if _, err := io.Copy(e.stdout, rc); err != nil {
					return fmt.Errorf("copying %s:%s to stdout: %w", vm, src.path, err)
				}
				return nil
			}
			p := e.newProgress("copying "+vm+":"+src.path, quiet)
			res, err := c.CopyFromVM(ctx, vm, src.path, dst.path, &client.CopyOptions{Progress: p.update})
			if err != nil {
				p.finish("")
				return err
			}
			p.finish(fmt.Sprintf("copied %s:%s to %s: %d entries, %s in %s", vm, src.path, res.Dest, res.Entries, bytesHuman(res.Bytes), human(time.Since(start))))
			return nil
		},
	}
	cmd.Flags().BoolVarP(&quiet, "quiet", "q", false, "print nothing, even on a terminal")
	return cmd
}
