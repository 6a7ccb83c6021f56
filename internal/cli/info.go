package cli

import (
	"fmt"
	"time"

	"github.com/spf13/cobra"
)

func newInfoCmd(e *env) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "info [<vm>]",
		Short: "Show a VM's state, resources and how it booted",
		Long: `Show a VM's state, resources, network and how it booted. --json prints the
same object as the API (GET /v1/vms/{name}); its field names are stable.
` + activeHelp,
		Example: `  noid info dev
  noid info dev --json | jq .boot_path
  noid info               # the active VM`,
		Args:              rangeArgs(0, 1, "an optional VM name"),
		ValidArgsFunction: completeVMs(e, 1),
		RunE: func(cmd *cobra.Command, args []string) error {
			vm, err := e.firstOrActive(cmd, args)
			if err != nil {
				return err
			}
			c, err := e.client()
			if err != nil {
				return err
			}
			v, err := c.GetVM(cmd.Context(), vm)
			if err != nil {
				return err
			}
			if asJSON {
				return printJSON(e.stdout, v)
			}
			t := newTable(e.stdout, "FIELD", "VALUE")
			state := v.State
			if v.StateReason != "" {
				state += " (" + v.StateReason + ")"
			}
			pid := "-"
			if v.PID > 0 {
				pid = fmt.Sprint(v.PID)
			}
			boot := v.BootPath
			if v.BootReason != "" {
				boot += " (" + v.BootReason + ")"
			}
			uptime := "-"
			if v.UptimeSeconds > 0 {
				uptime = human(time.Duration(v.UptimeSeconds * float64(time.Second)))
			}
			pid += " (noid-" + v.RuntimeID + ")"
			if v.PID <= 0 {
				pid = "-"
			}
			for _, r := range [][2]string{
				{"name", v.Name}, {"user", orDash(v.Owner)}, {"id", v.ID}, {"state", state}, {"pid", pid}, {"vcpus", fmt.Sprint(v.VCPUs)},
				{"memory", fmt.Sprintf("%d MiB", v.MemoryMiB)}, {"disk", bytesHuman(v.DiskBytes)}, {"ip", orDash(v.IP)},
				{"mac", orDash(v.MAC)}, {"tap", orDash(v.Tap)}, {"network", v.Network}, {"vmm", v.VMM}, {"accel", v.Accel}, {"boot", boot},
				{"source", orDash(v.Source)}, {"created", v.CreatedAt.Local().Format(time.RFC3339) + " (" + ago(v.CreatedAt) + ")"},
				{"uptime", uptime}, {"checkpoints", fmt.Sprint(v.Checkpoints)},
			} {
				t.row(r[0], r[1])
			}
			return t.flush()
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}
