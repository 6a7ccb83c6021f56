package cli

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/noid-vm/noid/client"
)

func newCheckpointCmd(e *env) *cobra.Command {
	var req client.CheckpointRequest
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "checkpoint [<vm>] [<name>] [--name NAME]",
		Short: "Capture a running VM's memory, disk, CPU and device state",
		Long: `Checkpoint a running VM. The VM is paused only while its state is captured and
keeps running afterwards. Without a name, a short id is used as the name.
Restore it in place with ` + "`noid restore <vm> <checkpoint>`" + ` or clone it with --as.

A single argument is always the VM: ` + "`noid checkpoint dev`" + ` checkpoints dev. To name
a checkpoint of the active VM, use --name: ` + "`noid checkpoint --name clean`" + `.
With no argument, the active VM is checkpointed under a short id.
` + activeHelp,
		Example: `  noid checkpoint dev
  noid checkpoint dev before-upgrade --label "clean install"
  noid checkpoint --name clean          # the active VM
  noid checkpoint rm dev before-upgrade
  noid checkpoint push dev before-upgrade`,
		Args:              rangeArgs(0, 2, "an optional VM name and an optional checkpoint name"),
		ValidArgsFunction: completeVMs(e, 1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if len(args) == 2 {
				if req.Name != "" && req.Name != args[1] {
					return usagef("the checkpoint name is given twice (%q and --name %q)", args[1], req.Name)
				}
				req.Name = args[1]
			}
			vm, err := e.firstOrActive(cmd, args)
			if err != nil {
				return err
			}
			c, err := e.client()
			if err != nil {
				return err
			}
			stop := e.spin("checkpointing " + vm)
			cp, err := c.Checkpoint(cmd.Context(), vm, req)
			stop()
			if err != nil {
				return err
			}
			if asJSON {
				return printJSON(e.stdout, cp)
			}
			fmt.Fprintf(e.stdout, "checkpoint %s (id %s) of %s: paused %.1f ms, %s\n", cp.Name, cp.ID, cp.VM, cp.PauseMs, bytesHuman(cp.SizeBytes))
			return nil
		},
	}
	cmd.Flags().StringVar(&req.Name, "name", "", "checkpoint name (the same as the second argument)")
	cmd.Flags().StringVar(&req.Label, "label", "", "free-text label")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	cmd.AddCommand(&cobra.Command{
		Use:     "rm [<vm>] <checkpoint>...",
		Aliases: []string{"delete"},
		Short:   "Delete checkpoints",
		Long: `Delete checkpoints (by name or id). With two or more arguments the first is the
VM; with one, it is a checkpoint of the active VM.
` + activeHelp,
		Example: `  noid checkpoint rm dev before-upgrade
  noid checkpoint rm dev a b c
  noid checkpoint rm before-upgrade     # of the active VM`,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) < 1 {
				return usagef("checkpoint rm needs at least one checkpoint: noid checkpoint rm [<vm>] <checkpoint>...")
			}
			return nil
		},
		ValidArgsFunction: completeCheckpoints(e),
		RunE: func(cmd *cobra.Command, args []string) error {
			explicit, cps := "", args
			if len(args) >= 2 {
				explicit, cps = args[0], args[1:]
			}
			vm, err := e.vmName(cmd, explicit)
			if err != nil {
				return err
			}
			c, err := e.client()
			if err != nil {
				return err
			}
			for _, cp := range cps {
				if err := c.DeleteCheckpoint(cmd.Context(), vm, cp); err != nil {
					return err
				}
				fmt.Fprintf(e.stdout, "deleted checkpoint %s of %s\n", cp, vm)
			}
			return nil
		},
	})
	cmd.AddCommand(newCheckpointPushCmd(e))
	return cmd
}

func newCheckpointPushCmd(e *env) *cobra.Command {
	var key string
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "push [<vm>] <checkpoint> [--key KEY]",
		Short: "Upload a checkpoint to the server's remote store, for any host sharing it",
		Long: `Upload a checkpoint (memory, disk, device state and a manifest) to the remote
object store the server is configured with ([remote]). Only the non-zero data
moves, compressed, and what the store has already (the base image, memory that
did not change since an earlier push) is not sent again. The key defaults to
<vm>/<checkpoint>, in your own space of the store; clone it on any host that
shares the store with ` + "`noid restore --from remote:KEY --as NEW`" + `.
With two arguments the first is the VM; with one, it is a checkpoint of the
active VM.
` + activeHelp,
		Example: `  noid checkpoint push dev clean
  noid checkpoint push dev clean --key builders/ready
  noid restore --from remote:dev/clean --as dev2   # on another host`,
		Args:              rangeArgs(1, 2, "an optional VM name and a checkpoint"),
		ValidArgsFunction: completeCheckpoints(e),
		RunE: func(cmd *cobra.Command, args []string) error {
			explicit, cp := "", args[0]
			if len(args) == 2 {
				explicit, cp = args[0], args[1]
			}
			vm, err := e.vmName(cmd, explicit)
			if err != nil {
				return err
			}
			c, err := e.client()
			if err != nil {
				return err
			}
			stop := e.spin("pushing " + vm + "/" + cp)
			r, err := c.PushCheckpoint(cmd.Context(), vm, cp, key)
			stop()
			if err != nil {
				return err
			}
			if asJSON {
				return printJSON(e.stdout, r)
			}
			fmt.Fprintf(e.stdout, "pushed %s/%s as remote:%s: %s of data, %s sent (%d of %d chunks, the rest already stored) in %.1f s\n",
				vm, cp, r.Key, bytesHuman(r.DataBytes), bytesHuman(r.Pushed.BytesMoved), r.Pushed.ChunksMoved, r.Pushed.Chunks, r.Pushed.Ms/1000)
			return nil
		},
	}
	cmd.Flags().StringVar(&key, "key", "", "key in your space of the store (default <vm>/<checkpoint>)")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}
