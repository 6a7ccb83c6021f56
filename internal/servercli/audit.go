package servercli

import (
	"context"
	"fmt"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/noid-vm/noid/client"
	"github.com/noid-vm/noid/internal/store"
)

func newAuditCmd(e *env) *cobra.Command {
	var limit int
	cmd := &cobra.Command{
		Use:   "audit",
		Short: "Print the audit log of mutating API actions (newest last)",
		Long: `Print the audit log of mutating API actions, newest last. It only reads the
database: next to a running noid-server it reads once the server answers (so
the server has brought the database up to date); without one it holds the
data dir's lock while it reads, so no server starts meanwhile.`,
		Example: `  noid-server audit --limit 50 --config /etc/noid/config.toml`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			cfg, err := e.config()
			if err != nil {
				return err
			}
			var entries []store.AuditEntry
			read := func(ctx context.Context) error {
				return withStore(ctx, cfg, func(st *store.Store) error {
					var err error
					entries, err = st.AuditLog(ctx, limit)
					return err
				})
			}
			err = e.withDataDir(cmd.Context(), cfg, "audit", func(ctx context.Context, _ *client.Client) error { return read(ctx) }, read)
			if err != nil {
				return err
			}
			tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "TIME\tUSER\tACTION\tTARGET\tRESULT\tREQUEST")
			// Entries are stored escaped; escape again for rows written
			// before that, so no row can add lines or columns or drive the
			// terminal.
			esc := store.EscapeText
			for _, a := range entries {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", a.At.Format(time.RFC3339), esc(a.User), esc(a.Action), esc(a.Target), esc(a.Result), esc(a.RequestID))
			}
			return tw.Flush()
		},
	}
	cmd.Flags().IntVar(&limit, "limit", 100, "number of entries")
	return cmd
}
