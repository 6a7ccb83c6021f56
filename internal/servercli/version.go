package servercli

import (
	"fmt"
	"runtime"

	"github.com/spf13/cobra"

	"github.com/noid-vm/noid/internal/api"
	"github.com/noid-vm/noid/internal/server"
)

func newVersionCmd(e *env) *cobra.Command {
	return &cobra.Command{
		Use:     "version",
		Short:   "Print the server's version",
		Example: `  noid-server version`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			fmt.Fprintf(e.stdout, "noid-server %s (api %s, %s)\n", server.Version, api.Version, runtime.Version())
			return nil
		},
	}
}
