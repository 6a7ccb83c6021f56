package servercli

import (
	"context"
	"fmt"
	"path/filepath"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/noid-vm/noid/client"
	"github.com/noid-vm/noid/internal/api"
	"github.com/noid-vm/noid/internal/config"
	"github.com/noid-vm/noid/internal/server"
	"github.com/noid-vm/noid/internal/store"
)

// viaServerHelp ends the Long help of the user commands.
const viaServerHelp = `When noid-server runs on the data dir, this goes through it (as root on its
unix socket) and is recorded in its audit log. Otherwise the database is
changed directly while the command holds the data dir's lock, so no server
can start meanwhile.`

// withStore runs fn on the data dir's database. The caller holds the data
// dir's lock.
func withStore(ctx context.Context, cfg *config.Config, fn func(*store.Store) error) error {
	st, err := store.Open(ctx, filepath.Join(cfg.DataDir, "noid.db"))
	if err != nil {
		return err
	}
	defer st.Close()
	return fn(st)
}

func newAddUserCmd(e *env) *cobra.Command {
	var admin, local bool
	cmd := &cobra.Command{
		Use:   "add-user <name>",
		Short: "Add an API user and print its token (shown once), or let a local account use the socket",
		Long: `Add a token user and print its token. Only its hash is kept, so it is shown this once.

With --local, <name> is a local unix account instead: it joins socket_group (the
group the unix socket is open to besides root; created if missing), so that it
can use the socket after its next login, and gets a user of its own, named
after the account. remove-user takes it out of the group again.

` + viaServerHelp,
		Example: `  noid-server add-user alice
  noid-server add-user --local bob`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			name := args[0]
			if local {
				if admin {
					return &usageError{fmt.Errorf("--admin and --local do not go together: root is the only local admin")}
				}
				return e.addLocalUser(cmd.Context(), name)
			}
			if err := api.ValidateUserName(name); err != nil {
				return err
			}
			cfg, err := e.config()
			if err != nil {
				return err
			}
			return e.issueToken(cmd.Context(), cfg, "add-user", func(ctx context.Context, c *client.Client) (*client.UserToken, error) {
				return c.CreateUser(ctx, name, admin)
			}, func(ctx context.Context, st *store.Store) (string, error) {
				_, tok, err := st.CreateUser(ctx, name, admin)
				return tok, err
			})
		},
	}
	cmd.Flags().BoolVar(&admin, "admin", false, "make the user an admin")
	cmd.Flags().BoolVar(&local, "local", false, "let the local unix account <name> use the unix socket (instead of a token user)")
	return cmd
}

// addLocalUser lets the local account name use the unix socket, through
// the server or (holding the data dir's lock) on the database.
func (e *env) addLocalUser(ctx context.Context, name string) error {
	cfg, err := e.config()
	if err != nil {
		return err
	}
	var u *api.User
	err = e.withDataDir(ctx, cfg, "add-user", func(ctx context.Context, c *client.Client) error {
		u, err = c.AddLocalUser(ctx, name)
		return err
	}, func(ctx context.Context) error {
		return withStore(ctx, cfg, func(st *store.Store) error {
			su, err := server.AddLocalUser(ctx, st, cfg.SocketGroup, name)
			if err == nil {
				au := server.UserInfo(su)
				u = &au
			}
			return err
		})
	})
	if err != nil {
		return err
	}
	fmt.Fprintf(e.stdout, "%s (uid %d) may use %s as a member of group %s, from its next login (or `newgrp %s`); its noid user is %s\n",
		name, *u.UnixUID, cfg.Socket, cfg.SocketGroup, cfg.SocketGroup, u.Name)
	return nil
}

// listUsers returns every user, from the server or (holding the lock) the
// database.
func (e *env) listUsers(ctx context.Context, cfg *config.Config) ([]*api.User, error) {
	var out []*api.User
	err := e.withDataDir(ctx, cfg, "list-users", func(ctx context.Context, c *client.Client) error {
		var err error
		out, err = c.ListUsers(ctx)
		return err
	}, func(ctx context.Context) error {
		return withStore(ctx, cfg, func(st *store.Store) error {
			us, err := st.ListUsers(ctx)
			for _, u := range us {
				au := server.UserInfo(u)
				out = append(out, &au)
			}
			return err
		})
	})
	return out, err
}

func newListUsersCmd(e *env) *cobra.Command {
	return &cobra.Command{
		Use:   "list-users",
		Short: "List users",
		Long: `List the token users and the local users the unix socket has mapped.

When noid-server runs on the data dir, this asks it (as root on its unix
socket). Otherwise it reads the database while holding the data dir's lock,
so no server can start meanwhile.`,
		Example: `  noid-server list-users`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			cfg, err := e.config()
			if err != nil {
				return err
			}
			us, err := e.listUsers(cmd.Context(), cfg)
			if err != nil {
				return err
			}
			tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "NAME\tKIND\tADMIN\tTOKEN\tCREATED")
			for _, u := range us {
				kind, tok := "token", "-"
				if u.UnixUID != nil {
					kind = fmt.Sprintf("unix uid %d", *u.UnixUID)
				}
				if u.TokenPrefix != "" {
					tok = "noid_tok_" + u.TokenPrefix + "…"
				}
				fmt.Fprintf(tw, "%s\t%s\t%v\t%s\t%s\n", u.Name, kind, u.Admin, tok, u.CreatedAt.Format("2006-01-02 15:04"))
			}
			return tw.Flush()
		},
	}
}

func newRotateTokenCmd(e *env) *cobra.Command {
	return &cobra.Command{
		Use:     "rotate-token <name>",
		Short:   "Replace a user's token; the old one stops working at once",
		Long:    "Replace a user's token and print the new one (shown once); the old one stops working at once.\n\n" + viaServerHelp,
		Example: `  noid-server rotate-token alice`,
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			cfg, err := e.config()
			if err != nil {
				return err
			}
			return e.issueToken(cmd.Context(), cfg, "rotate-token", func(ctx context.Context, c *client.Client) (*client.UserToken, error) {
				return c.RotateToken(ctx, args[0])
			}, func(ctx context.Context, st *store.Store) (string, error) {
				return st.RotateToken(ctx, args[0])
			})
		},
	}
}

// issueToken makes a token through the server (online) or, holding the
// data dir's lock, in the database (offline), and prints it.
func (e *env) issueToken(ctx context.Context, cfg *config.Config, command string,
	online func(context.Context, *client.Client) (*client.UserToken, error), offline func(context.Context, *store.Store) (string, error)) error {
	var tok string
	err := e.withDataDir(ctx, cfg, command, func(ctx context.Context, c *client.Client) error {
		ut, err := online(ctx, c)
		if err != nil {
			return err
		}
		tok = ut.Token
		return nil
	}, func(ctx context.Context) error {
		return withStore(ctx, cfg, func(st *store.Store) error {
			var err error
			tok, err = offline(ctx, st)
			return err
		})
	})
	if err != nil {
		return err
	}
	fmt.Fprintln(e.stdout, tok)
	return nil
}
