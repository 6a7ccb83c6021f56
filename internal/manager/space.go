package manager

import (
	"fmt"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/noid-vm/noid/internal/errdefs"
)

// checkFreeSpace refuses an operation that adds data (what: "creating vm
// x", "checkpoint of x") when the filesystem holding the storage root or
// the database has less available than [storage] min_free keeps in
// reserve. Available is what unprivileged users may still write (df's
// Avail): what a guest can fill through its VMM.
func (m *Manager) checkFreeSpace(what string) error {
	minBytes, minPercent := m.cfg.MinFree()
	if minBytes == 0 && minPercent == 0 {
		return nil
	}
	dirs := []string{m.cfg.StorageDir()}
	if m.cfg.DataDir != m.cfg.StorageDir() {
		dirs = append(dirs, m.cfg.DataDir)
	}
	for _, dir := range dirs {
		var st unix.Statfs_t
		if err := unix.Statfs(dir, &st); err != nil {
			return fmt.Errorf("checking the free space of %s: %w", dir, err)
		}
		avail, total := int64(st.Bavail)*st.Bsize, int64(st.Blocks)*st.Bsize
		need, setting := minBytes, m.cfg.Storage.MinFree
		if minPercent > 0 {
			need = int64(float64(total) * minPercent / 100)
		}
		if setting == "" {
			setting = "the default"
		}
		if avail < need {
			return errdefs.WithHint(fmt.Errorf("%w: %s refused: the filesystem of %s has %s available, less than the %s that [storage] min_free (%s) keeps free",
				errdefs.ErrResourceExhausted, what, dir, humanBytes(avail), humanBytes(need), setting),
				"destroy VMs or delete checkpoints (`noid checkpoint rm`) to free space, or ask the admin to free space on the host or lower [storage] min_free")
		}
	}
	return nil
}

// humanBytes writes n like the config's sizes: 32G, 1.5G, 512M, 4K.
func humanBytes(n int64) string {
	for _, u := range []struct {
		unit  string
		bytes int64
	}{{"T", 1 << 40}, {"G", 1 << 30}, {"M", 1 << 20}, {"K", 1 << 10}} {
		if n >= u.bytes {
			s := strconv.FormatFloat(float64(n)/float64(u.bytes), 'f', 1, 64)
			return strings.TrimSuffix(s, ".0") + u.unit
		}
	}
	return strconv.FormatInt(n, 10) + "B"
}
