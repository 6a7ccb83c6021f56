package network

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sort"
	"strings"
	"sync"

	"github.com/google/nftables"
	nlconn "github.com/mdlayher/netlink"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/noid-vm/noid/internal/errdefs"
	"github.com/noid-vm/noid/internal/lockfile"
)

// Option changes how New builds a Manager.
type Option func(*Manager)

// WithNetNS makes the Manager work in the network namespace ns instead of
// the caller's: every link, address, sysctl, nftables object and socket it
// creates lives there. Tests use it to stay off the host's real interfaces.
// The Manager does not take ownership of ns; keep it open until Close.
func WithNetNS(ns netns.NsHandle) Option {
	return func(m *Manager) { m.ns = ns }
}

// Manager owns noid's host-side network: the bridge, the VM TAPs and the
// nftables tables named TableName. It never changes objects it did not
// create. All methods are safe for concurrent use; mutations are
// serialized.
type Manager struct {
	cfg Config
	log *slog.Logger
	ns  netns.NsHandle

	// ensureLink creates (or finds) the VM's host interface and reports
	// whether it created it; tests replace it to attach veth pairs instead
	// of TAPs.
	ensureLink func(v VMNet) (created bool, err error)

	mu      sync.Mutex
	brIndex int // the bridge's ifindex as Setup found it (0: unknown)
	h       *netlink.Handle
	nft     *nftables.Conn
	ready   bool
	vms     map[string]vmState // by VM ID
	groups  map[string]uint32  // owner → peer group
	gcount  map[uint32]int     // peer group → VMs in it
	nextG   uint32
	nftBuf  int // the nftables socket's send and receive buffer (see nftSocketBuffer)
	dns     []*DNSServer
	closed  bool
	lock    *lockfile.Lock // the namespace's claim (see LockDir)
}

// New checks cfg (see Config.Validate; the route check runs in the
// Manager's namespace), claims the namespace's noid network for the
// Manager's life (see LockDir; another live Manager's claim is an
// errdefs.ErrConflict naming its pid) and returns a Manager for it. It
// changes nothing on the host; call Setup next.
func New(ctx context.Context, cfg Config, logger *slog.Logger, opts ...Option) (*Manager, error) {
	if err := cfg.validateStatic(); err != nil {
		return nil, err
	}
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	m := &Manager{
		cfg:    cfg.WithDefaults(),
		log:    logger.With("component", "network"),
		ns:     nsNone(),
		vms:    map[string]vmState{},
		groups: map[string]uint32{},
		gcount: map[uint32]int{},
		nftBuf: nftSocketBuffer,
	}
	for _, o := range opts {
		o(m)
	}
	m.ensureLink = m.ensureTap
	h, err := newHandle(m.ns)
	if err != nil {
		return nil, err
	}
	m.h = h
	if err := m.claim(ctx); err != nil {
		h.Close()
		return nil, err
	}
	if err := m.cfg.checkRoutes(h); err != nil {
		h.Close()
		m.unclaim()
		return nil, err
	}
	if err := m.dialNFT(); err != nil {
		h.Close()
		m.unclaim()
		return nil, err
	}
	return m, nil
}

// nftSocketBuffer is the send and receive buffer noid asks for on its
// nftables socket. A batch goes to the kernel in one sendmsg, refused
// whole when it is larger than the send buffer (by default
// net.core.wmem_default, about 208 KiB): rebuilding the sets of thousands
// of VMs at start-up takes a few MiB. It is a limit, not an allocation.
const nftSocketBuffer = 32 << 20

func (m *Manager) dialNFT() error {
	opts := []nftables.ConnOption{nftables.AsLasting(), nftables.WithSockOptions(func(c *nlconn.Conn) error {
		if err := setSocketBuffers(c, m.nftBuf); err != nil {
			// Not fatal: small batches (one VM's) fit any buffer.
			m.log.Warn("nftables: cannot enlarge the socket buffers; rebuilding the sets of many VMs at once may fail", "bytes", m.nftBuf, "err", err)
		}
		return nil
	})}
	if m.ns.IsOpen() {
		opts = append(opts, nftables.WithNetNSFd(int(m.ns)))
	}
	c, err := nftables.New(opts...)
	if err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	m.nft = c
	return nil
}

