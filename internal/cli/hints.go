package cli

import (
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/noid-vm/noid/client"
	"github.com/noid-vm/noid/internal/errdefs"
)

// hintFor returns the "hint:" line for err: the one the server or a command
// attached, or else a next step for the common classes of error.
func hintFor(e *env, err error) string {
	// An active VM that no longer exists: say where it was set.
	if e.active != "" && errors.Is(err, client.ErrNotFound) && strings.Contains(err.Error(), fmt.Sprintf("vm %q", e.active)) {
		return fmt.Sprintf("the active VM %q (from %s) does not exist; pick another with `noid use <vm>` or clear it with `noid use --unset`", e.active, e.activeFrom)
	}
	if h := errdefs.HintOf(err); h != "" {
		return h
	}
	var ue *usageError
	if errors.As(err, &ue) || strings.HasPrefix(err.Error(), "unknown command") {
		if strings.HasPrefix(err.Error(), "unknown command") {
			return "`noid --help` lists the commands"
		}
		return ""
	}
	switch {
	case errors.Is(err, client.ErrUnavailable) && strings.Contains(err.Error(), "cannot reach noid-server") && strings.Contains(err.Error(), "permission denied"):
		return "the socket is open to root and its group only: ask the admin to run `noid-server add-user --local " + orDash(os.Getenv("USER")) + "`, then log in again"
	case errors.Is(err, client.ErrUnavailable) && strings.Contains(err.Error(), "cannot reach noid-server"):
		how := "`noid-server serve --config /etc/noid/config.toml`"
		if fi, err := os.Stat("/run/systemd/system"); err == nil && fi.IsDir() {
			how = "`systemctl status noid-server`"
		}
		return "is noid-server running? " + how + ", or check NOID_URL (" + orDash(e.target) + ")"
	case errors.Is(err, client.ErrUnauthenticated):
		return "check NOID_TOKEN, or run `noid auth setup --url URL --token TOKEN`"
	case errors.Is(err, client.ErrRateLimited):
		return "wait a moment and try again"
	case errors.Is(err, client.ErrQuotaExceeded):
		return "free some room with `noid destroy <vm>` or `noid checkpoint rm <vm> <checkpoint>`"
	case errors.Is(err, errdefs.ErrNotImplemented):
		return "the server does not support this; `noid version` shows whether it is older than this client"
	case errors.Is(err, client.ErrNotRunning):
		return "`noid info <vm>` shows why; restore a checkpoint or destroy it"
	case errors.Is(err, client.ErrNotFound):
		return "`noid list` shows your VMs"
	}
	return ""
}
