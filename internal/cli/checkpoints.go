package cli

import (
	"fmt"

	"github.com/spf13/cobra"
)

func newCheckpointsCmd(e *env) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "checkpoints <vm>",
		Short: "List a VM's checkpoints",
		Example: `  noid checkpoints dev
  noid checkpoints dev --json`,
		Args: exactArgs(1, "a VM name"),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := e.client()
			if err != nil {
				return err
			}
			cps, err := c.ListCheckpoints(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			if asJSON {
				return printJSON(e.stdout, cps)
			}
			t := newTable(e.stdout, "ID", "NAME", "LABEL", "CREATED", "SIZE", "SPEC", "PAUSE")
			for _, cp := range cps {
				t.row(cp.ID, cp.Name, orDash(cp.Label), ago(cp.CreatedAt), bytesHuman(cp.SizeBytes),
					fmt.Sprintf("%d vCPU/%d MiB", cp.VCPUs, cp.MemoryMiB), fmt.Sprintf("%.1f ms", cp.PauseMs))
			}
			return t.flush()
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print a JSON array")
	return cmd
}
