package manager

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"

	"github.com/noid-vm/noid/internal/errdefs"
	"github.com/noid-vm/noid/internal/store"
)

// Golden snapshots count against their owner's quota (SECURITY.md): their
// number against [quota] max_goldens, and their bytes, backups included,
// against max_checkpoint_bytes together with the owner's checkpoints. A
// golden counts in full even while it still shares blocks with the
// checkpoint it was promoted from: deleting that checkpoint leaves the
// golden holding them.

// specDirRE matches a golden's directory name (vCPUs x memory MiB).
var specDirRE = regexp.MustCompile(`^[0-9]+x[0-9]+$`)

// goldenUsage returns how many golden snapshots u keeps (for an admin, the
// system goldens) and the bytes they and their backups hold.
func (m *Manager) goldenUsage(u *store.User) (count int, bytes int64) {
	root := m.goldenRoot(u)
	ents, _ := os.ReadDir(root)
	for _, e := range ents {
		switch {
		case e.IsDir() && specDirRE.MatchString(e.Name()):
			count++
			bytes += m.snapshotSize(filepath.Join(root, e.Name()))
		case e.IsDir() && e.Name() == ".backup":
			bents, _ := os.ReadDir(filepath.Join(root, e.Name()))
			for _, b := range bents {
				bytes += m.snapshotSize(filepath.Join(root, e.Name(), b.Name()))
			}
		}
	}
	return count, bytes
}

// checkGoldenQuota refuses a promotion of addBytes into spec (a spec
// directory name) that would take u over max_goldens (a new spec only: a
// promotion over an existing golden replaces it) or, with u's checkpoints
// (checkpointBytes), over max_checkpoint_bytes.
func (m *Manager) checkGoldenQuota(u *store.User, spec string, addBytes, checkpointBytes int64) error {
	count, bytes := m.goldenUsage(u)
	if max := m.cfg.QuotaLimitsFor(u.IsAdmin).MaxGoldens; max > 0 && count >= max {
		if _, err := os.Stat(filepath.Join(m.goldenRoot(u), spec)); err != nil {
			return errdefs.WithHint(fmt.Errorf("%w: user %s may keep at most %d golden snapshots (has %d)", errdefs.ErrQuotaExceeded, u.Name, max, count),
				"remove one with `noid golden rm --vcpus N --memory MiB`, or promote over a spec you already have")
		}
	}
	m.quota.mu.Lock()
	reserved := m.quota.cpReserved[u.ID]
	m.quota.mu.Unlock()
	if lim := m.checkpointLimit(u); lim > 0 && checkpointBytes+reserved+bytes+addBytes > lim {
		return errdefs.WithHint(fmt.Errorf("%w: checkpoint and golden storage of user %s would be %d bytes, the limit is %d (checkpoints %d, being written %d, goldens and their backups %d, this golden %d)",
			errdefs.ErrQuotaExceeded, u.Name, checkpointBytes+reserved+bytes+addBytes, lim, checkpointBytes, reserved, bytes, addBytes),
			"delete old checkpoints with `noid checkpoint rm` or goldens with `noid golden rm`")
	}
	return nil
}
