package network

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/noid-vm/noid/internal/errdefs"
)

// groupFor returns v's peer group, allocating one for a new owner, or 0
// when v takes part in no peer group. A group allocated here but never
// retained is dropped by dropEmptyGroup.
func (m *Manager) groupFor(v VMNet) uint32 {
	if !m.allowed(v) {
		return 0
	}
	g, ok := m.groups[v.Owner]
	if !ok {
		m.nextG++
		g = m.nextG
		m.groups[v.Owner] = g
	}
	return g
}

func (m *Manager) dropEmptyGroup(owner string) {
	if g, ok := m.groups[owner]; ok && m.gcount[g] <= 0 {
		delete(m.groups, owner)
		delete(m.gcount, g)
	}
}

func (m *Manager) retain(v VMNet, g uint32) {
	if g != 0 {
		m.gcount[g]++
	}
	m.vms[v.ID] = vmState{v: v, group: g}
}

func (m *Manager) release(st vmState) {
	delete(m.vms, st.v.ID)
	if st.group != 0 {
		m.gcount[st.group]--
		m.dropEmptyGroup(st.v.Owner)
	}
}

// conflict reports another installed VM that uses v's IP, MAC or TAP name.
func conflictWith(v VMNet, others map[string]vmState) error {
	for _, st := range others {
		o := st.v
		if o.ID == v.ID {
			continue
		}
		switch {
		case o.IP == v.IP:
			return fmt.Errorf("vm %q: IP %s is used by vm %q: %w", v.ID, v.IP, o.ID, errdefs.ErrConflict)
		case bytes.Equal(o.MAC, v.MAC):
			return fmt.Errorf("vm %q: MAC %s is used by vm %q: %w", v.ID, v.MAC, o.ID, errdefs.ErrConflict)
		case o.TapName == v.TapName:
			return fmt.Errorf("vm %q: interface %s is used by vm %q: %w", v.ID, v.TapName, o.ID, errdefs.ErrConflict)
		}
	}
	return nil
}

func isNotFound(err error) bool {
	var nf netlink.LinkNotFoundError
	return errors.As(err, &nf)
}

// AddVM gives a VM its host side: the TAP (persistent, root-owned unless
// TapUID/TapGID say otherwise, single queue, vnet_hdr, ready for QEMU's
// `-netdev tap,ifname=<TapName>,script=no,downscript=no`), enslaved to the
// bridge, isolated unless the VM is in a peer group, and up; plus its
// anti-spoofing and peer set elements, in one atomic nftables batch.
//
// It is idempotent: calling it again with the same VMNet re-applies it, and
// with a changed VMNet (a new IP or MAC, another owner or AllowPeers) it
// replaces the VM's elements atomically. A failure leaves nothing
// half-created. It returns errdefs.ErrConflict if another VM uses the same
// IP, MAC or TAP name, errdefs.ErrInvalidArgument for a bad VMNet and
// errdefs.ErrUnavailable before Setup.
func (m *Manager) AddVM(ctx context.Context, v VMNet) error {
	v, err := m.cfg.NormalizeVM(v)
	if err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.usable(ctx); err != nil {
		return err
	}
	if !m.ready {
		return fmt.Errorf("network: AddVM before Setup: %w", errdefs.ErrUnavailable)
	}
	if err := conflictWith(v, m.vms); err != nil {
		return err
	}
	old, had := m.vms[v.ID]
	if had && old.v.TapName != v.TapName {
		if err := m.removeLocked(v.ID); err != nil {
			return err
		}
		had = false
	}

	created, err := m.ensureLink(v)
	if err != nil {
		return err
	}
	g := m.groupFor(v)
	fail := func(err error) error {
		if created {
			if l, lerr := m.h.LinkByName(v.TapName); lerr == nil {
				_ = m.h.LinkDel(l)
			}
		}
		m.dropEmptyGroup(v.Owner)
		return err
	}
	if err := m.plugLink(v, g == 0); err != nil {
		return fail(err)
	}
	if had {
		if err := m.queueElements(m.nft, elementsFor(old.v, old.group), false); err != nil {
			return fail(err)
		}
	}
	if err := m.queueElements(m.nft, elementsFor(v, g), true); err != nil {
		return fail(err)
	}
	if err := m.flush(); err != nil {
		// Nothing of the batch was applied. The kernel's elements may differ
		// from what we recorded (someone edited the sets): purge whatever
		// belongs to this VM and try once more.
		if perr := m.purgeElements(v.TapName, old.v.IP); perr != nil {
			return fail(fmt.Errorf("vm %q: install nftables elements: %w", v.ID, errors.Join(err, perr)))
		}
		if err := m.queueElements(m.nft, elementsFor(v, g), true); err != nil {
			return fail(err)
		}
		if err := m.flush(); err != nil {
			return fail(fmt.Errorf("vm %q: install nftables elements: %w", v.ID, err))
		}
	}
	if had && old.group != 0 {
		m.gcount[old.group]--
	}
	m.retain(v, g) // replaces old's entry
	if had && old.group != 0 {
		m.dropEmptyGroup(old.v.Owner)
	}
	if !had || old.v.IP != v.IP || !bytes.Equal(old.v.MAC, v.MAC) {
		// The address may have belonged to a VM destroyed a moment ago: the
		// host would keep sending to that VM's MAC until its entry goes
		// stale and is probed again (seconds), so a new VM or clone on the
		// address would be unreachable from the host meanwhile.
		m.forgetNeighbour(v.IP)
	}
	m.log.Debug("vm network added", "vm", v.ID, "tap", v.TapName, "ip", v.IP, "mac", v.MAC.String(), "peer_group", g)
	return nil
}