// setSocketBuffers sets c's send and receive buffers to size bytes, past
// net.core.[wr]mem_max where the process may (CAP_NET_ADMIN), else up to it.
func setSocketBuffers(c *nlconn.Conn, size int) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var errs []error
	err = rc.Control(func(fd uintptr) {
		for _, o := range [][2]int{{unix.SO_SNDBUFFORCE, unix.SO_SNDBUF}, {unix.SO_RCVBUFFORCE, unix.SO_RCVBUF}} {
			if unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, o[0], size) == nil {
				continue
			}
			if err := unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, o[1], size); err != nil {
				errs = append(errs, err)
			}
		}
	})
	return errors.Join(append(errs, err)...)
}

// flush sends the queued nftables batch. After a failure the connection is
// replaced, because a lasting connection may hold unread acknowledgements.
func (m *Manager) flush() error {
	err := m.nft.Flush()
	if err != nil {
		_ = m.nft.CloseLasting()
		if derr := m.dialNFT(); derr != nil {
			m.log.Error("redial nftables", "err", derr)
		}
	}
	return err
}

// Config returns the effective configuration (defaults applied).
func (m *Manager) Config() Config { return m.cfg }

// checkRoutes refuses a pool that overlaps a route of the namespace h
// works in, other than the default route and routes through c.Bridge.
func (c Config) checkRoutes(h *netlink.Handle) error {
	brIndex := -1
	if l, err := h.LinkByName(c.Bridge); err == nil {
		brIndex = l.Attrs().Index
	}
	routes, err := h.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: unix.RT_TABLE_UNSPEC}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return fmt.Errorf("list routes: %w", err)
	}
	for _, r := range routes {
		if r.Dst == nil || r.LinkIndex == brIndex && brIndex > 0 {
			continue
		}
		ones, _ := r.Dst.Mask.Size()
		if ones == 0 {
			continue
		}
		a, ok := netip.AddrFromSlice(r.Dst.IP.To4())
		if !ok {
			continue
		}
		dst := netip.PrefixFrom(a, ones).Masked()
		if dst.Overlaps(c.Pool) {
			return fmt.Errorf("network config: pool %s overlaps the host route %s: choose another pool: %w",
				c.Pool, describeRoute(h, r, dst), errdefs.ErrInvalidArgument)
		}
	}
	return nil
}

func describeRoute(h *netlink.Handle, r netlink.Route, dst netip.Prefix) string {
	var b strings.Builder
	switch r.Type {
	case unix.RTN_LOCAL:
		b.WriteString("local ")
	case unix.RTN_BROADCAST:
		b.WriteString("broadcast ")
	}
	b.WriteString(dst.String())
	if r.Gw != nil {
		fmt.Fprintf(&b, " via %s", r.Gw)
	}
	if l, err := h.LinkByIndex(r.LinkIndex); err == nil {
		fmt.Fprintf(&b, " dev %s", l.Attrs().Name)
	}
	switch r.Table {
	case unix.RT_TABLE_MAIN, 0:
	case unix.RT_TABLE_LOCAL:
		b.WriteString(" table local")
	default:
		fmt.Fprintf(&b, " table %d", r.Table)
	}
	return b.String()
}

// bridgeMAC is a fixed, locally administered MAC for the bridge. Without
// it a bridge takes the lowest MAC of its ports, so the gateway's MAC
// would change as VMs come and go and break the VMs' ARP caches.
func bridgeMAC(name string) net.HardwareAddr {
	m := MACFor("bridge:" + name)
	return m
}

