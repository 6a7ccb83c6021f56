package firecracker

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/noid-vm/noid/internal/errdefs"
)

// TestNoUnjailedRootByDefault (issue 18, finding 6): with the default
// jailer mode and no jailer, a server running as root starts no
// Firecracker (it would run as root without a chroot); it says so, and
// starts nothing.
func TestNoUnjailedRootByDefault(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("the refusal is for a server running as root")
	}
	missing := filepath.Join(t.TempDir(), "no-jailer")
	e := newFakeEnv(t, Config{})
	cfg := e.b.cfg
	cfg.JailerMode, cfg.Jailer = JailerAuto, missing
	e.b = New(cfg)
	in, err := e.b.Boot(context.Background(), e.spec(t, "unjailed"))
	if err == nil {
		in.Kill(context.Background())
		t.Fatal("firecracker was started as root without its jailer")
	}
	if !errors.Is(err, ErrNoJailer) || !errors.Is(err, errdefs.ErrUnavailable) || !strings.Contains(err.Error(), missing) {
		t.Errorf("Boot without a jailer: %v, want ErrNoJailer naming %s", err, missing)
	}
	if _, err := os.Stat(e.log); err == nil && len(e.requests(t)) > 0 {
		t.Error("a refused boot started firecracker")
	}
}

// TestJailerIfPresentRunsUnjailed: the opt-out runs Firecracker directly
// when there is no jailer.
func TestJailerIfPresentRunsUnjailed(t *testing.T) {
	e := newFakeEnv(t, Config{JailerMode: JailerIfPresent, Jailer: filepath.Join(t.TempDir(), "no-jailer")})
	in, err := e.b.Boot(context.Background(), e.spec(t, "optout"))
	if err != nil {
		t.Fatal(err)
	}
	defer in.Kill(context.Background())
	if in.(*instance).lay.Jailed {
		t.Error("jailed without a jailer")
	}
}