// PrepareTap creates the TAP a VM with this id will use, without plugging
// it into the bridge or adding any rule, so a VMM can be started ahead of
// time (a warm spare). AddVM later plugs it in and allows its traffic;
// RemoveVM deletes it. It returns the TAP's name.
func (m *Manager) PrepareTap(ctx context.Context, id string) (string, error) {
	if id == "" {
		return "", fmt.Errorf("network: empty vm id: %w", errdefs.ErrInvalidArgument)
	}
	v := VMNet{ID: id, TapName: TapName(id)}
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.usable(ctx); err != nil {
		return "", err
	}
	if _, err := m.ensureLink(v); err != nil {
		return "", err
	}
	return v.TapName, nil
}

// RemoveVM deletes the VM's TAP and set elements. It is idempotent: an
// unknown id, or a VM whose TAP is already gone, is not an error. For a VM
// the Manager does not know (the server restarted and has not called
// Reconcile) it removes the interface named TapName(id) and every set
// element of that interface and its address.
func (m *Manager) RemoveVM(ctx context.Context, id string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.usable(ctx); err != nil {
		return err
	}
	return m.removeLocked(id)
}

func (m *Manager) removeLocked(id string) error {
	st, known := m.vms[id]
	tap := TapName(id)
	if known {
		tap = st.v.TapName
	}
	var errs []error
	if l, err := m.h.LinkByName(tap); err == nil {
		if err := m.h.LinkDel(l); err != nil && !errors.Is(err, unix.ENODEV) {
			errs = append(errs, fmt.Errorf("delete %s: %w", tap, err))
		}
	} else if !isNotFound(err) {
		errs = append(errs, fmt.Errorf("look up %s: %w", tap, err))
	}
	if known {
		m.forgetNeighbour(st.v.IP)
		if err := m.queueElements(m.nft, elementsFor(st.v, st.group), false); err != nil {
			errs = append(errs, err)
		} else if err := m.flush(); err != nil {
			// Someone else changed the sets; fall back to searching them.
			if err := m.purgeElements(tap, st.v.IP); err != nil {
				errs = append(errs, err)
			}
		}
		m.release(st)
	} else if exists, err := m.tablesExist(); err != nil {
		errs = append(errs, err)
	} else if exists {
		if err := m.purgeElements(tap, netip.Addr{}); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("remove vm %q network: %w", id, err)
	}
	m.log.Debug("vm network removed", "vm", id, "tap", tap)
	return nil
}

