package cli

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/noid-vm/noid/client"
)

func newGoldenCmd(e *env) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "golden",
		Short: "Manage golden snapshots (pre-booted VMs that `noid create` restores)",
		Long: `A golden snapshot is a checkpoint of a fully booted VM that ` + "`noid create`" + ` restores
instead of booting, when the requested vCPUs and memory match. There is one per
(vCPUs, memory). Root's goldens are used by every user; a user's own goldens take
precedence for them. scripts/provision-golden.sh builds one end to end.`,
		Example: `  noid golden promote builder ready
  noid golden list
  noid golden rm --vcpus 2 --memory 4096`,
	}
	var cpID string
	promote := &cobra.Command{
		Use:   "promote [<vm>] <checkpoint> | --checkpoint-id ID",
		Short: "Make a checkpoint the golden snapshot for its vCPUs and memory",
		Long: `Make a checkpoint the golden snapshot for its vCPUs and memory. With two
arguments the first is the VM; with one, it is a checkpoint of the active VM.
` + activeHelp,
		Example: `  noid golden promote builder ready
  noid golden promote --checkpoint-id 3fa9c2d1`,
		ValidArgsFunction: completeCheckpoints(e),
		RunE: func(cmd *cobra.Command, args []string) error {
			var vm, cp string
			switch {
			case cpID != "" && len(args) == 0:
				cp = cpID
			case cpID == "" && len(args) == 2:
				vm, cp = args[0], args[1]
			case cpID == "" && len(args) == 1:
				name, err := e.vmName(cmd, "")
				if err != nil {
					return err
				}
				vm, cp = name, args[0]
			default:
				return usagef("golden promote needs [<vm>] <checkpoint>, or --checkpoint-id ID")
			}
			c, err := e.client()
			if err != nil {
				return err
			}
			g, err := c.PromoteGolden(cmd.Context(), vm, cp)
			if err != nil {
				return err
			}
			fmt.Fprintf(e.stdout, "golden snapshot for %d vCPU/%d MiB promoted from %s (%s)\n", g.VCPUs, g.MemoryMiB, g.Source, bytesHuman(g.SizeBytes))
			return nil
		},
	}
	promote.Flags().StringVar(&cpID, "checkpoint-id", "", "promote the checkpoint with this id")
	var asJSON bool
	list := &cobra.Command{
		Use:     "list",
		Aliases: []string{"ls"},
		Short:   "List golden snapshots",
		Long: `List your golden snapshots and the system ones. --json prints the same array as
the API (GET /v1/golden); its field names are stable.`,
		Example: `  noid golden list
  noid golden list --json`,
		Args: exactArgs(0, "no arguments"),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := e.client()
			if err != nil {
				return err
			}
			gs, err := c.ListGolden(cmd.Context())
			if err != nil {
				return err
			}
			if asJSON {
				if gs == nil {
					gs = []*client.Golden{}
				}
				return printJSON(e.stdout, gs)
			}
			t := newTable(e.stdout, "SPEC", "OWNER", "STATUS", "SPARES", "SOURCE", "SIZE", "CREATED")
			for _, g := range gs {
				status := "ready"
				if g.Stale {
					status = "STALE: " + g.StaleWhy
				}
				t.row(fmt.Sprintf("%d vCPU/%d MiB", g.VCPUs, g.MemoryMiB), g.Owner, status, fmt.Sprint(g.Spares), orDash(g.Source), bytesHuman(g.SizeBytes), ago(g.CreatedAt))
			}
			return t.flush()
		},
	}
	list.Flags().BoolVar(&asJSON, "json", false, "print a JSON array")
	var vcpus, mem int
	rm := &cobra.Command{
		Use:     "rm",
		Short:   "Delete a golden snapshot (default: the server's default spec)",
		Example: `  noid golden rm --vcpus 1 --memory 2048`,
		Args:    exactArgs(0, "no arguments (use --vcpus and --memory)"),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := e.client()
			if err != nil {
				return err
			}
			if err := c.RemoveGolden(cmd.Context(), vcpus, mem); err != nil {
				return err
			}
			fmt.Fprintln(e.stdout, "golden snapshot removed")
			return nil
		},
	}
	rm.Flags().IntVar(&vcpus, "vcpus", 0, "vCPUs of the golden to remove")
	rm.Flags().IntVar(&mem, "memory", 0, "memory (MiB) of the golden to remove")
	var pvcpus, pmem int
	var pjson bool
	push := &cobra.Command{
		Use:   "push [--vcpus N --memory MiB]",
		Short: "Upload your golden snapshot for a spec to the server's remote store",
		Long: `Upload your golden snapshot for a spec (default: the server's default spec) to
the remote object store ([remote]). Root's (the system golden) is published for
every user of every host sharing the store; a user's stays theirs. Pull it on
another host with ` + "`noid golden pull`" + `.`,
		Example: `  noid golden push
  noid golden push --vcpus 2 --memory 4096`,
		Args: exactArgs(0, "no arguments (use --vcpus and --memory)"),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := e.client()
			if err != nil {
				return err
			}
			stop := e.spin("pushing the golden snapshot")
			r, err := c.PushGolden(cmd.Context(), pvcpus, pmem)
			stop()
			if err != nil {
				return err
			}
			if pjson {
				return printJSON(e.stdout, r)
			}
			fmt.Fprintf(e.stdout, "pushed the golden snapshot for %d vCPU/%d MiB (owner %s): %s of data, %s sent in %.1f s\n",
				r.VCPUs, r.MemoryMiB, r.Owner, bytesHuman(r.DataBytes), bytesHuman(r.Pushed.BytesMoved), r.Pushed.Ms/1000)
			return nil
		},
	}
	push.Flags().IntVar(&pvcpus, "vcpus", 0, "vCPUs of the golden to push")
	push.Flags().IntVar(&pmem, "memory", 0, "memory (MiB) of the golden to push")
	push.Flags().BoolVar(&pjson, "json", false, "print JSON")
	pull := &cobra.Command{
		Use:   "pull [--vcpus N --memory MiB]",
		Short: "Make the remote golden snapshot for a spec this server's golden",
		Long: `Download the golden snapshot for a spec (default: the server's default spec)
from the remote object store and make it this server's: your own pushed golden
if there is one, else the system one. It is refused when it cannot serve creates
here (another backend, QEMU, kernel, initramfs or base rootfs). Pulling the one
installed already downloads nothing.`,
		Example: `  noid golden pull
  noid golden pull --vcpus 2 --memory 4096`,
		Args: exactArgs(0, "no arguments (use --vcpus and --memory)"),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := e.client()
			if err != nil {
				return err
			}
			stop := e.spin("pulling the golden snapshot")
			g, err := c.PullGolden(cmd.Context(), pvcpus, pmem)
			stop()
			if err != nil {
				return err
			}
			if pjson {
				return printJSON(e.stdout, g)
			}
			moved := "already here, nothing downloaded"
			if p := g.Pulled; p != nil && !p.Cached {
				moved = bytesHuman(p.BytesMoved) + " downloaded"
			}
			fmt.Fprintf(e.stdout, "golden snapshot for %d vCPU/%d MiB pulled from %s (%s)\n", g.VCPUs, g.MemoryMiB, g.Remote, moved)
			return nil
		},
	}
	pull.Flags().IntVar(&pvcpus, "vcpus", 0, "vCPUs of the golden to pull")
	pull.Flags().IntVar(&pmem, "memory", 0, "memory (MiB) of the golden to pull")
	pull.Flags().BoolVar(&pjson, "json", false, "print JSON")
	cmd.AddCommand(promote, list, rm, push, pull)
	return cmd
}
