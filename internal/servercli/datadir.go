package servercli

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/noid-vm/noid/client"
	"github.com/noid-vm/noid/internal/config"
	"github.com/noid-vm/noid/internal/errdefs"
	"github.com/noid-vm/noid/internal/lockfile"
)

// One data dir, one writer. `serve` holds <data_dir>/noid.lock (flock) from
// before it reads anything until after it has stopped; the commands that
// write the data dir without a server hold it while they work. The lock
// file's note says which: "serve SOCKET" for a server, the command's name
// otherwise. A command that finds a server there talks to it on SOCKET
// instead of touching the data dir; one that finds another command waits
// for it. The choice comes from the lock itself, never from dialing the
// socket, so a server cannot start between the check and the write.

// lockFileName is the data dir's lock file.
const lockFileName = "noid.lock"

// noteServe starts the note of a server's lock.
const noteServe = "serve"

const (
	// lockPoll is how often a waiting command tries the lock again.
	lockPoll = 50 * time.Millisecond
	// offlineWait bounds the wait for another command (an image build
	// takes a minute or two) to release the data dir.
	offlineWait = 5 * time.Minute
	// serverAnswerWait bounds the wait for a server that holds the lock to
	// answer on its socket (it recovers its VMs before it listens).
	serverAnswerWait = 2 * time.Minute
)

// serverRunning means a noid-server holds the data dir.
type serverRunning struct {
	dataDir string
	pid     int
	socket  string
}

func (e *serverRunning) Error() string {
	return fmt.Sprintf("data dir %s is in use by noid-server pid %d", e.dataDir, e.pid)
}

// holderServer returns the socket of the server a lock note names, and
// whether it names one.
func holderServer(h lockfile.Holder) (socket string, ok bool) {
	role, sock, _ := strings.Cut(h.Note, " ")
	return sock, role == noteServe && sock != ""
}

// lockDataDir takes the data dir's lock for command (note: see above). It
// waits while another command holds it, and returns a *serverRunning at
// once when a live server does.
func (e *env) lockDataDir(ctx context.Context, cfg *config.Config, note string) (*lockfile.Lock, error) {
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("creating data dir: %w", err)
	}
	path := filepath.Join(cfg.DataDir, lockFileName)
	wctx, cancel := context.WithTimeout(ctx, offlineWait)
	defer cancel()
	told := false
	l, err := lockfile.Acquire(wctx, path, note, lockPoll, func(h *lockfile.HeldError) bool {
		if !h.Holder.Alive() {
			return true // a new holder has not written its pid yet
		}
		if _, ok := holderServer(h.Holder); ok {
			return false
		}
		if !told {
			told = true
			fmt.Fprintf(e.stderr, "noid-server: waiting for `noid-server %s` (pid %d) to finish with data dir %s\n", h.Holder.Note, h.Holder.PID, cfg.DataDir)
		}
		return true
	})
	var held *lockfile.HeldError
	if !errors.As(err, &held) {
		return l, err
	}
	if sock, ok := holderServer(held.Holder); ok && held.Holder.Alive() {
		return nil, &serverRunning{dataDir: cfg.DataDir, pid: held.Holder.PID, socket: sock}
	}
	if ctx.Err() != nil {
		return nil, ctx.Err()
	}
	who := "another process"
	if held.Holder.Alive() {
		who = fmt.Sprintf("`noid-server %s` (pid %d)", held.Holder.Note, held.Holder.PID)
	}
	return nil, errdefs.WithHint(fmt.Errorf("%w: data dir %s is busy: %s has held its lock %s for %s", errdefs.ErrUnavailable, cfg.DataDir, who, path, offlineWait),
		"wait for it to finish, then try again")
}

// withDataDir runs a command that writes the data dir. When a noid-server
// holds the data dir, online runs against it (as root on its unix socket);
// otherwise offline runs while this process holds the lock, so no server
// starts meanwhile. online nil refuses to run next to a server.
func (e *env) withDataDir(ctx context.Context, cfg *config.Config, command string, online func(context.Context, *client.Client) error, offline func(context.Context) error) error {
	deadline := time.Now().Add(serverAnswerWait)
	for {
		l, err := e.lockDataDir(ctx, cfg, command)
		if err == nil {
			defer l.Close()
			return offline(ctx)
		}
		var sr *serverRunning
		if !errors.As(err, &sr) {
			return err
		}
		if online == nil {
			return errdefs.WithHint(fmt.Errorf("%w: %s cannot run while noid-server serves the data dir: %w", errdefs.ErrConflict, command, sr),
				fmt.Sprintf("stop it first (`systemctl stop noid-server`, or kill %d), then start it again afterwards", sr.pid))
		}
		c, err := client.New("unix://"+sr.socket, "")
		if err != nil {
			return err
		}
		// The server takes the lock before it recovers its VMs and listens
		// only afterwards: wait until it answers, or lets go of the lock.
		hctx, cancel := context.WithTimeout(ctx, time.Second)
		err = c.Health(hctx)
		cancel()
		if err == nil {
			return online(ctx, c)
		}
		if time.Now().After(deadline) {
			return errdefs.WithHint(fmt.Errorf("%w: noid-server pid %d holds data dir %s but does not answer on %s: %w", errdefs.ErrUnavailable, sr.pid, cfg.DataDir, sr.socket, err),
				"see `systemctl status noid-server`")
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(10 * lockPoll):
		}
	}
}
