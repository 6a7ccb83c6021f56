package servercli

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/noid-vm/noid/internal/image"
)

func newImageCmd(e *env) *cobra.Command {
	cmd := &cobra.Command{Use: "image", Short: "Build guest images"}
	var tiny bool
	build := &cobra.Command{
		Use:   "build",
		Short: "Build the default guest image (kernel, initramfs with the agent, rootfs)",
		Long: `Build the guest image under the config's data_dir: the Debian cloud kernel, an
initramfs holding noid-agent, and a root filesystem: Debian bookworm from
debootstrap by default (about a minute), or a busybox rootfs with --tiny (seconds).
Outputs are cached and rebuilt only when their inputs change.`,
		Example: `  noid-server image build
  noid-server image build --tiny --config /etc/noid/config.toml`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			cfg, err := e.config()
			if err != nil {
				return err
			}
			agent, err := agentBinary(cfg)
			if err != nil {
				return err
			}
			img, err := image.Build(cmd.Context(), image.BuildOptions{DataDir: cfg.DataDir, Tiny: tiny, AgentBinary: agent, Progress: e.stderr})
			if err != nil {
				return err
			}
			fmt.Fprintf(e.stdout, "image ready in %s\n  kernel: %s (%s)\n  initrd: %s\n  rootfs: %s\n", img.Dir, img.Kernel, img.KernelRelease, img.Initrd, img.Rootfs)
			return nil
		},
	}
	build.Flags().BoolVar(&tiny, "tiny", false, "build the small busybox image (for tests) instead of Debian")
	cmd.AddCommand(build)
	return cmd
}
