package network

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"time"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/noid-vm/noid/internal/errdefs"
	"github.com/noid-vm/noid/internal/lockfile"
)

// LockDir holds the locks that give each network namespace's noid network
// to one Manager: LockDir/net-<inode of the namespace>.lock (flock; see
// package lockfile).
//
// A Manager owns more than its bridge: the nftables tables named TableName
// and every interface whose name starts with TapPrefix are per namespace,
// and Setup and Reconcile rewrite them for their own bridge and VMs. A
// second Manager in the same namespace, even with another bridge and pool,
// would delete the first one's TAPs as orphans and replace its rules; so New
// refuses while another Manager (another noid-server) holds the namespace.
// Managers in different namespaces never meet, whatever their bridge names.
const LockDir = "/run/noid"

// claimWait bounds the wait for a lock whose holder has not yet written
// its pid.
const claimWait = 2 * time.Second

// claim takes the lock of the Manager's network namespace for its life.
func (m *Manager) claim(ctx context.Context) error {
	ino, err := nsInode(m.ns)
	if err != nil {
		return fmt.Errorf("identifying the network namespace: %w", err)
	}
	if err := os.MkdirAll(LockDir, 0o755); err != nil {
		return fmt.Errorf("creating %s: %w", LockDir, err)
	}
	path := filepath.Join(LockDir, fmt.Sprintf("net-%d.lock", ino))
	ctx, cancel := context.WithTimeout(ctx, claimWait)
	defer cancel()
	l, err := lockfile.Acquire(ctx, path, fmt.Sprintf("bridge %s pool %s", m.cfg.Bridge, m.cfg.Pool), 20*time.Millisecond,
		func(h *lockfile.HeldError) bool { return !h.Holder.Alive() })
	var held *lockfile.HeldError
	if errors.As(err, &held) {
		return m.cfg.claimedError(held)
	}
	if err != nil {
		return err
	}
	m.lock = l
	return nil
}

// claimedError explains why the namespace's noid network is not ours.
func (c Config) claimedError(held *lockfile.HeldError) error {
	var bridge, pool string
	fmt.Sscanf(held.Holder.Note, "bridge %s pool %s", &bridge, &pool)
	who := "another noid-server"
	if held.Holder.Alive() {
		who = fmt.Sprintf("noid-server pid %d", held.Holder.PID)
	}
	if bridge == c.Bridge {
		return errdefs.WithHint(fmt.Errorf("network: bridge %s is in use by %s (lock %s): %w", bridge, who, held.Path, errdefs.ErrConflict),
			"a second server on one bridge would take over the first one's VM interfaces and rules: stop the other server, or run this one in another network namespace or with [network] enabled = false")
	}
	overlap := ""
	if p, err := netip.ParsePrefix(pool); err == nil && p.Overlaps(c.Pool) {
		overlap = fmt.Sprintf(", and pool %s overlaps it", c.Pool)
	}
	return errdefs.WithHint(fmt.Errorf("network: this network namespace's noid network (bridge %s, pool %s) is in use by %s (lock %s)%s: %w",
		bridge, pool, who, held.Path, overlap, errdefs.ErrConflict),
		fmt.Sprintf("noid's nftables tables %q and its %s* interfaces are shared by every bridge of a network namespace, so two servers cannot share one: run this one in another network namespace, or with [network] enabled = false", TableName, TapPrefix))
}

// unclaim gives the namespace up (Close).
func (m *Manager) unclaim() error {
	if m.lock == nil {
		return nil
	}
	err := m.lock.Close()
	m.lock = nil
	return err
}

// nsInode identifies a network namespace: ns, or (when ns is not open)
// the calling thread's, which is where newHandle(ns) works.
func nsInode(ns netns.NsHandle) (uint64, error) {
	var st unix.Stat_t
	var err error
	if ns.IsOpen() {
		err = unix.Fstat(int(ns), &st)
	} else {
		err = unix.Stat("/proc/thread-self/ns/net", &st)
	}
	if err != nil {
		return 0, err
	}
	return st.Ino, nil
}
