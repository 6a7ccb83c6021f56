package servercli

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/noid-vm/noid/internal/config"
	"github.com/noid-vm/noid/internal/errdefs"
	"github.com/noid-vm/noid/internal/lockfile"
)

func testEnv(t *testing.T, stderr io.Writer) (*env, *config.Config, string) {
	t.Helper()
	dir := t.TempDir()
	cfg := &config.Config{DataDir: filepath.Join(dir, "data"), Socket: filepath.Join(dir, "noid.sock")}
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		t.Fatal(err)
	}
	return &env{stdout: io.Discard, stderr: stderr}, cfg, filepath.Join(cfg.DataDir, lockFileName)
}

// TestLockDataDirServer: a data dir held by a server is reported at once
// with the server's pid and socket; offline work never runs.
func TestLockDataDirServer(t *testing.T) {
	e, cfg, path := testEnv(t, io.Discard)
	held, err := lockfile.TryLock(path, noteServe+" /run/x/noid.sock")
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	_, err = e.lockDataDir(context.Background(), cfg, "add-user")
	var sr *serverRunning
	if !errors.As(err, &sr) || sr.pid != os.Getpid() || sr.socket != "/run/x/noid.sock" {
		t.Fatalf("lockDataDir next to a server: %v (%+v)", err, sr)
	}
	if want := "data dir " + cfg.DataDir + " is in use by noid-server pid"; !strings.Contains(err.Error(), want) {
		t.Errorf("%q does not say %q", err, want)
	}
	ran := false
	err = e.withDataDir(context.Background(), cfg, "image build", nil, func(context.Context) error { ran = true; return nil })
	if ran || !errors.Is(err, errdefs.ErrConflict) || errdefs.HintOf(err) == "" {
		t.Errorf("image build next to a server: ran=%v err=%v, want a refusal with a hint", ran, err)
	}
}

// syncWriter signals when something has been written.
type syncWriter struct {
	buf     bytes.Buffer
	written chan struct{}
}

func (w *syncWriter) Write(p []byte) (int, error) {
	n, err := w.buf.Write(p)
	select {
	case w.written <- struct{}{}:
	default:
	}
	return n, err
}

// TestLockDataDirWaitsForCommand: a data dir held by another command (say
// a concurrent add-user) is waited for, then taken.
func TestLockDataDirWaitsForCommand(t *testing.T) {
	w := &syncWriter{written: make(chan struct{}, 1)}
	e, cfg, path := testEnv(t, w)
	held, err := lockfile.TryLock(path, "add-user")
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan error, 1)
	go func() {
		l, err := e.lockDataDir(context.Background(), cfg, "rotate-token")
		if err == nil {
			l.Close()
		}
		got <- err
	}()
	select {
	case <-w.written:
	case err := <-got:
		t.Fatalf("lockDataDir returned while another command held the lock: %v", err)
	case <-time.After(10 * time.Second):
		t.Fatal("lockDataDir neither waited visibly nor returned")
	}
	if !strings.Contains(w.buf.String(), "waiting for `noid-server add-user`") {
		t.Errorf("waiting message %q", w.buf.String())
	}
	held.Close()
	select {
	case err := <-got:
		if err != nil {
			t.Fatalf("lockDataDir after the other command finished: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("lockDataDir did not take the released lock")
	}
}
