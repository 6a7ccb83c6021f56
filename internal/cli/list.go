package cli

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/noid-vm/noid/client"
)

func newListCmd(e *env) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:     "list",
		Aliases: []string{"ls"},
		Short:   "List your VMs",
		Long: `List your VMs as a table. --json prints the same array as the API
(GET /v1/vms); its field names are stable.`,
		Example: `  noid list
  noid list --json | jq -r '.[].name'`,
		Args: exactArgs(0, "no arguments"),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := e.client()
			if err != nil {
				return err
			}
			vms, err := c.ListVMs(cmd.Context())
			if err != nil {
				return err
			}
			if asJSON {
				if vms == nil {
					vms = []*client.VM{}
				}
				return printJSON(e.stdout, vms)
			}
			t := newTable(e.stdout, "NAME", "STATE", "PID", "VCPUS", "MEMORY", "IP", "BOOT", "CREATED")
			for _, v := range vms {
				pid := "-"
				if v.PID > 0 {
					pid = fmt.Sprint(v.PID)
				}
				t.row(v.Name, v.State, pid, fmt.Sprint(v.VCPUs), fmt.Sprintf("%d MiB", v.MemoryMiB), orDash(v.IP), orDash(v.BootPath), ago(v.CreatedAt))
			}
			return t.flush()
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print a JSON array")
	return cmd
}
