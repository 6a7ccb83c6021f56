package servercli

import (
	"fmt"
	"net"
	"time"

	"github.com/spf13/cobra"

	"github.com/noid-vm/noid/client"
	"github.com/noid-vm/noid/internal/manager"
)

func newRemoveUserCmd(e *env) *cobra.Command {
	return &cobra.Command{
		Use:   "remove-user <name>",
		Short: "Remove a user with all their VMs, checkpoints and storage",
		Long: `Remove a user. Their VMs are destroyed, their checkpoints and files deleted and
their token revoked. When noid-server is running this goes through it (as root on
the unix socket); otherwise it is done directly.`,
		Example: `  noid-server remove-user alice`,
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			cfg, err := e.config()
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			if c, err := net.DialTimeout("unix", cfg.Socket, time.Second); err == nil {
				c.Close()
				cl, err := client.New("unix://"+cfg.Socket, "")
				if err != nil {
					return err
				}
				n, err := cl.RemoveUser(ctx, args[0])
				if err != nil {
					return err
				}
				fmt.Fprintf(e.stdout, "removed user %s (%d VMs destroyed)\n", args[0], n)
				return nil
			}
			mgr, err := manager.New(ctx, manager.Options{Config: cfg, Logger: e.logger(cfg)})
			if err != nil {
				return err
			}
			defer mgr.Close()
			n, err := mgr.RemoveUser(ctx, args[0])
			if err != nil {
				return err
			}
			fmt.Fprintf(e.stdout, "removed user %s (%d VMs destroyed)\n", args[0], n)
			return nil
		},
	}
}
