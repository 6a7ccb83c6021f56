package cli

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/noid-vm/noid/client"
)

func newRestoreCmd(e *env) *cobra.Command {
	var as string
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "restore [<vm>] <checkpoint> [--as NEW]",
		Short: "Rewind a VM to a checkpoint, or clone it with --as",
		Long: `Without --as, the VM is rewound in place to the checkpoint: it keeps its name,
IP and MAC, and all its checkpoints are kept. With --as NEW, a new independent VM
is started from the checkpoint with its own name, MAC, IP, clock and entropy;
the original is untouched.

With two arguments the first is the VM; with one, it is a checkpoint of the
active VM.
` + activeHelp,
		Example: `  noid restore dev clean
  noid restore dev clean --as dev2
  noid restore clean                    # the active VM`,
		Args:              rangeArgs(1, 2, "an optional VM name and a checkpoint"),
		ValidArgsFunction: completeCheckpoints(e),
		RunE: func(cmd *cobra.Command, args []string) error {
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
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the VM as JSON")
	return cmd
}