// Setup makes the host ready for VMs, idempotently: it creates the bridge
// (fixed MAC, gateway address/prefix, up), enables IPv4 forwarding, and
// installs or refreshes noid's nftables tables. Running it again converges
// to the same state; the per-VM set elements are kept, so running VMs keep
// their connectivity. Objects of anyone else are not touched.
func (m *Manager) Setup(ctx context.Context) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.usable(ctx); err != nil {
		return err
	}
	br, err := m.ensureBridge()
	if err != nil {
		return err
	}
	m.brIndex = br.Attrs().Index
	if err := inNS(m.ns, func() error {
		return os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("1\n"), 0o644)
	}); err != nil {
		return fmt.Errorf("enable ip_forward: %w", err)
	}
	if err := m.installRuleset(); err != nil {
		return err
	}
	m.ready = true
	m.log.Info("network ready", "bridge", m.cfg.Bridge, "gateway", m.cfg.Gateway(), "pool", m.cfg.Pool)
	return nil
}

func (m *Manager) usable(ctx context.Context) error {
	if m.closed {
		return fmt.Errorf("network manager is closed: %w", errdefs.ErrUnavailable)
	}
	return ctx.Err()
}

func (m *Manager) ensureBridge() (netlink.Link, error) {
	name := m.cfg.Bridge
	l, err := m.h.LinkByName(name)
	if err != nil {
		var nf netlink.LinkNotFoundError
		if !errors.As(err, &nf) {
			return nil, fmt.Errorf("look up bridge %s: %w", name, err)
		}
		br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: name, HardwareAddr: bridgeMAC(name)}}
		if err := m.h.LinkAdd(br); err != nil && !errors.Is(err, unix.EEXIST) {
			return nil, fmt.Errorf("create bridge %s: %w", name, err)
		}
		if l, err = m.h.LinkByName(name); err != nil {
			return nil, fmt.Errorf("look up bridge %s: %w", name, err)
		}
	}
	if l.Type() != "bridge" {
		return nil, fmt.Errorf("%s exists and is a %s, not a bridge: %w", name, l.Type(), errdefs.ErrConflict)
	}
	gw := &netlink.Addr{IPNet: &net.IPNet{IP: net.IP(keyIP(m.cfg.Gateway())), Mask: net.CIDRMask(m.cfg.PrefixLen(), 32)}}
	addrs, err := m.h.AddrList(l, netlink.FAMILY_V4)
	if err != nil {
		return nil, fmt.Errorf("list addresses of %s: %w", name, err)
	}
	have := false
	for _, a := range addrs {
		if a.IPNet.String() == gw.IPNet.String() {
			have = true
			continue
		}
		// Our bridge carries only the gateway; a leftover from an earlier
		// pool would keep routing the old range here.
		if err := m.h.AddrDel(l, &a); err != nil {
			return nil, fmt.Errorf("remove stale address %s from %s: %w", a.IPNet, name, err)
		}
		m.log.Info("removed stale bridge address", "addr", a.IPNet.String())
	}
	if !have {
		if err := m.h.AddrAdd(l, gw); err != nil && !errors.Is(err, unix.EEXIST) {
			return nil, fmt.Errorf("add %s to %s: %w", gw.IPNet, name, err)
		}
	}
	if err := m.h.LinkSetUp(l); err != nil {
		return nil, fmt.Errorf("set %s up: %w", name, err)
	}
	return l, nil
}

// installRuleset refreshes the tables in place; if the kernel refuses
// (an incompatible object from another noid version), it recreates them
// and re-adds every known VM, all in one atomic batch.
func (m *Manager) installRuleset() error {
	if err := m.queueRuleset(m.nft, false); err != nil {
		return err
	}
	err := m.flush()
	if err == nil {
		return nil
	}
	m.log.Warn("nftables: in-place refresh refused, recreating noid tables", "err", err)
	if err := m.queueRuleset(m.nft, true); err != nil {
		return err
	}
	if err := m.queueVMs(m.nft, m.sortedVMs()); err != nil {
		return err
	}
	if err := m.flush(); err != nil {
		return fmt.Errorf("install nftables ruleset: %w", err)
	}
	return nil
}

