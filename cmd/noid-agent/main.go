// Command noid-agent is the guest agent of noid. Inside a VM it runs as
// PID 1 from the initramfs: it mounts the API file systems, loads the
// modules listed in /etc/noid/modules, switches to the root disk and serves
// the agent protocol on the virtio-serial port "noid.agent" (or vsock with
// noid.transport=vsock). Outside a VM it can serve a unix socket or a given
// port for tests (--listen, --port).
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/noid-vm/noid/internal/agent/guest"
)

func main() {
	pid1 := os.Getpid() == 1
	var listen, port, level string
	var version, applySync bool
	fs := flag.NewFlagSet("noid-agent", flag.ContinueOnError)
	fs.StringVar(&listen, "listen", "", "serve host connections on unix:/path or vsock:PORT instead of the virtio-serial port")
	fs.StringVar(&port, "port", "", "serve on this character device, fifo or socket path instead of the virtio-serial port")
	fs.StringVar(&level, "log-level", "info", "log level: debug, info, warn, error")
	fs.BoolVar(&version, "version", false, "print the version and exit")
	fs.BoolVar(&applySync, "sync", false, "let sync change this machine's clock, RNG, hostname and network (always on as PID 1)")
	if !pid1 {
		if err := fs.Parse(os.Args[1:]); err != nil {
			os.Exit(2)
		}
	}
	// As init, argv holds whatever the kernel did not understand; the
	// configuration comes from the kernel command line only.
	if version {
		fmt.Println(guest.Version)
		return
	}

	lv := new(slog.LevelVar)
	_ = lv.UnmarshalText([]byte(level))
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: lv}))
	log = log.With("agent", "noid-agent")

	cfg := guest.Config{Logger: log, Init: pid1, ReapAll: pid1}
	if !pid1 && !applySync {
		cfg.System = guest.DisabledSystem{}
	}
	cmd := guest.Cmdline{}
	if pid1 {
		initSignals(log)
		res, err := guest.SetupPID1(log, lv)
		if err != nil {
			log.Error("init failed", "err", err)
		}
		cfg.RootSwitched = res.RootSwitched
		cmd = res.Cmdline
	}

	a := guest.New(cfg)
	ctx := context.Background()
	for {
		err := serve(ctx, log, a, cmd, listen, port)
		if !pid1 {
			if err != nil {
				log.Error("agent stopped", "err", err)
				os.Exit(1)
			}
			return
		}
		// init must never exit: the kernel would panic.
		log.Error("transport failed; retrying", "err", err)
		time.Sleep(time.Second)
	}
}

func serve(ctx context.Context, log *slog.Logger, a *guest.Agent, cmd guest.Cmdline, listen, port string) error {
	switch {
	case strings.HasPrefix(listen, "unix:"):
		path := strings.TrimPrefix(listen, "unix:")
		_ = os.Remove(path)
		l, err := net.Listen("unix", path)
		if err != nil {
			return fmt.Errorf("listening on %s: %w", path, err)
		}
		log.Info("serving", "transport", "unix", "path", path)
		return a.ServeListener(ctx, guest.NetListener(l))
	case strings.HasPrefix(listen, "vsock:"):
		p, err := strconv.ParseUint(strings.TrimPrefix(listen, "vsock:"), 10, 32)
		if err != nil {
			return fmt.Errorf("bad vsock port in %q: %w", listen, err)
		}
		return serveVsock(ctx, log, a, uint32(p))
	case listen != "":
		return fmt.Errorf("bad --listen %q: want unix:/path or vsock:PORT", listen)
	case port != "":
		return servePort(ctx, log, a, port)
	case cmd.Get("noid.transport", "virtio-serial") == "vsock":
		p, err := strconv.ParseUint(cmd.Get("noid.vsock_port", "1024"), 10, 32)
		if err != nil {
			return fmt.Errorf("bad noid.vsock_port: %w", err)
		}
		return serveVsock(ctx, log, a, uint32(p))
	default:
		wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		path, err := guest.WaitPort(wctx, guest.PortName)
		cancel()
		if err != nil {
			return err
		}
		return servePort(ctx, log, a, path)
	}
}

func serveVsock(ctx context.Context, log *slog.Logger, a *guest.Agent, port uint32) error {
	l, err := guest.ListenVsock(port)
	if err != nil {
		return err
	}
	log.Info("serving", "transport", "vsock", "port", port)
	return a.ServeListener(ctx, l)
}

func servePort(ctx context.Context, log *slog.Logger, a *guest.Agent, path string) error {
	f, err := guest.OpenPort(path)
	if err != nil {
		return err
	}
	defer f.Close()
	log.Info("serving", "transport", "port", "path", path)
	return a.ServePort(ctx, f)
}

// initSignals handles the signals init receives: halt (SIGUSR1), power off
// (SIGUSR2, SIGPWR), reboot (SIGTERM, SIGINT from ctrl-alt-del); others
// are logged. A handler (not SIG_IGN) is installed so that children start
// with default dispositions.
func initSignals(log *slog.Logger) {
	ch := make(chan os.Signal, 4)
	signal.Notify(ch, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP, syscall.SIGUSR1,
		syscall.SIGUSR2, syscall.SIGPWR, syscall.SIGQUIT)
	go func() {
		for s := range ch {
			var how int
			switch s {
			case syscall.SIGUSR1:
				how = unix.LINUX_REBOOT_CMD_HALT
			case syscall.SIGUSR2, syscall.SIGPWR:
				how = unix.LINUX_REBOOT_CMD_POWER_OFF
			case syscall.SIGTERM, syscall.SIGINT:
				how = unix.LINUX_REBOOT_CMD_RESTART
			default:
				log.Info("ignoring signal", "signal", s)
				continue
			}
			err := guest.Shutdown(log, how)
			log.Error("shutdown failed", "err", err)
		}
	}()
}
