package cli

import (
	"bufio"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"

	"github.com/noid-vm/noid/client"
	"github.com/noid-vm/noid/internal/api"
	"github.com/noid-vm/noid/internal/errdefs"
)

// ActiveVMFile is the dotfile written by `noid use`: it names the active VM
// for its directory and every directory below it. It holds the VM name on
// one line.
const ActiveVMFile = ".noid-vm"

// activeHelp is the rule shared by every command that takes one VM.
const activeHelp = `
The VM may be left out when an active VM is set: NOID_VM, or else the
nearest ` + ActiveVMFile + ` file written by ` + "`noid use <vm>`" + ` in this directory or above.
A name given on the command line always wins.`

// findActiveVMFile walks up from dir to the root and returns the first
// ActiveVMFile found ("" when there is none).
func findActiveVMFile(dir string) (string, error) {
	dir, err := filepath.Abs(dir)
	if err != nil {
		return "", err
	}
	for {
		p := filepath.Join(dir, ActiveVMFile)
		fi, err := os.Stat(p)
		switch {
		case err == nil && fi.Mode().IsRegular():
			return p, nil
		case err != nil && !errors.Is(err, fs.ErrNotExist) && !errors.Is(err, fs.ErrPermission):
			return "", fmt.Errorf("looking for %s: %w", ActiveVMFile, err)
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", nil
		}
		dir = parent
	}
}

// readActiveVMFile returns the VM named in an ActiveVMFile: the first line
// that is neither empty nor a # comment.
func readActiveVMFile(p string) (string, error) {
	f, err := os.Open(p)
	if err != nil {
		return "", fmt.Errorf("reading the active VM: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		if err := api.ValidateVMRef(line); err != nil {
			return "", errdefs.WithHint(fmt.Errorf("%s: %w", p, err), "fix it with `noid use <vm>`, or remove it with `noid use --unset`")
		}
		return line, nil
	}
	if err := sc.Err(); err != nil {
		return "", fmt.Errorf("reading %s: %w", p, err)
	}
	return "", errdefs.WithHint(fmt.Errorf("%w: %s names no VM", errdefs.ErrInvalidArgument, p), "set one with `noid use <vm>`, or remove it with `noid use --unset`")
}

// activeVM returns the active VM and where it is set: NOID_VM, else the
// nearest ActiveVMFile. An empty name means none is set.
func (e *env) activeVM() (name, from string, err error) {
	if v := strings.TrimSpace(e.getenv("NOID_VM")); v != "" {
		if err := api.ValidateVMRef(v); err != nil {
			return "", "", fmt.Errorf("NOID_VM: %w", err)
		}
		return v, "NOID_VM", nil
	}
	wd, err := e.getwd()
	if err != nil {
		return "", "", fmt.Errorf("finding the current directory: %w", err)
	}
	p, err := findActiveVMFile(wd)
	if err != nil || p == "" {
		return "", "", err
	}
	name, err = readActiveVMFile(p)
	if err != nil {
		return "", "", err
	}
	return name, p, nil
}

// vmName returns explicit when it is set, else the active VM. With neither,
// it is a usage error that says how to name one.
func (e *env) vmName(cmd *cobra.Command, explicit string) (string, error) {
	if explicit != "" {
		return explicit, nil
	}
	name, from, err := e.activeVM()
	if err != nil {
		return "", err
	}
	if name == "" {
		return "", &usageError{errdefs.WithHint(fmt.Errorf("%s needs a VM name: none was given and no active VM is set here", cmd.Name()),
			"name one (see `"+cmd.CommandPath()+" --help`), or set the active VM for this directory with `noid use <vm>`")}
	}
	e.active, e.activeFrom = name, from
	return name, nil
}

// firstOrActive resolves commands whose only positional argument is an
// optional VM name.
func (e *env) firstOrActive(cmd *cobra.Command, args []string) (string, error) {
	if len(args) > 0 {
		return e.vmName(cmd, args[0])
	}
	return e.vmName(cmd, "")
}

