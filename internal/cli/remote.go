package cli

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/noid-vm/noid/client"
)

func newRemoteCmd(e *env) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "remote",
		Short: "See what is in the server's remote store",
		Long: `The remote store is the S3-compatible bucket the server is configured with
([remote]), shared by the hosts of a fleet. ` + "`noid checkpoint push`" + ` and ` + "`noid golden push`" + `
upload to it; ` + "`noid restore --from remote:KEY --as NEW`" + ` and ` + "`noid golden pull`" + ` use it.`,
		Example: `  noid remote list`,
	}
	list := &cobra.Command{
		Use:     "list",
		Aliases: []string{"ls"},
		Short:   "List your pushed checkpoints and goldens, and the system goldens",
		Example: `  noid remote list
  noid remote list --json`,
		Args: exactArgs(0, "no arguments"),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := e.client()
			if err != nil {
				return err
			}
			rs, err := c.ListRemote(cmd.Context())
			if err != nil {
				return err
			}
			if asJSON {
				if rs == nil {
					rs = []*client.RemoteSnapshot{}
				}
				return printJSON(e.stdout, rs)
			}
			t := newTable(e.stdout, "KIND", "KEY", "OWNER", "SPEC", "DATA", "STORED", "FROM", "PUSHED")
			for _, r := range rs {
				key := r.Key
				if r.Kind == "checkpoint" {
					key = "remote:" + key
				}
				t.row(r.Kind, key, r.Owner, fmt.Sprintf("%d vCPU/%d MiB", r.VCPUs, r.MemoryMiB), bytesHuman(r.DataBytes),
					bytesHuman(r.StoredBytes), orDash(r.Host), ago(r.PushedAt))
			}
			return t.flush()
		},
	}
	list.Flags().BoolVar(&asJSON, "json", false, "print a JSON array")
	cmd.AddCommand(list)
	return cmd
}