// forgetNeighbour deletes the bridge's neighbour (ARP) entry for ip, if
// any. It is best effort, like forgetNeighbours.
func (m *Manager) forgetNeighbour(ip netip.Addr) {
	br, err := m.bridgeIndex(false)
	if err != nil {
		return
	}
	n := &netlink.Neigh{LinkIndex: br, Family: netlink.FAMILY_V4, IP: ip.AsSlice()}
	if err := m.h.NeighDel(n); err != nil && !errors.Is(err, unix.ENOENT) {
		m.log.Warn("deleting stale neighbour", "ip", ip, "err", err)
	}
}

// forgetNeighbours deletes the bridge's neighbour (ARP) entries for the
// addresses in want whose MAC is not the one given (a nil MAC matches
// none: the entry goes). With all set, every entry for an address of the
// pool that is not in want goes too. It is best effort: a failure only
// means the kernel re-learns the entry the slow way.
func (m *Manager) forgetNeighbours(want map[netip.Addr]net.HardwareAddr, all bool) {
	br, err := m.h.LinkByName(m.cfg.Bridge)
	if err != nil {
		return
	}
	neighs, err := m.h.NeighList(br.Attrs().Index, netlink.FAMILY_V4)
	if err != nil {
		m.log.Warn("listing neighbours", "bridge", m.cfg.Bridge, "err", err)
		return
	}
	for _, n := range neighs {
		ip, ok := netip.AddrFromSlice(n.IP.To4())
		if !ok {
			continue
		}
		mac, listed := want[ip]
		if !listed && !(all && m.cfg.Pool.Contains(ip)) || listed && mac != nil && bytes.Equal(mac, n.HardwareAddr) {
			continue
		}
		if err := m.h.NeighDel(&n); err != nil && !errors.Is(err, unix.ENOENT) {
			m.log.Warn("deleting stale neighbour", "ip", ip, "mac", n.HardwareAddr.String(), "err", err)
			continue
		}
		m.log.Debug("forgot stale neighbour", "ip", ip, "mac", n.HardwareAddr.String())
	}
}

// tablesExist reports whether noid's tables are installed.
func (m *Manager) tablesExist() (bool, error) {
	tables, err := m.nft.ListTables()
	if err != nil {
		return false, fmt.Errorf("list nftables tables: %w", err)
	}
	n := 0
	for _, t := range tables {
		if t.Name == TableName && (t.Family == nftables.TableFamilyBridge || t.Family == nftables.TableFamilyINet) {
			n++
		}
	}
	return n == 2, nil
}

// purgeElements reads noid's sets from the kernel and deletes, in one
// batch, every element of interface tap and of address ip (and of the
// addresses the kernel has recorded for tap). An invalid ip matches
// nothing by itself.
func (m *Manager) purgeElements(tap string, ip netip.Addr) error {
	brMAC, brIP, brGroup, brMember, inGroup, inMember := m.sets()
	ifn := keyIfname(tap)
	ips := map[netip.Addr]bool{}
	if ip.IsValid() {
		ips[ip] = true
	}
	type sel struct {
		s     *nftables.Set
		match func(k []byte) bool
	}
	byIf := func(off int) func([]byte) bool {
		return func(k []byte) bool { return len(k) >= off+16 && bytes.Equal(k[off:off+16], ifn) }
	}
	byIP := func(off int) func([]byte) bool {
		return func(k []byte) bool {
			if len(k) < off+4 {
				return false
			}
			return ips[netip.AddrFrom4([4]byte(k[off:off+4]))]
		}
	}
	// vm_ip first: it tells which addresses belong to tap.
	if els, err := m.nft.GetSetElements(brIP); err == nil {
		for _, e := range els {
			if byIf(0)(e.Key) && len(e.Key) >= 20 {
				ips[netip.AddrFrom4([4]byte(e.Key[16:20]))] = true
			}
		}
	} else {
		return fmt.Errorf("read set %s: %w", setVMIP, err)
	}
	queued := 0
	for _, x := range []sel{{brMAC, byIf(0)}, {brIP, byIf(0)}, {brGroup, byIf(0)}, {brMember, byIf(4)}, {inGroup, byIP(0)}, {inMember, byIP(4)}} {
		els, err := m.nft.GetSetElements(x.s)
		if err != nil {
			return fmt.Errorf("read set %s: %w", x.s.Name, err)
		}
		var del []nftables.SetElement
		for _, e := range els {
			if x.match(e.Key) {
				del = append(del, nftables.SetElement{Key: e.Key})
			}
		}
		if len(del) > 0 {
			if err := m.nft.SetDeleteElements(x.s, del); err != nil {
				return err
			}
			queued += len(del)
		}
	}
	if queued == 0 {
		return nil
	}
	if err := m.flush(); err != nil {
		return fmt.Errorf("delete set elements of %s: %w", tap, err)
	}
	return nil
}

