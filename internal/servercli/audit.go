package servercli

import (
	"fmt"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
)

func newAuditCmd(e *env) *cobra.Command {
	var limit int
	cmd := &cobra.Command{
		Use:     "audit",
		Short:   "Print the audit log of mutating API actions (newest last)",
		Example: `  noid-server audit --limit 50 --config /etc/noid/config.toml`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			st, err := openStore(cmd, e)
			if err != nil {
				return err
			}
			defer st.Close()
			entries, err := st.AuditLog(cmd.Context(), limit)
			if err != nil {
				return err
			}
			tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "TIME\tUSER\tACTION\tTARGET\tRESULT\tREQUEST")
			for _, a := range entries {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", a.At.Format(time.RFC3339), a.User, a.Action, a.Target, a.Result, a.RequestID)
			}
			return tw.Flush()
		},
	}
	cmd.Flags().IntVar(&limit, "limit", 100, "number of entries")
	return cmd
}
