package cli

import (
	"github.com/spf13/cobra"
)

func newLogsCmd(e *env) *cobra.Command {
	var tail int64
	cmd := &cobra.Command{
		Use:   "logs [<vm>]",
		Short: "Print a VM's serial console (kernel) log",
		Long: "Print a VM's serial console (kernel) log: its newest part, which the server keeps\n" +
			"to at most [limits] serial_log_size (4 MiB by default).\n" + activeHelp,
		Example: `  noid logs dev
  noid logs dev --tail 4096`,
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
			b, err := c.Logs(cmd.Context(), vm, tail)
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
