package servercli

import (
	"context"
	"fmt"

	"github.com/spf13/cobra"

	"github.com/noid-vm/noid/client"
	"github.com/noid-vm/noid/internal/manager"
)

func newRemoveUserCmd(e *env) *cobra.Command {
	return &cobra.Command{
		Use:   "remove-user <name>",
		Short: "Remove a user with all their VMs, checkpoints and storage",
		Long: `Remove a user. Their VMs are destroyed, their checkpoints and files deleted and
their token revoked.

` + viaServerHelp + `

Without a server, the command re-adopts the user's VMs as serve does, in
order to destroy them.`,
		Example: `  noid-server remove-user alice`,
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			cfg, err := e.config()
			if err != nil {
				return err
			}
			var n int
			err = e.withDataDir(cmd.Context(), cfg, "remove-user", func(ctx context.Context, c *client.Client) error {
				var err error
				n, err = c.RemoveUser(ctx, args[0])
				return err
			}, func(ctx context.Context) error {
				mgr, err := manager.New(ctx, manager.Options{Config: cfg, Logger: e.logger(cfg)})
				if err != nil {
					return err
				}
				defer mgr.Close()
				n, err = mgr.RemoveUser(ctx, args[0])
				return err
			})
			if err != nil {
				return err
			}
			fmt.Fprintf(e.stdout, "removed user %s (%d VMs destroyed)\n", args[0], n)
			return nil
		},
	}
}
