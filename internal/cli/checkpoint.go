package cli

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/noid-vm/noid/client"
)

func newCheckpointCmd(e *env) *cobra.Command {
	var req client.CheckpointRequest
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "checkpoint <vm> [<name>]",
		Short: "Capture a running VM's memory, disk, CPU and device state",
		Long: `Checkpoint a running VM. The VM is paused only while its state is captured and
keeps running afterwards. Without a name, a short id is used as the name.
Restore it in place with ` + "`noid restore <vm> <checkpoint>`" + ` or clone it with --as.`,
		Example: `  noid checkpoint dev
  noid checkpoint dev before-upgrade --label "clean install"
  noid checkpoint rm dev before-upgrade`,
		Args: rangeArgs(1, 2, "a VM name and an optional checkpoint name"),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := e.client()
			if err != nil {
				return err
			}
			if len(args) == 2 {
				req.Name = args[1]
			}
			cp, err := c.Checkpoint(cmd.Context(), args[0], req)
			if err != nil {
				return err
			}
			if asJSON {
				return printJSON(e.stdout, cp)
			}
			fmt.Fprintf(e.stdout, "checkpoint %s (id %s) of %s: paused %.1f ms, %s\n", cp.Name, cp.ID, cp.VM, cp.PauseMs, bytesHuman(cp.SizeBytes))
			return nil
		},
	}
	cmd.Flags().StringVar(&req.Label, "label", "", "free-text label")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	cmd.AddCommand(&cobra.Command{
		Use:     "rm <vm> <checkpoint>...",
		Aliases: []string{"delete"},
		Short:   "Delete checkpoints",
		Example: `  noid checkpoint rm dev before-upgrade`,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) < 2 {
				return usagef("checkpoint rm needs a VM name and at least one checkpoint")
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := e.client()
			if err != nil {
				return err
			}
			for _, cp := range args[1:] {
				if err := c.DeleteCheckpoint(cmd.Context(), args[0], cp); err != nil {
					return err
				}
				fmt.Fprintf(e.stdout, "deleted checkpoint %s of %s\n", cp, args[0])
			}
			return nil
		},
	})
	return cmd
}
