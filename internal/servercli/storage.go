package servercli

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"github.com/spf13/cobra"

	"github.com/noid-vm/noid/client"
	"github.com/noid-vm/noid/internal/config"
	"github.com/noid-vm/noid/internal/storage"
)

func newStorageCmd(e *env) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "storage",
		Short: "Show where VM, checkpoint and golden files live, and how they are copied",
		Long: `noid copies disks and memory files with reflinks (FICLONE) where the filesystem
supports it (XFS, btrfs) and with sparse-aware copies otherwise. On an ext4 host,
set this in the config to keep VM storage on a loop-mounted XFS image that
noid-server creates and mounts at start-up:

  [storage]
  reflink_image_size = "100G"   # sparse: only used space takes disk

Change it only while no VMs exist.

The report probes with files of its own. Next to a running noid-server it
reports on the storage that server set up; without one it holds the data
dir's lock while it probes, so no server starts meanwhile.`,
		Example: `  noid-server storage --config /etc/noid/config.toml`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			cfg, err := e.config()
			if err != nil {
				return err
			}
			report := func(context.Context) error { return reportStorage(e, cfg) }
			return e.withDataDir(cmd.Context(), cfg, "storage", func(ctx context.Context, _ *client.Client) error { return report(ctx) }, report)
		},
	}
	return cmd
}

// reportStorage prints the storage root, how copies are made there and the
// space VMs and checkpoints use.
func reportStorage(e *env, cfg *config.Config) error {
	dir := cfg.StorageDir()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	mode, err := storage.Probe(dir)
	if err != nil {
		return err
	}
	fmt.Fprintf(e.stdout, "storage root: %s\ncopies:       %s\n", dir, mode)
	if cfg.Storage.ReflinkImageSize != "" {
		fmt.Fprintf(e.stdout, "image:        %s (%s)\n", cfg.Storage.ReflinkImage, cfg.Storage.ReflinkImageSize)
	}
	size, _ := storage.DirSize(filepath.Join(dir, "users"))
	fmt.Fprintf(e.stdout, "used by VMs and checkpoints: %d MiB\n", size>>20)
	return nil
}
