package servercli

import (
	"context"
	"database/sql"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/noid-vm/noid/internal/api"
	"github.com/noid-vm/noid/internal/config"
	"github.com/noid-vm/noid/internal/errdefs"
	"github.com/noid-vm/noid/internal/manager"
	"github.com/noid-vm/noid/internal/network"
	"github.com/noid-vm/noid/internal/store"
	"github.com/noid-vm/noid/internal/vmm"
)

// The original Rust noid (noid-cli 0.2) kept everything in ~/.noid:
//
//	noid.db                 SQLite: users(id TEXT, name, token_hash, created_at),
//	                        vms(user_id, name, …, tap_name, guest_ip),
//	                        checkpoints(id, vm_name, user_id, label, snapshot_path, …)
//	golden/                 one flat golden (see manager.ImportLegacyGolden)
//	storage/users/<id>/vms/<name>/, …/checkpoints/<vm>/<id>/
//	                        Firecracker VMs and snapshots (rootfs.ext4,
//	                        memory.snap, vmstate.snap)
//
// Its tokens are noid_tok_ + 64 hex digits and it stored their hex
// SHA-256, exactly as this noid does (auth.HashToken), so the hashes are
// imported as they are and the same check verifies them.

func newImportCmd(e *env) *cobra.Command {
	var from string
	cmd := &cobra.Command{
		Use:   "import --from <old data dir>",
		Short: "Import users, tokens and the golden snapshot of the original (Rust) noid",
		Long: `Import what can come over from a data dir of the original Rust noid (noid-cli
0.2, usually ~/.noid): its users with their tokens (they keep working: both
store the token's SHA-256), and its golden snapshot when its files can run
here. It prints what it imported and what it could not bring over, and why:
the original's VMs and checkpoints are Firecracker snapshots of a guest
without noid-agent, which this noid cannot restore.

The old data dir is only read (its database is opened read-only). Running the
command again imports nothing new and says so. It needs the data dir to
itself: stop noid-server first.

Leftovers of the original's noid-netd (TAPs named noid<N>, iptables rules)
are reported with the commands that remove them; noid never removes them.`,
		Example: `  noid-server import --from /home/firecracker/.noid`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if from == "" {
				return &usageError{errors.New("--from <old data dir> is required")}
			}
			cfg, err := e.config()
			if err != nil {
				return err
			}
			src, err := filepath.Abs(from)
			if err != nil {
				return err
			}
			if err := checkImportSource(cfg, src); err != nil {
				return err
			}
			return e.withDataDir(cmd.Context(), cfg, "import", nil, func(ctx context.Context) error {
				return e.importLegacy(ctx, cfg, src)
			})
		},
	}
	cmd.Flags().StringVar(&from, "from", "", "the original noid's data dir (its ~/.noid)")
	return cmd
}

// checkImportSource refuses a source that is not the original noid's data
// dir, or is this server's own.
func checkImportSource(cfg *config.Config, src string) error {
	dd, _ := filepath.Abs(cfg.DataDir)
	if same, _ := sameFile(src, dd); same || src == dd {
		return errdefs.WithHint(fmt.Errorf("%w: %s is this server's data dir", errdefs.ErrInvalidArgument, src),
			"point data_dir at a new directory (for example /var/lib/noid) and import from the old one")
	}
	if _, err := os.Stat(filepath.Join(src, "noid.db")); err != nil {
		return errdefs.WithHint(fmt.Errorf("%w: %s has no noid.db: %w", errdefs.ErrInvalidArgument, src, err),
			"give the original noid's data dir, the ~/.noid of the user it ran as")
	}
	return nil
}

func sameFile(a, b string) (bool, error) {
	fa, err := os.Stat(a)
	if err != nil {
		return false, err
	}
	fb, err := os.Stat(b)
	if err != nil {
		return false, err
	}
	return os.SameFile(fa, fb), nil
}

// legacyTime parses the original's SQLite datetime('now') text.
func legacyTime(s string) time.Time {
	t, err := time.Parse(time.DateTime, s)
	if err != nil {
		return time.Time{}
	}
	return t
}

// importLegacy imports from the original noid's data dir src into cfg's
// data dir, whose lock the caller holds, and prints the report.
func (e *env) importLegacy(ctx context.Context, cfg *config.Config, src string) error {
	old, err := sql.Open("sqlite", "file:"+filepath.Join(src, "noid.db")+"?mode=ro&_pragma=query_only(1)&_pragma=busy_timeout(5000)")
	if err != nil {
		return fmt.Errorf("opening the original noid's database in %s: %w", src, err)
	}
	defer old.Close()
	out := e.stdout
	r := &importReport{}
	if err := withStore(ctx, cfg, func(st *store.Store) error {
		return r.users(ctx, old, st)
	}); err != nil {
		return err
	}
	if err := r.golden(ctx, cfg, e, src); err != nil {
		return err
	}
	if err := r.vms(ctx, old); err != nil {
		return err
	}
	r.leftovers()
	r.print(out)
	return nil
}

// importReport collects what an import did and could not do.
type importReport struct {
	imported, already, notes, notBrought []string
}

