package cli

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/noid-vm/noid/client"
)

func newCheckpointsCmd(e *env) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "checkpoints [<vm>]",
		Short: "List a VM's checkpoints",
		Long: `List a VM's checkpoints, oldest first. --json prints the same array as the API
(GET /v1/vms/{name}/checkpoints); its field names are stable.
` + activeHelp,
		Example: `  noid checkpoints dev
  noid checkpoints dev --json | jq -r '.[].name'`,
		Args:              rangeArgs(0, 1, "an optional VM name"),
		ValidArgsFunction: completeVMs(e, 1),
		RunE: func(cmd *cobra.Command, args []string) error {
			vm, err := e.firstOrActive(cmd, args)
			if err != nil {
				return err
			}
			c, err := e.client()
			if err != nil {
				return err
			}
			cps, err := c.ListCheckpoints(cmd.Context(), vm)
			if err != nil {
				return err
			}
			if asJSON {
				if cps == nil {
					cps = []*client.Checkpoint{}
				}
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
