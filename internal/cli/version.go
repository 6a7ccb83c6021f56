package cli

import (
	"fmt"
	"runtime"
	"strings"

	"github.com/spf13/cobra"

	"github.com/noid-vm/noid/internal/api"
)

func newVersionCmd(e *env) *cobra.Command {
	cmd := &cobra.Command{
		Use:     "version",
		Short:   "Print the client and server versions",
		Example: `  noid version`,
		Args:    exactArgs(0, "no arguments"),
		RunE: func(cmd *cobra.Command, args []string) error {
			fmt.Fprintf(e.stdout, "client: noid %s (api %s, %s)\n", Version, api.Version, runtime.Version())
			c, err := e.client()
			if err != nil {
				fmt.Fprintf(e.stdout, "server: unreachable (%v)\n", err)
				return nil
			}
			v, err := c.Version(cmd.Context())
			if err != nil {
				fmt.Fprintf(e.stdout, "server: unreachable (%v)\n", err)
				return nil
			}
			fmt.Fprintf(e.stdout, "server: noid-server %s (api %s, vmm %s %s, accel %s)\n", v.Server, v.API, v.VMM, v.VMMVersion, v.Accel)
			if major(v.API) != major(api.Version) {
				fmt.Fprintf(e.stderr, "warning: client api %s and server api %s are incompatible; upgrade the older one\n", api.Version, v.API)
			}
			return nil
		},
	}
	return cmd
}

func major(v string) string { return strings.SplitN(v, ".", 2)[0] }
