package servercli

import (
	"fmt"
	"path/filepath"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/noid-vm/noid/internal/api"
	"github.com/noid-vm/noid/internal/store"
)

func openStore(cmd *cobra.Command, e *env) (*store.Store, error) {
	cfg, err := e.config()
	if err != nil {
		return nil, err
	}
	return store.Open(cmd.Context(), filepath.Join(cfg.DataDir, "noid.db"))
}

func newAddUserCmd(e *env) *cobra.Command {
	var admin bool
	cmd := &cobra.Command{
		Use:     "add-user <name>",
		Short:   "Add an API user and print its token (shown once)",
		Example: `  noid-server add-user alice`,
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := api.ValidateVMName(args[0]); err != nil || args[0][0] == '_' {
				return fmt.Errorf("invalid user name %q: use lowercase letters, digits and '-'", args[0])
			}
			st, err := openStore(cmd, e)
			if err != nil {
				return err
			}
			defer st.Close()
			_, tok, err := st.CreateUser(cmd.Context(), args[0], admin)
			if err != nil {
				return err
			}
			fmt.Fprintln(e.stdout, tok)
			return nil
		},
	}
	cmd.Flags().BoolVar(&admin, "admin", false, "make the user an admin")
	return cmd
}

func newListUsersCmd(e *env) *cobra.Command {
	return &cobra.Command{
		Use:     "list-users",
		Short:   "List users",
		Example: `  noid-server list-users`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			st, err := openStore(cmd, e)
			if err != nil {
				return err
			}
			defer st.Close()
			us, err := st.ListUsers(cmd.Context())
			if err != nil {
				return err
			}
			tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "NAME\tKIND\tADMIN\tTOKEN\tCREATED")
			for _, u := range us {
				kind, tok := "token", "noid_tok_"+u.TokenPrefix+"…"
				if u.UnixUID >= 0 {
					kind, tok = fmt.Sprintf("unix uid %d", u.UnixUID), "-"
					if u.TokenPrefix != "" {
						tok = "noid_tok_" + u.TokenPrefix + "…"
					}
				}
				fmt.Fprintf(tw, "%s\t%s\t%v\t%s\t%s\n", u.Name, kind, u.IsAdmin, tok, u.CreatedAt.Format("2006-01-02 15:04"))
			}
			return tw.Flush()
		},
	}
}

func newRotateTokenCmd(e *env) *cobra.Command {
	return &cobra.Command{
		Use:     "rotate-token <name>",
		Short:   "Replace a user's token; the old one stops working at once",
		Example: `  noid-server rotate-token alice`,
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			st, err := openStore(cmd, e)
			if err != nil {
				return err
			}
			defer st.Close()
			tok, err := st.RotateToken(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			fmt.Fprintln(e.stdout, tok)
			return nil
		},
	}
}