// Reconcile makes the host match want, for server start-up (after Setup)
// or any time the caller suspects drift: every wanted VM gets its TAP
// (created if missing), bridge port and set elements; every interface
// whose name starts with TapPrefix that no wanted VM uses is deleted, and
// every other set element is dropped. The sets are rebuilt in one atomic
// batch, so wanted VMs never lose connectivity; if the kernel refuses it,
// one VM at a time (see rebuildSets), never leaving the last process's
// elements in force. Interfaces without the prefix and nftables tables
// other than noid's are left alone.
//
// A wanted VM that is invalid or conflicts with an earlier entry is
// skipped; its error is part of the returned error, and the rest is still
// applied.
func (m *Manager) Reconcile(ctx context.Context, want []VMNet) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.usable(ctx); err != nil {
		return err
	}
	if !m.ready {
		return fmt.Errorf("network: Reconcile before Setup: %w", errdefs.ErrUnavailable)
	}
	var errs []error
	next := map[string]vmState{}
	wanted := map[string]bool{}
	var keep []VMNet
	for _, v := range want {
		nv, err := m.cfg.NormalizeVM(v)
		if err == nil {
			if _, dup := next[nv.ID]; dup {
				err = fmt.Errorf("vm %q listed twice: %w", nv.ID, errdefs.ErrInvalidArgument)
			} else {
				err = conflictWith(nv, next)
			}
		}
		if err != nil {
			errs = append(errs, err)
			continue
		}
		next[nv.ID] = vmState{v: nv}
		wanted[nv.TapName] = true
		keep = append(keep, nv)
	}

	// Orphans first, so a wanted VM can reuse a name an orphan had.
	links, err := m.h.LinkList()
	if err != nil {
		return fmt.Errorf("list links: %w", err)
	}
	for _, l := range links {
		name := l.Attrs().Name
		if !strings.HasPrefix(name, TapPrefix) || wanted[name] {
			continue
		}
		if err := m.h.LinkDel(l); err != nil && !errors.Is(err, unix.ENODEV) {
			errs = append(errs, fmt.Errorf("delete orphan %s: %w", name, err))
			continue
		}
		m.log.Info("removed orphan interface", "tap", name)
	}

	m.vms = map[string]vmState{}
	m.groups = map[string]uint32{}
	m.gcount = map[uint32]int{}
	var states []vmState
	for _, v := range keep {
		if _, err := m.ensureLink(v); err != nil {
			errs = append(errs, fmt.Errorf("vm %q: %w", v.ID, err))
			continue
		}
		g := m.groupFor(v)
		if err := m.plugLink(v, g == 0); err != nil {
			m.dropEmptyGroup(v.Owner)
			errs = append(errs, fmt.Errorf("vm %q: %w", v.ID, err))
			continue
		}
		m.retain(v, g)
		states = append(states, vmState{v: v, group: g})
	}
	// The sets are rebuilt whole: an element of the last process must not
	// stay, least of all a peer group element, whose number this process
	// may have given to another owner.
	for _, s := range m.allSets() {
		m.nft.FlushSet(s)
	}
	if err := m.queueVMs(m.nft, states); err != nil {
		return errors.Join(append(errs, err)...)
	}
	if err := m.flush(); err != nil {
		m.log.Warn("nftables: rebuilding the sets in one batch failed, rebuilding them one VM at a time", "vms", len(states), "err", err)
		var ferr error
		states, ferr = m.rebuildSets(states)
		if ferr != nil {
			errs = append(errs, ferr)
		}
	}
	macs := map[netip.Addr]net.HardwareAddr{}
	for _, st := range states {
		macs[st.v.IP] = st.v.MAC
	}
	m.forgetNeighbours(macs, true)
	m.log.Info("network reconciled", "vms", len(states), "errors", len(errs))
	return errors.Join(errs...)
}

