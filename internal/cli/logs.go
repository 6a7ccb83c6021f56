package cli

import (
	"github.com/spf13/cobra"
)

func newLogsCmd(e *env) *cobra.Command {
	var tail int64
	cmd := &cobra.Command{
		Use:   "logs <vm>",
		Short: "Print a VM's serial console (kernel) log",
		Example: `  noid logs dev
  noid logs dev --tail 4096`,
		Args: exactArgs(1, "a VM name"),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := e.client()
			if err != nil {
				return err
			}
			b, err := c.Logs(cmd.Context(), args[0], tail)
			if err != nil {
				return err
			}
			_, err = e.stdout.Write(b)
			return err
		},
	}
	cmd.Flags().Int64Var(&tail, "tail", 0, "only the last N bytes")
	return cmd
}
