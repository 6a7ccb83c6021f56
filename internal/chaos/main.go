package chaos

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/noid-vm/noid/internal/image"
)

// Main is noid-chaos: it parses args, runs and returns the exit code (0
// all invariants held, 1 one broke, 2 the run could not proceed).
func Main(args []string) int {
	fset := flag.NewFlagSet("noid-chaos", flag.ContinueOnError)
	var o Options
	var imageData string
	fset.Int64Var(&o.Seed, "seed", 0, "seed of every random choice (0: a new one, printed)")
	fset.IntVar(&o.ServerKills, "server-kills", 30, "how many times noid-server is killed (SIGKILL) and restarted")
	fset.IntVar(&o.VMMKills, "vmm-kills", 10, "how many times a random VMM process is killed (SIGKILL)")
	fset.IntVar(&o.DiskFulls, "disk-fulls", 1, "how many times the data dir's filesystem is run full (checkpoints and clones must fail cleanly, then work again)")
	fset.IntVar(&o.Hostiles, "hostiles", 1, "how many hostile-guest phases run (a program in a VM attacks the agent's port in every mode)")
	fset.IntVar(&o.HostileSeconds, "hostile-seconds", 20, "how long each hostile mode runs")
	modes := fset.String("hostile-modes", strings.Join(HostileModes, ","), "the hostile phase's modes, comma-separated")
	fset.StringVar(&o.GuestTool, "guest-tool", "", "static noid-chaos binary to run in the guest (default: this one)")
	var diskMiB int64
	fset.Int64Var(&diskMiB, "disk-mib", 3072, "size of the run's own loop-mounted filesystem holding the data dir, in MiB")
	fset.StringVar(&o.DiskFS, "disk-fs", "ext4", "filesystem of the data disk: ext4 or xfs")
	fset.BoolVar(&o.Network, "network", false, "networking on: the server runs in a network namespace of the run's own, VMs get TAPs")
	fset.IntVar(&o.Clients, "clients", 2, "concurrent clients")
	fset.DurationVar(&o.MaxGap, "max-gap", 0, "longest random wait between faults (default 6s)")
	fset.IntVar(&o.SampleEvery, "sample-every", 1, "restore a sample of checkpoints after every Nth fault (and at the end)")
	fset.StringVar(&o.ServerBin, "server", "", "noid-server binary (default: next to noid-chaos, else on PATH)")
	fset.StringVar(&imageData, "image-data", "/var/tmp/noid-test-cache/data", "data dir holding the tiny image (images/tiny), as `noid-server image build --tiny` or the tests make it")
	fset.StringVar(&o.TempDir, "tmp", "", "where the run's data dir is made (default $TMPDIR)")
	fset.BoolVar(&o.Keep, "keep", false, "keep the run's data dir")
	fset.StringVar(&o.ServerLog, "server-log", "", "write the server's whole log (across restarts) to this file")
	fset.BoolVar(&o.Verbose, "v", false, "print every failed client operation too")
	if err := fset.Parse(args); err != nil {
		return 2
	}
	if o.ServerBin == "" {
		o.ServerBin = findServer()
	}
	o.DiskSize = diskMiB << 20
	o.HostileModes = strings.Split(*modes, ",")
	if o.GuestTool == "" {
		o.GuestTool, _ = os.Executable()
	}
	img, err := image.Load(imageData, true)
	if err != nil {
		fmt.Fprintf(os.Stderr, "noid-chaos: %v\n", err)
		return 2
	}
	o.Image = img
	o.Out = os.Stdout
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	_, err = Run(ctx, o)
	switch {
	case err == nil:
		return 0
	case errors.Is(err, ErrViolated):
		fmt.Fprintf(os.Stderr, "noid-chaos: %v\n", err)
		return 1
	default:
		fmt.Fprintf(os.Stderr, "noid-chaos: %v\n", err)
		return 2
	}
}

// findServer looks for noid-server next to this executable, then on PATH.
func findServer() string {
	if exe, err := os.Executable(); err == nil {
		p := filepath.Join(filepath.Dir(exe), "noid-server")
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	if p, err := exec.LookPath("noid-server"); err == nil {
		return p
	}
	return "noid-server"
}
