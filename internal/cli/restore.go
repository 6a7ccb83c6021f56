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
		Use:   "restore <vm> <checkpoint>",
		Short: "Rewind a VM to a checkpoint, or clone it with --as",
		Long: `Without --as, the VM is rewound in place to the checkpoint: it keeps its name,
IP and MAC, and all its checkpoints are kept. With --as NEW, a new independent VM
is started from the checkpoint with its own name, MAC, IP, clock and entropy;
the original is untouched.`,
		Example: `  noid restore dev clean
  noid restore dev clean --as dev2`,
		Args: exactArgs(2, "a VM name and a checkpoint"),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := e.client()
			if err != nil {
				return err
			}
			var vm *client.VM
			if as != "" {
				vm, err = c.Clone(cmd.Context(), args[0], args[1], as)
			} else {
				vm, err = c.Restore(cmd.Context(), args[0], args[1])
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
				fmt.Fprintf(e.stdout, "cloned %s/%s as %s (ip %s) in %.0f ms\n", args[0], args[1], vm.Name, orDash(vm.IP), ms)
			} else {
				fmt.Fprintf(e.stdout, "rewound %s to %s in %.0f ms\n", vm.Name, args[1], ms)
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&as, "as", "", "clone into a new VM with this name instead of rewinding")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the VM as JSON")
	return cmd
}
