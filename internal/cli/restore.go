package cli

import (
	"fmt"
	"strings"

	"github.com/spf13/cobra"

	"github.com/noid-vm/noid/client"
)

func newRestoreCmd(e *env) *cobra.Command {
	var as, from string
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "restore [<vm>] <checkpoint> [--as NEW] | --from remote:KEY --as NEW",
		Short: "Rewind a VM to a checkpoint, or clone it with --as",
		Long: `Without --as, the VM is rewound in place to the checkpoint: it keeps its name,
IP and MAC, and all its checkpoints are kept. With --as NEW, a new independent VM
is started from the checkpoint with its own name, MAC, IP, clock and entropy;
the original is untouched.

With --from remote:KEY, the new VM is cloned from a checkpoint pushed to the
server's remote store (` + "`noid checkpoint push`" + `, from any host sharing it); --as is
required. The first clone on a host downloads it; later ones reuse it.

With two arguments the first is the VM; with one, it is a checkpoint of the
active VM.
` + activeHelp,
		Example: `  noid restore dev clean
  noid restore dev clean --as dev2
  noid restore clean                    # the active VM
  noid restore --from remote:dev/clean --as dev2   # a checkpoint pushed from any host`,
		Args: func(cmd *cobra.Command, args []string) error {
			if from != "" {
				return exactArgs(0, "no arguments with --from (the checkpoint is its key)")(cmd, args)
			}
			return rangeArgs(1, 2, "an optional VM name and a checkpoint")(cmd, args)
		},
		ValidArgsFunction: completeCheckpoints(e),
		RunE: func(cmd *cobra.Command, args []string) error {
			if from != "" {
				return restoreRemote(cmd, e, from, as, asJSON)
			}
			explicit, cpName := "", args[0]
			if len(args) == 2 {
				explicit, cpName = args[0], args[1]
			}
			name, err := e.vmName(cmd, explicit)
			if err != nil {
				return err
			}
			c, err := e.client()
			if err != nil {
				return err
			}
			var vm *client.VM
			if as != "" {
				stop := e.spin("cloning " + name + "/" + cpName + " as " + as)
				vm, err = c.Clone(cmd.Context(), name, cpName, as)
				stop()
			} else {
				stop := e.spin("rewinding " + name + " to " + cpName)
				vm, err = c.Restore(cmd.Context(), name, cpName)
				stop()
			}
			if err != nil {
				return err
			}
			if asJSON {
				return printJSON(e.stdout, vm)
			}
			ms := 0.0
			if vm.Timings != nil {
				ms = vm.Timings.TotalMs
			}
			if as != "" {
				fmt.Fprintf(e.stdout, "cloned %s/%s as %s (ip %s) in %.0f ms\n", name, cpName, vm.Name, orDash(vm.IP), ms)
			} else {
				fmt.Fprintf(e.stdout, "rewound %s to %s in %.0f ms\n", vm.Name, cpName, ms)
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&as, "as", "", "clone into a new VM with this name instead of rewinding")
	cmd.Flags().StringVar(&from, "from", "", "clone a pushed checkpoint: remote:KEY")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the VM as JSON")
	return cmd
}

// restoreRemote clones the pushed checkpoint from ("remote:KEY") as as.
func restoreRemote(cmd *cobra.Command, e *env, from, as string, asJSON bool) error {
	key, ok := strings.CutPrefix(from, "remote:")
	if !ok || key == "" {
		return usagef("--from takes remote:KEY, the key of a pushed checkpoint (noid remote list)")
	}
	if as == "" {
		return usagef("--from needs --as NEW: a pushed checkpoint is cloned into a new VM")
	}
	c, err := e.client()
	if err != nil {
		return err
	}
	stop := e.spin("cloning remote:" + key + " as " + as)
	vm, err := c.CloneRemote(cmd.Context(), key, as)
	stop()
	if err != nil {
		return err
	}
	if asJSON {
		return printJSON(e.stdout, vm)
	}
	ms, pulled := 0.0, "already on this host"
	if vm.Timings != nil {
		ms = vm.Timings.TotalMs
	}
	if p := vm.Pulled; p != nil && !p.Cached {
		pulled = fmt.Sprintf("%s downloaded", bytesHuman(p.BytesMoved))
		if p.LocalFiles > 0 {
			pulled += fmt.Sprintf(", %d file(s) found on this host", p.LocalFiles)
		}
	}
	fmt.Fprintf(e.stdout, "cloned remote:%s as %s (ip %s) in %.0f ms (%s)\n", key, vm.Name, orDash(vm.IP), ms, pulled)
	return nil
}
