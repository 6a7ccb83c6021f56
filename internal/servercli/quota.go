package servercli

import (
	"fmt"
	"strconv"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/noid-vm/noid/internal/config"
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
the next create, clone or checkpoint. No restart is needed.`,
		Example: `  noid-server set-quota alice --max-vms 10 --max-memory-mib 16384 --max-checkpoint-bytes 50G
  noid-server set-quota alice --max-vms default
  noid-server set-quota alice`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			cfg, err := e.config()
			if err != nil {
				return err
			}
			st, err := openStore(cmd, e)
			if err != nil {
				return err
			}
			defer st.Close()
			u, err := st.UserByName(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			cur := []**int64{&u.MaxVMs, &u.MaxVCPUs, &u.MaxMemoryMiB, &u.MaxCheckpointBytes}
			changed := false
			for i, f := range flags {
				if !cmd.Flags().Changed(f.name) {
					continue
				}
				changed = true
				v, err := parseQuota(f)
				if err != nil {
					return &usageError{err}
				}
				*cur[i] = v
			}
			if changed {
				if err := st.SetQuota(cmd.Context(), u.Name, u.MaxVMs, u.MaxVCPUs, u.MaxMemoryMiB, u.MaxCheckpointBytes); err != nil {
					return err
				}
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

func printQuota(e *env, cfg *config.Config, u *store.User) error {
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
	row("max_vms", u.MaxVMs, int64(cfg.Quota.MaxVMs))
	row("max_vcpus", u.MaxVCPUs, int64(cfg.Quota.MaxVCPUs))
	row("max_memory_mib", u.MaxMemoryMiB, int64(cfg.Quota.MaxMemoryMiB))
	row("max_checkpoint_bytes", u.MaxCheckpointBytes, cfg.Quota.MaxCheckpointBytes)
	return tw.Flush()
}
