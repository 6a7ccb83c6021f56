package cli

import (
	"fmt"

	"github.com/spf13/cobra"
)

func newWhoamiCmd(e *env) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:     "whoami",
		Short:   "Show who the server thinks you are",
		Example: `  noid whoami`,
		Args:    exactArgs(0, "no arguments"),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := e.client()
			if err != nil {
				return err
			}
			w, err := c.WhoAmI(cmd.Context())
			if err != nil {
				return err
			}
			w.Server = e.target
			if asJSON {
				return printJSON(e.stdout, w)
			}
			role := "user"
			if w.Admin {
				role = "admin"
			}
			fmt.Fprintf(e.stdout, "%s (%s) via %s at %s\n", w.User, role, w.Via, e.target)
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}
