package servercli

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/noid-vm/noid/internal/config"
	"github.com/noid-vm/noid/internal/errdefs"
	"github.com/noid-vm/noid/internal/manager"
	"github.com/noid-vm/noid/internal/server"
)

// shutdownSlack is how much longer than [http] shutdown_timeout a stopping
// server may take (the cancelled requests' grace, closing the manager)
// before it exits regardless.
const shutdownSlack = 30 * time.Second

func newServeCmd(e *env) *cobra.Command {
	return &cobra.Command{
		Use:   "serve",
		Short: "Run the server (VMs survive restarts of it)",
		Long: `Run noid-server. It listens on the unix socket (and on the TCP address when
"listen" is configured), re-adopts VMs left running by an earlier server and
serves until SIGTERM or SIGINT. Stopping the server leaves VMs running: it
stops accepting connections, lets requests in flight (creates, checkpoints,
exec streams) run for up to [http] shutdown_timeout (30s), cancels the rest
(exec clients are told the server is shutting down) and exits, within
shutdown_timeout + 30s at most. A second signal stops it at once.

One server per data dir: serve locks <data_dir>/noid.lock before it reads
anything and keeps it until it has stopped. A second serve on the same data
dir exits at once with status 1, naming the pid that holds it. With
networking on, one server per network namespace likewise: a second one is
refused whatever its bridge and pool.`,
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
			// After the first signal a second one stops the server at once
			// (the default action), and a shutdown that outlives its bound
			// ends the process anyway. VMs keep running either way.
			// (Registered after stop is deferred, so it is deregistered
			// before a return cancels ctx: only a signal triggers it.)
			cancelAfter := context.AfterFunc(ctx, func() {
				stop()
				bound := cfg.HTTP.Shutdown() + shutdownSlack
				log.Info("shutting down; a second SIGTERM or SIGINT stops at once", "bound", bound.String())
				time.AfterFunc(bound, func() {
					log.Error("shutdown did not finish in time; exiting, VMs keep running", "bound", bound.String(), "pid", os.Getpid())
					os.Exit(1)
				})
			})
			defer cancelAfter()
			lock, err := e.lockDataDir(ctx, cfg, noteServe+" "+cfg.Socket)
			if err != nil {
				var sr *serverRunning
				if errors.As(err, &sr) {
					return errdefs.WithHint(err, fmt.Sprintf("another noid-server serves it: see `systemctl status noid-server`, or stop pid %d first", sr.pid))
				}
				return err
			}
			// Deferred first, so released last: after the manager has
			// closed and nothing touches the data dir any more.
			defer lock.Close()
			// Logged once the data dir is ours: a refused second server
			// logs nothing.
			logConfig(log, e.configRead, cfg)
			mgr, err := manager.New(ctx, manager.Options{Config: cfg, Logger: log})
			if err != nil {
				return err
			}
			defer mgr.Close()
			srv := server.New(mgr, log)
			defer srv.Close()
			err = srv.Serve(ctx)
			log.Info("stopped serving; VMs keep running", "pid", os.Getpid())
			if err != nil && ctx.Err() == nil {
				return err
			}
			return nil
		},
	}
}

// logConfig says at start-up which config file was read (or that none
// was) and logs its deprecation warnings, one line each.
func logConfig(log *slog.Logger, path string, cfg *config.Config) {
	if path == "" {
		log.Info("config: built-in defaults (no --config, and no " + config.SystemConfigPath + " or " + config.LegacyConfigPath + ")")
	} else {
		log.Info("config: read "+path, "file", path)
	}
	for _, w := range cfg.Warnings {
		log.Warn("config: "+w, "file", path)
	}
}