func (r *importReport) users(ctx context.Context, old *sql.DB, st *store.Store) error {
	rows, err := old.QueryContext(ctx, `SELECT id, name, token_hash, created_at FROM users ORDER BY created_at, name`)
	if err != nil {
		return fmt.Errorf("reading the original noid's users: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		var id, name, hash, created string
		if err := rows.Scan(&id, &name, &hash, &created); err != nil {
			return fmt.Errorf("reading the original noid's users: %w", err)
		}
		hash = strings.ToLower(hash)
		if b, err := hex.DecodeString(hash); err != nil || len(b) != 32 {
			r.notBrought = append(r.notBrought, fmt.Sprintf("user %s: its token hash is not a hex SHA-256", name))
			continue
		}
		if err := api.ValidateUserName(name); err != nil {
			r.notBrought = append(r.notBrought, fmt.Sprintf("user %s: %v (add it under another name: `noid-server add-user`, a new token)", name, err))
			continue
		}
		res, err := st.ImportUser(ctx, name, hash, legacyTime(created))
		if err != nil {
			return err
		}
		switch res {
		case store.UserImported:
			r.imported = append(r.imported, "user "+name+" (its token keeps working)")
		case store.UserAlreadyImported:
			r.already = append(r.already, "user "+name)
		case store.UserNameTaken:
			r.notBrought = append(r.notBrought, "user "+name+": this server has a user of that name with another token; it was left as it is")
		case store.UserTokenTaken:
			r.notBrought = append(r.notBrought, "user "+name+": another user of this server has the same token")
		}
	}
	return rows.Err()
}

func (r *importReport) golden(ctx context.Context, cfg *config.Config, e *env, src string) error {
	dir := filepath.Join(src, "golden")
	if _, err := os.Stat(filepath.Join(dir, vmm.GoldenConfig)); errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	res, err := manager.ImportLegacyGolden(ctx, cfg, e.logger(cfg), dir)
	if err != nil {
		r.notBrought = append(r.notBrought, fmt.Sprintf("golden snapshot %s: %v", dir, err))
		return nil
	}
	what := "golden snapshot " + res.Spec + " (now " + res.Dir + ")"
	switch {
	case res.Skipped != "":
		r.notBrought = append(r.notBrought, fmt.Sprintf("golden snapshot %s (%s): %s", dir, res.Spec, res.Skipped))
		return nil
	case res.Imported:
		r.imported = append(r.imported, what)
		r.notes = append(r.notes, "golden snapshot "+res.Spec+": "+res.Assumed)
	case res.Already:
		r.already = append(r.already, what)
	}
	if res.Stale != "" {
		r.notes = append(r.notes, "golden snapshot "+res.Spec+" is stale, creates boot instead: "+res.Stale)
	}
	return nil
}

func (r *importReport) vms(ctx context.Context, old *sql.DB) error {
	names := map[string]string{}
	urows, err := old.QueryContext(ctx, `SELECT id, name FROM users`)
	if err != nil {
		return fmt.Errorf("reading the original noid's users: %w", err)
	}
	for urows.Next() {
		var id, name string
		if err := urows.Scan(&id, &name); err != nil {
			urows.Close()
			return err
		}
		names[id] = name
	}
	urows.Close()
	rows, err := old.QueryContext(ctx, `SELECT user_id, name FROM vms ORDER BY user_id, name`)
	if err != nil {
		return fmt.Errorf("reading the original noid's VMs: %w", err)
	}
	for rows.Next() {
		var uid, name string
		if err := rows.Scan(&uid, &name); err != nil {
			rows.Close()
			return err
		}
		r.notBrought = append(r.notBrought, fmt.Sprintf("vm %s of user %s: a Firecracker VM of the original's guest (no noid-agent); create it anew here", name, names[uid]))
	}
	rows.Close()
	rows, err = old.QueryContext(ctx, `SELECT id, vm_name, user_id, COALESCE(label, ''), snapshot_path FROM checkpoints ORDER BY user_id, vm_name, created_at`)
	if err != nil {
		return fmt.Errorf("reading the original noid's checkpoints: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		var id, vm, uid, label, path string
		if err := rows.Scan(&id, &vm, &uid, &label, &path); err != nil {
			return err
		}
		if label != "" {
			id += " (" + label + ")"
		}
		why := "its files are gone (" + path + ")"
		if kind, err := manager.SnapshotKind(filepath.Join(path, vmm.SnapState)); err == nil {
			why = "a " + kind + " snapshot that noid cannot restore: the original's guest has no noid-agent, and noid keeps checkpoints only with a VM of its own; its files stay in " + path
		}
		r.notBrought = append(r.notBrought, fmt.Sprintf("checkpoint %s of vm %s of user %s: %s", id, vm, names[uid], why))
	}
	return rows.Err()
}

// leftovers reports the original noid-netd's TAPs in this namespace.
func (r *importReport) leftovers() {
	taps, err := network.LegacyTaps()
	if err != nil {
		r.notes = append(r.notes, "leftovers of the original noid-netd were not looked for: "+err.Error())
		return
	}
	if len(taps) > 0 {
		r.notes = append(r.notes, "network: "+network.LegacyHint(taps))
		return
	}
	r.notes = append(r.notes, "network: no TAPs of the original noid-netd here; its iptables rules are not looked for (noid neither reads nor changes iptables): "+
		"if it ran on this host, stop it for good (`systemctl disable --now noid-netd`) and remove them with `"+network.LegacyIptablesRemoval+"` (DEV: the host's default interface)")
}

func (r *importReport) print(w io.Writer) {
	section := func(title string, lines []string) {
		if len(lines) == 0 {
			return
		}
		fmt.Fprintln(w, title)
		for _, l := range lines {
			fmt.Fprintln(w, "  "+l)
		}
	}
	section("imported:", r.imported)
	section("imported by an earlier run:", r.already)
	section("not brought over:", r.notBrought)
	section("notes:", r.notes)
	if len(r.imported) == 0 {
		fmt.Fprintln(w, "nothing new to import")
	}
}