// rebuildSets is Reconcile's fallback when the kernel refuses the rebuild
// as one batch: it empties the sets, then adds the VMs one batch each. The
// VMs lose connectivity for a moment, but the sets end up as recorded. A
// VM whose elements the kernel refuses is forgotten (it keeps no network
// until it is added again); it returns the VMs installed. If the sets
// cannot even be emptied, elements of the last process may be left with
// peer group numbers that this process gives to other owners, so the
// Manager refuses AddVM (errdefs.ErrUnavailable) until Setup runs again.
func (m *Manager) rebuildSets(states []vmState) ([]vmState, error) {
	for _, s := range m.allSets() {
		m.nft.FlushSet(s)
	}
	if err := m.flush(); err != nil {
		m.ready = false
		return nil, fmt.Errorf("empty nftables sets: %w", err)
	}
	var errs []error
	kept := states[:0:0]
	for _, st := range states {
		err := m.queueElements(m.nft, elementsFor(st.v, st.group), true)
		if err == nil {
			err = m.flush()
		}
		if err != nil {
			m.release(st)
			errs = append(errs, fmt.Errorf("vm %q: install nftables elements: %w", st.v.ID, err))
			continue
		}
		kept = append(kept, st)
	}
	return kept, errors.Join(errs...)
}

// Close stops the DNS servers started with StartDNS, releases the
// Manager's netlink and nftables sockets and, last, its claim on the
// namespace. It leaves the bridge, TAPs and rules in place, so VMs keep
// their connectivity while the server restarts.
func (m *Manager) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil
	}
	m.closed = true
	var errs []error
	for _, d := range m.dns {
		errs = append(errs, d.Close())
	}
	m.dns = nil
	errs = append(errs, m.nft.CloseLasting())
	m.h.Close()
	errs = append(errs, m.unclaim())
	return errors.Join(errs...)
}

// Teardown removes everything noid created: every interface whose name
// starts with TapPrefix, the bridge and noid's two nftables tables; and it
// stops the DNS servers. It is for uninstall and tests. It leaves
// ip_forward as it is (other software may rely on it). The Manager can be
// set up again afterwards.
func (m *Manager) Teardown(ctx context.Context) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.usable(ctx); err != nil {
		return err
	}
	var errs []error
	for _, d := range m.dns {
		errs = append(errs, d.Close())
	}
	m.dns = nil
	links, err := m.h.LinkList()
	if err != nil {
		return fmt.Errorf("list links: %w", err)
	}
	for _, l := range links {
		if strings.HasPrefix(l.Attrs().Name, TapPrefix) || l.Attrs().Name == m.cfg.Bridge && l.Type() == "bridge" {
			if err := m.h.LinkDel(l); err != nil && !errors.Is(err, unix.ENODEV) {
				errs = append(errs, fmt.Errorf("delete %s: %w", l.Attrs().Name, err))
			}
		}
	}
	for _, t := range []*nftables.Table{m.bridgeTable(), m.inetTable()} {
		m.nft.AddTable(t)
		m.nft.DelTable(t)
	}
	if err := m.flush(); err != nil {
		errs = append(errs, fmt.Errorf("delete nftables tables: %w", err))
	}
	m.ready = false
	m.brIndex = 0
	m.vms = map[string]vmState{}
	m.groups = map[string]uint32{}
	m.gcount = map[uint32]int{}
	return errors.Join(errs...)
}
