package servercli

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/noid-vm/noid/internal/manager"
	"github.com/noid-vm/noid/internal/server"
)

func newServeCmd(e *env) *cobra.Command {
	return &cobra.Command{
		Use:   "serve",
		Short: "Run the server (VMs survive restarts of it)",
		Long: `Run noid-server. It listens on the unix socket (and on the TCP address when
"listen" is configured), re-adopts VMs left running by an earlier server and
serves until SIGTERM or SIGINT. Stopping the server leaves VMs running.`,
		Example: `  noid-server serve --config /etc/noid/config.toml`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			cfg, err := e.config()
			if err != nil {
				return err
			}
			log := e.logger(cfg)
			ctx, stop := signal.NotifyContext(cmd.Context(), syscall.SIGTERM, syscall.SIGINT)
			defer stop()
			mgr, err := manager.New(ctx, manager.Options{Config: cfg, Logger: log})
			if err != nil {
				return err
			}
			defer mgr.Close()
			srv := server.New(mgr, log)
			defer srv.Close()
			err = srv.Serve(ctx)
			log.Info("shutting down; VMs keep running", "pid", os.Getpid())
			if err != nil && ctx.Err() == nil {
				return err
			}
			_ = context.Canceled
			return nil
		},
	}
}