// vmState is a VM the Manager has installed, with the peer group its set
// elements carry (0: none).
type vmState struct {
	v     VMNet
	group uint32
}

func (m *Manager) sortedVMs() []vmState {
	out := make([]vmState, 0, len(m.vms))
	for _, st := range m.vms {
		out = append(out, st)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].v.ID < out[j].v.ID })
	return out
}

// allowed reports whether v takes part in its owner's peer group.
func (m *Manager) allowed(v VMNet) bool {
	return v.Owner != "" && (v.AllowPeers || m.cfg.AllowSameUser)
}

// ensureTap is the production ensureLink: it creates the VM's TAP unless
// a TAP of that name exists.
func (m *Manager) ensureTap(v VMNet) (bool, error) {
	l, err := m.h.LinkByName(v.TapName)
	if err == nil {
		if t, ok := l.(*netlink.Tuntap); ok && t.Mode == netlink.TUNTAP_MODE_TAP {
			return false, nil
		}
		return false, fmt.Errorf("%s exists and is a %s, not a TAP: %w", v.TapName, l.Type(), errdefs.ErrConflict)
	}
	var nf netlink.LinkNotFoundError
	if !errors.As(err, &nf) {
		return false, fmt.Errorf("look up %s: %w", v.TapName, err)
	}
	if err := inNS(m.ns, func() error { return createTap(v.TapName, v.TapUID, v.TapGID) }); err != nil {
		return false, err
	}
	return true, nil
}

// bridgeIndex returns the bridge's ifindex, looking it up again when
// refresh is set or Setup did not record it (someone may have deleted and
// recreated the bridge).
func (m *Manager) bridgeIndex(refresh bool) (int, error) {
	if m.brIndex > 0 && !refresh {
		return m.brIndex, nil
	}
	br, err := m.h.LinkByName(m.cfg.Bridge)
	if err != nil {
		return 0, fmt.Errorf("look up bridge %s: %w", m.cfg.Bridge, err)
	}
	m.brIndex = br.Attrs().Index
	return m.brIndex, nil
}

// plugLink enslaves the VM's link to the bridge, sets its port isolation
// (isolated unless it is in a peer group) and brings it up.
func (m *Manager) plugLink(v VMNet, isolated bool) error {
	l, err := m.h.LinkByName(v.TapName)
	if err != nil {
		return fmt.Errorf("look up %s: %w", v.TapName, err)
	}
	br, err := m.bridgeIndex(false)
	if err != nil {
		return err
	}
	if l.Attrs().MasterIndex != br {
		if err := m.h.LinkSetMasterByIndex(l, br); err != nil {
			// The recorded index may be stale; look the bridge up once more.
			br2, lerr := m.bridgeIndex(true)
			if lerr != nil || br2 == br {
				return fmt.Errorf("enslave %s to %s: %w", v.TapName, m.cfg.Bridge, err)
			}
			if err := m.h.LinkSetMasterByIndex(l, br2); err != nil {
				return fmt.Errorf("enslave %s to %s: %w", v.TapName, m.cfg.Bridge, err)
			}
		}
	}
	// Bridge port isolation: an isolated port cannot exchange frames with
	// another isolated port, whatever nftables says. VMs outside every peer
	// group are isolated, so even with noid's tables flushed by someone
	// else they cannot reach each other.
	if err := m.h.LinkSetIsolated(l, isolated); err != nil {
		return fmt.Errorf("set isolation of %s: %w", v.TapName, err)
	}
	if l.Attrs().Flags&net.FlagUp == 0 {
		if err := m.h.LinkSetUp(l); err != nil {
			return fmt.Errorf("set %s up: %w", v.TapName, err)
		}
	}
	return nil
}
