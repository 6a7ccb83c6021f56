package cli

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/noid-vm/noid/client"
)

func newListCmd(e *env) *cobra.Command {
	var asJSON, all bool
	cmd := &cobra.Command{
		Use:     "list",
		Aliases: []string{"ls"},
		Short:   "List your VMs (an admin: --all for every user's)",
		Long: `List your VMs as a table. --json prints the same array as the API
(GET /v1/vms); its field names are stable, and "owner" is the VM's user.

--all (admins only: root on the server's host, or an admin token) lists every
user's VMs with a USER column. Every command that takes a VM accepts an
admin's USER/VM for another user's VM: noid info alice/dev, noid exec
alice/dev -- ps, noid destroy alice/dev.`,
		Example: `  noid list
  noid list --json | jq -r '.[].name'
  sudo noid list --all`,
		Args: exactArgs(0, "no arguments"),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := e.client()
			if err != nil {
				return err
			}
			list := c.ListVMs
			if all {
				list = c.ListAllVMs
			}
			vms, err := list(cmd.Context())
			if err != nil {
				return err
			}
			if asJSON {
				if vms == nil {
					vms = []*client.VM{}
				}
				return printJSON(e.stdout, vms)
			}
			cols := []string{"NAME", "STATE", "PID", "VCPUS", "MEMORY", "IP", "BOOT", "CREATED"}
			if all {
				cols = append([]string{"USER"}, cols...)
			}
			t := newTable(e.stdout, cols...)
			for _, v := range vms {
				pid := "-"
				if v.PID > 0 {
					pid = fmt.Sprint(v.PID)
				}
				row := []string{v.Name, v.State, pid, fmt.Sprint(v.VCPUs), fmt.Sprintf("%d MiB", v.MemoryMiB), orDash(v.IP), orDash(v.BootPath), ago(v.CreatedAt)}
				if all {
					row = append([]string{orDash(v.Owner)}, row...)
				}
				t.row(row...)
			}
			return t.flush()
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print a JSON array")
	cmd.Flags().BoolVar(&all, "all", false, "list every user's VMs, with their users (admins only)")
	return cmd
}
