package servercli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/noid-vm/noid/internal/image"
)

func newImageCmd(e *env) *cobra.Command {
	cmd := &cobra.Command{Use: "image", Short: "Build guest images"}
	var tiny, showProgress bool
	var packages []string
	build := &cobra.Command{
		Use:   "build",
		Short: "Build the default guest image (kernel, initramfs with the agent, rootfs)",
		Long: `Build the guest image under the config's data_dir: the Debian cloud kernel, an
initramfs holding noid-agent, and a root filesystem: Debian bookworm from
debootstrap by default (about two minutes), or a busybox rootfs with --tiny
(seconds). Outputs are cached and rebuilt only when their inputs change.

The Debian rootfs is debootstrap's minbase plus ` + "`" + `ca-certificates curl iproute2
iputils-ping less nano procps python3 sudo` + "`" + `; --packages adds more (their
dependencies come along, their recommendations do not). Both images have a
user ` + "`noid`" + ` (uid 1000, home /home/noid) besides root; on Debian it has
passwordless sudo. Run commands as it with ` + "`noid exec --user noid`" + `.

The build replaces files a server boots VMs from, so it refuses to run while
noid-server serves the data dir (stop it, build, start it again). It holds
the data dir's lock while it builds, so no server starts meanwhile.`,
		Example: `  noid-server image build
  noid-server image build --packages git,build-essential
  noid-server image build --tiny --config /etc/noid/config.toml`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			cfg, err := e.config()
			if err != nil {
				return err
			}
			var pkgs []string // nil: image.DefaultPackages
			if len(packages) > 0 {
				if tiny {
					return &usageError{errors.New("--packages applies to the Debian image, not --tiny")}
				}
				if err := image.CheckPackageNames(packages); err != nil {
					return &usageError{fmt.Errorf("--packages: %w", err)}
				}
				pkgs = append(append(pkgs, image.DefaultPackages...), packages...)
			}
			agent, err := agentBinary(cfg)
			if err != nil {
				return err
			}
			// Progress lines go to a terminal; piped, the build is quiet
			// unless --progress is given (errors carry the tool's output).
			var progress io.Writer
			if showProgress || isTerminal(e.stderr) {
				progress = e.stderr
			}
			var img *image.Image
			err = e.withDataDir(cmd.Context(), cfg, "image build", nil, func(ctx context.Context) error {
				img, err = image.Build(ctx, image.BuildOptions{DataDir: cfg.DataDir, Tiny: tiny, AgentBinary: agent, Packages: pkgs, Progress: progress})
				return err
			})
			if err != nil {
				return err
			}
			fmt.Fprintf(e.stdout, "image ready in %s\n  kernel: %s (%s)\n  initrd: %s\n  rootfs: %s\n", img.Dir, img.Kernel, img.KernelRelease, img.Initrd, img.Rootfs)
			return nil
		},
	}
	build.Flags().BoolVar(&tiny, "tiny", false, "build the small busybox image (for tests) instead of Debian")
	build.Flags().StringSliceVar(&packages, "packages", nil, "extra Debian packages for the rootfs, comma-separated (on top of the defaults)")
	build.Flags().BoolVar(&showProgress, "progress", false, "print progress lines even when stderr is not a terminal")
	cmd.AddCommand(build)
	return cmd
}

// isTerminal reports whether w is a terminal.
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	return ok && term.IsTerminal(int(f.Fd()))
}
