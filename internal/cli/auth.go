package cli

import (
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"github.com/noid-vm/noid/client"
)

func newAuthCmd(e *env) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "auth",
		Short: "Configure how noid reaches a remote server",
		Example: `  noid auth setup --url https://noid.example.com:7070 --token noid_tok_…
  noid auth migrate
  noid auth logout`,
	}
	var url, token string
	var skipCheck bool
	setup := &cobra.Command{
		Use:   "setup --url URL --token TOKEN",
		Short: "Save a server URL and token (config file mode 0600)",
		Long: `Save the server URL and API token to ~/.config/noid/config.toml (mode 0600), after
checking that they work. NOID_URL and NOID_TOKEN still override the file.`,
		Example: `  noid auth setup --url https://noid.example.com:7070 --token noid_tok_…`,
		Args:    exactArgs(0, "no arguments (use --url and --token)"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if url == "" {
				return usagef("auth setup needs --url")
			}
			c, err := client.New(url, token)
			if err != nil {
				return err
			}
			if !skipCheck {
				w, err := c.WhoAmI(cmd.Context())
				if err != nil {
					return fmt.Errorf("checking the server and token: %w", err)
				}
				fmt.Fprintf(e.stdout, "authenticated as %s\n", w.User)
			}
			path, err := writeAuthConfig(e.getenv, authConfig{URL: url, Token: token})
			if err != nil {
				return err
			}
			fmt.Fprintf(e.stdout, "saved %s\n", path)
			return nil
		},
	}
	setup.Flags().StringVar(&url, "url", "", "server URL (https://host:port, http://… or unix:///path)")
	setup.Flags().StringVar(&token, "token", "", "API token (noid_tok_…)")
	setup.Flags().BoolVar(&skipCheck, "no-check", false, "save without contacting the server")
	logout := &cobra.Command{
		Use:     "logout",
		Short:   "Remove the saved server URL and token",
		Example: `  noid auth logout`,
		Args:    exactArgs(0, "no arguments"),
		RunE: func(cmd *cobra.Command, args []string) error {
			path := authConfigPath(e.getenv)
			if err := os.Remove(path); err != nil && !os.IsNotExist(err) {
				return err
			}
			fmt.Fprintf(e.stdout, "removed %s\n", path)
			return nil
		},
	}
	var force bool
	migrate := &cobra.Command{
		Use:   "migrate",
		Short: "Copy the Rust noid's ~/.noid/config.toml into this client's config",
		Long: `Copy the server URL and token of the Rust noid's client config (the [server]
section of ~/.noid/config.toml) to ~/.config/noid/config.toml (mode 0600), after
checking that they work. The old file is left as it is. Until then, noid uses
the old file when ~/.config/noid/config.toml does not exist.`,
		Example: `  noid auth migrate
  noid auth migrate --no-check --force`,
		Args: exactArgs(0, "no arguments"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if !skipCheck {
				old, err := readLegacyConfig(e.getenv)
				if err == nil {
					c, err := client.New(old.URL, old.Token)
					if err != nil {
						return err
					}
					w, err := c.WhoAmI(cmd.Context())
					if err != nil {
						return fmt.Errorf("checking the server and token of %s: %w", legacyConfigPath(e.getenv), err)
					}
					fmt.Fprintf(e.stdout, "authenticated as %s\n", w.User)
				}
			}
			old, path, err := migrateLegacyConfig(e.getenv, force)
			if err != nil {
				return err
			}
			fmt.Fprintf(e.stdout, "saved %s (server %s); %s is unchanged\n", path, old.URL, legacyConfigPath(e.getenv))
			return nil
		},
	}
	migrate.Flags().BoolVar(&skipCheck, "no-check", false, "save without contacting the server")
	migrate.Flags().BoolVar(&force, "force", false, "replace an existing ~/.config/noid/config.toml")
	cmd.AddCommand(setup, migrate, logout)
	return cmd
}
