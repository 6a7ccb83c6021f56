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
		Long: `noid's checkpoints, rewinds and clones copy no data: disk layers are hard-linked
and memory files are mapped copy-on-write. Files are copied only where a hard
link cannot do: a base image's first use from another filesystem, and memory
files with QEMU before 8.2. [storage] mode says how: "auto" (the default) makes reflinks (FICLONE) where the filesystem has them
(XFS, btrfs) and sparse-aware copies elsewhere, "copy" always makes sparse copies,
"reflink" refuses to start without reflinks. On an ext4 host, this keeps storage
on a loop-mounted XFS image that noid-server creates and mounts at start-up:

  [storage]
  reflink_image_size = "100G"   # sparse: only used space takes disk

Changing it moves the storage root: while VMs exist the server refuses to start;
otherwise it moves the golden snapshots to the new root at its next start.

The report prints the root, the mode setting, what it resolved to and why, and
the space VMs and checkpoints use. It probes with files of its own. Next to a
running noid-server it reports on the storage that server set up; without one
it holds the data dir's lock while it probes, so no server starts meanwhile.`,
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

// reportStorage prints the storage root, the [storage] mode setting,
// what it resolves to here and why, and the space VMs and checkpoints use.
// It fails when the server would refuse to start on this storage.
func reportStorage(e *env, cfg *config.Config) error {
	dir := cfg.StorageDir()
	dec, err := decideStorage(cfg)
	resolved, why := dec.Resolved(), dec.Why
	if err != nil {
		resolved = "none: noid-server refuses to start"
		if cfg.Storage.Mode != storage.SettingReflink {
			resolved = "copy (unprobed)"
		}
	}
	fmt.Fprintf(e.stdout, "storage root: %s\nmode:         %s\nresolved:     %s\nwhy:          %s\n", dir, cfg.Storage.Mode, resolved, why)
	if cfg.Storage.ReflinkImageSize != "" {
		fmt.Fprintf(e.stdout, "image:        %s (%s)\n", cfg.Storage.ReflinkImage, cfg.Storage.ReflinkImageSize)
	}
	size, _ := storage.DirSize(filepath.Join(dir, "users"))
	fmt.Fprintf(e.stdout, "used by VMs and checkpoints: %d MiB\n", size>>20)
	return err
}

// decideStorage resolves [storage] mode for cfg's storage root as the
// server does at start-up (storage.Decide). A root that does not exist
// yet is probed on the nearest directory above it that does.
func decideStorage(cfg *config.Config) (storage.Decision, error) {
	dir := cfg.StorageDir()
	if cfg.Storage.ReflinkImageSize != "" {
		return storage.Decide(dir, cfg.Storage.Mode, cfg.Storage.ReflinkImage)
	}
	for {
		if _, err := os.Stat(dir); err == nil || filepath.Dir(dir) == dir {
			break
		}
		dir = filepath.Dir(dir)
	}
	return storage.Decide(dir, cfg.Storage.Mode, "")
}
