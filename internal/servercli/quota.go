package servercli

import (
	"context"
	"fmt"
	"strconv"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/noid-vm/noid/client"
	"github.com/noid-vm/noid/internal/api"
	"github.com/noid-vm/noid/internal/config"
	"github.com/noid-vm/noid/internal/errdefs"
	"github.com/noid-vm/noid/internal/server"
	"github.com/noid-vm/noid/internal/store"
)

// quotaFlag is one per-user limit: a number, a size (for bytes), or
// "default" to fall back to the config's [quota] value.
type quotaFlag struct {
	name  string
	size  bool
	value string
}

func newSetQuotaCmd(e *env) *cobra.Command {
	flags := []*quotaFlag{{name: "max-vms"}, {name: "max-vcpus"}, {name: "max-memory-mib"}, {name: "max-checkpoint-bytes", size: true}}
	cmd := &cobra.Command{
		Use:   "set-quota <user>",
		Short: "Set or show a user's own limits, which override the config's [quota] defaults",
		Long: `Set or show a user's own limits. Each flag takes a number (0 means unlimited), or "default"
to use the config's [quota] value again. --max-checkpoint-bytes also takes sizes such as 20G.
Without flags it prints the user's limits. Running VMs are never stopped by a lower limit; it applies to
the next create, clone or checkpoint. No restart is needed.

` + viaServerHelp,
		Example: `  noid-server set-quota alice --max-vms 10 --max-memory-mib 16384 --max-checkpoint-bytes 50G
  noid-server set-quota alice --max-vms default
  noid-server set-quota alice`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			cfg, err := e.config()
			if err != nil {
				return err
			}
			name := args[0]
			// The flags are parsed first: a bad value is a usage error
			// whoever applies the rest.
			var set []func(*api.Quota)
			for i, f := range flags {
				if !cmd.Flags().Changed(f.name) {
					continue
				}
				v, err := parseQuota(f)
				if err != nil {
					return &usageError{err}
				}
				set = append(set, func(q *api.Quota) { *quotaFields(q)[i] = v })
			}
			apply := func(q api.Quota) api.Quota {
				for _, s := range set {
					s(&q)
				}
				return q
			}
			var u *api.User
			err = e.withDataDir(cmd.Context(), cfg, "set-quota", func(ctx context.Context, c *client.Client) error {
				us, err := c.ListUsers(ctx)
				if err != nil {
					return err
				}
				for _, x := range us {
					if x.Name == name {
						u = x
					}
				}
				if u == nil {
					return fmt.Errorf("user %q: %w", name, errdefs.ErrNotFound)
				}
				if len(set) > 0 {
					u, err = c.SetQuota(ctx, name, apply(u.Quota))
				}
				return err
			}, func(ctx context.Context) error {
				return withStore(ctx, cfg, func(st *store.Store) error {
					su, err := st.UserByName(ctx, name)
					if err != nil {
						return err
					}
					au := server.UserInfo(su)
					u = &au
					if len(set) == 0 {
						return nil
					}
					u.Quota = apply(u.Quota)
					q := u.Quota
					return st.SetQuota(ctx, name, q.MaxVMs, q.MaxVCPUs, q.MaxMemoryMiB, q.MaxCheckpointBytes)
				})
			})
			if err != nil {
				return err
			}
			return printQuota(e, cfg, u)
		},
	}
	for _, f := range flags {
		what := "a number"
		if f.size {
			what = "a size (20G, 512M, bytes)"
		}
		cmd.Flags().StringVar(&f.value, f.name, "", fmt.Sprintf("%s; 0 = unlimited, \"default\" = the config's value", what))
	}
	return cmd
}

func parseQuota(f *quotaFlag) (*int64, error) {
	if f.value == "default" {
		return nil, nil
	}
	var n int64
	var err error
	if f.size {
		n, err = config.ParseSize(f.value)
	} else {
		n, err = strconv.ParseInt(f.value, 10, 64)
	}
	if err != nil || n < 0 {
		return nil, fmt.Errorf("--%s %q: want a non-negative %s or \"default\"", f.name, f.value, map[bool]string{true: "size", false: "number"}[f.size])
	}
	return &n, nil
}

// quotaFields are q's limits in the order of set-quota's flags.
func quotaFields(q *api.Quota) []**int64 {
	return []**int64{&q.MaxVMs, &q.MaxVCPUs, &q.MaxMemoryMiB, &q.MaxCheckpointBytes}
}

// printQuota prints u's limits and where each comes from: the user's own,
// or the config's (for admins, only what the config sets).
func printQuota(e *env, cfg *config.Config, u *api.User) error {
	q := u.Quota
	tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "LIMIT\tVALUE\tFROM")
	row := func(name string, own *int64, def int64) {
		v, from := def, "config [quota]"
		if own != nil {
			v, from = *own, "user"
		}
		s := strconv.FormatInt(v, 10)
		if v == 0 {
			s = "unlimited"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\n", name, s, from)
	}
	def := cfg.QuotaLimitsFor(u.Admin)
	row("max_vms", q.MaxVMs, int64(def.MaxVMs))
	row("max_vcpus", q.MaxVCPUs, int64(def.MaxVCPUs))
	row("max_memory_mib", q.MaxMemoryMiB, int64(def.MaxMemoryMiB))
	row("max_checkpoint_bytes", q.MaxCheckpointBytes, def.MaxCheckpointBytes)
	return tw.Flush()
}
