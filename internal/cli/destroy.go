package cli

import (
	"fmt"

	"github.com/spf13/cobra"
)

func newDestroyCmd(e *env) *cobra.Command {
	cmd := &cobra.Command{
		Use:     "destroy <vm>...",
		Aliases: []string{"rm"},
		Short:   "Stop a VM and delete it with its checkpoints",
		Long: `Destroy stops the VM's process and deletes its disk, memory, network identity and
every checkpoint taken of it. Golden snapshots promoted from its checkpoints are
independent copies and are kept. destroy never uses the active VM (see
` + "`noid use`" + `): name every VM to destroy.`,
		Example: `  noid destroy dev
  noid destroy a b c`,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) == 0 {
				return usagef("destroy needs at least one VM name; see `noid destroy --help`")
			}
			return nil
		},
		ValidArgsFunction: func(cmd *cobra.Command, args []string, toComplete string) ([]string, cobra.ShellCompDirective) {
			return vmNames(e, cmd.Context(), toComplete), cobra.ShellCompDirectiveNoFileComp
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := e.client()
			if err != nil {
				return err
			}
			var firstErr error
			for _, name := range args {
				res, err := c.DestroyVM(cmd.Context(), name)
				if err != nil {
					if firstErr == nil {
						firstErr = err
					}
					if len(args) > 1 {
						fmt.Fprintf(e.stderr, "noid: %s: %v\n", name, err)
					}
					continue
				}
				fmt.Fprintf(e.stdout, "destroyed %s (%d checkpoints removed)\n", name, res.Checkpoints)
			}
			return firstErr
		},
	}
	return cmd
}