func newUseCmd(e *env) *cobra.Command {
	var unset, noCheck bool
	cmd := &cobra.Command{
		Use:   "use <vm> | --unset",
		Short: "Set the active VM for this directory and the ones below it",
		Long: `Set the active VM for the current directory and its subdirectories, so that
commands taking one VM can leave its name out: ` + "`noid exec -- ls`" + `, ` + "`noid info`" + `,
` + "`noid checkpoint`" + `, ` + "`noid cp ./f :/root/`" + `.

It writes the VM name to ` + ActiveVMFile + ` in the current directory; commands find the
nearest one by walking up from where they run. NOID_VM overrides the file, and a
name given on the command line always wins. ` + "`noid destroy`" + ` never uses the active
VM. --unset removes the nearest ` + ActiveVMFile + `. ` + "`noid current`" + ` shows what is active.`,
		Example: `  noid use dev
  noid exec -- uname -a
  noid use --unset`,
		Args: func(cmd *cobra.Command, args []string) error {
			switch {
			case unset && len(args) > 0:
				return usagef("use --unset takes no VM name")
			case !unset && len(args) != 1:
				return usagef("use needs a VM name, or --unset; see `noid use --help`")
			}
			return nil
		},
		ValidArgsFunction: completeVMs(e, 1),
		RunE: func(cmd *cobra.Command, args []string) error {
			wd, err := e.getwd()
			if err != nil {
				return fmt.Errorf("finding the current directory: %w", err)
			}
			if unset {
				p, err := findActiveVMFile(wd)
				if err != nil {
					return err
				}
				if p == "" {
					fmt.Fprintln(e.stdout, "no active VM is set here")
					return nil
				}
				if err := os.Remove(p); err != nil {
					return fmt.Errorf("removing the active VM: %w", err)
				}
				fmt.Fprintf(e.stdout, "removed %s\n", p)
				if name, from, err := e.activeVM(); err == nil && name != "" {
					fmt.Fprintf(e.stdout, "the active VM is now %s (from %s)\n", name, from)
				}
				return nil
			}
			name := args[0]
			if err := api.ValidateVMRef(name); err != nil {
				return err
			}
			if !noCheck {
				c, err := e.client()
				if err != nil {
					return err
				}
				if _, err := c.GetVM(cmd.Context(), name); err != nil {
					if errors.Is(err, client.ErrNotFound) {
						return errdefs.WithHint(err, "`noid list` shows your VMs; --no-check sets it anyway")
					}
					return err
				}
			}
			p := filepath.Join(wd, ActiveVMFile)
			tmp := p + ".tmp"
			if err := os.WriteFile(tmp, []byte(name+"\n"), 0o644); err != nil {
				return fmt.Errorf("setting the active VM: %w", err)
			}
			if err := os.Rename(tmp, p); err != nil {
				os.Remove(tmp)
				return fmt.Errorf("setting the active VM: %w", err)
			}
			fmt.Fprintf(e.stdout, "active VM for %s and below: %s\n", wd, name)
			if v := e.getenv("NOID_VM"); v != "" && v != name {
				fmt.Fprintf(e.stderr, "warning: NOID_VM=%s is set and takes precedence in this shell\n", v)
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&unset, "unset", false, "remove the nearest "+ActiveVMFile)
	cmd.Flags().BoolVar(&noCheck, "no-check", false, "do not check with the server that the VM exists")
	return cmd
}

// currentInfo is `noid current --json`. Field names are stable.
type currentInfo struct {
	Server   string `json:"server"`
	User     string `json:"user,omitempty"`
	Admin    bool   `json:"admin"`
	VM       string `json:"vm,omitempty"`
	VMSource string `json:"vm_source,omitempty"`
	VMState  string `json:"vm_state,omitempty"`
	Error    string `json:"error,omitempty"`
}

func newCurrentCmd(e *env) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "current",
		Short: "Show the server, the user and the active VM",
		Long: `Show which server noid talks to, who the server thinks you are, and the active
VM (set by ` + "`noid use`" + ` or NOID_VM) with its state. It exits with 1 when the server
cannot be reached or the active VM cannot be read.`,
		Example: `  noid current
  noid current --json | jq -r .vm`,
		Args: exactArgs(0, "no arguments"),
		RunE: func(cmd *cobra.Command, args []string) error {
			var info currentInfo
			var firstErr error
			fail := func(err error) {
				if firstErr == nil {
					firstErr = err
					info.Error = err.Error()
				}
			}
			name, from, err := e.activeVM()
			if err != nil {
				fail(err)
			}
			info.VM, info.VMSource = name, from
			c, err := e.client()
			info.Server = e.target
			if err != nil {
				fail(err)
			} else {
				if w, err := c.WhoAmI(cmd.Context()); err != nil {
					fail(err)
				} else {
					info.User, info.Admin = w.User, w.Admin
				}
				if name != "" && firstErr == nil {
					v, err := c.GetVM(cmd.Context(), name)
					switch {
					case errors.Is(err, client.ErrNotFound):
						info.VMState = "not found"
					case err != nil:
						fail(err)
					default:
						info.VMState = v.State
					}
				}
			}
			if asJSON {
				if err := printJSON(e.stdout, info); err != nil {
					return err
				}
			} else {
				t := newTable(e.stdout, "WHAT", "VALUE")
				t.row("server", orDash(info.Server))
				user := orDash(info.User)
				if info.Admin {
					user += " (admin)"
				}
				t.row("user", user)
				vm := "- (none; set one with `noid use <vm>`)"
				if info.VM != "" {
					vm = info.VM
					if info.VMState != "" {
						vm += " (" + info.VMState + ")"
					}
					vm += " from " + info.VMSource
				}
				t.row("vm", vm)
				if err := t.flush(); err != nil {
					return err
				}
			}
			if info.VMState == "not found" && firstErr == nil {
				return errdefs.WithHint(fmt.Errorf("%w: the active VM %q does not exist", client.ErrNotFound, info.VM),
					"pick another with `noid use <vm>` or clear it with `noid use --unset`")
			}
			return firstErr
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}
