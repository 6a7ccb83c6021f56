package network

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"math"
	"net"
	"net/netip"
	"strings"

	"github.com/noid-vm/noid/internal/errdefs"
)

// Names and defaults shared by every Manager.
const (
	// DefaultBridge is the bridge used when Config.Bridge is empty.
	DefaultBridge = "noid0"
	// DefaultDNSPort is the port the DNS server listens on and the only port
	// of the gateway that VMs may reach.
	DefaultDNSPort = 53
	// TapPrefix starts the name of every VM interface noid creates. Reconcile
	// and Teardown treat every link whose name starts with it as noid's own,
	// and the nftables rules match VM ports by it.
	TapPrefix = "noid-"
	// TableName is the name of noid's nftables tables (one "inet", one
	// "bridge"). noid never reads or changes any other table.
	TableName = "noid"
	// maxIfName is the longest interface name Linux accepts (IFNAMSIZ-1).
	maxIfName = 15
)

// DefaultPool is the address pool used when Config.Pool is the zero value.
var DefaultPool = netip.MustParsePrefix("172.16.0.0/16")

// DefaultBlockedNets are destinations VMs may never reach through the host:
// link-local (which holds the 169.254.169.254 cloud metadata service of AWS,
// GCP, Azure, OpenStack and others), Alibaba's metadata address, Oracle's
// legacy metadata address and Azure's WireServer. Config.BlockedNets adds to
// this list.
var DefaultBlockedNets = []netip.Prefix{
	netip.MustParsePrefix("169.254.0.0/16"),
	netip.MustParsePrefix("100.100.100.200/32"),
	netip.MustParsePrefix("192.0.0.192/32"),
	netip.MustParsePrefix("168.63.129.16/32"),
}

// DefaultPrivateNets are the private ranges VMs may not reach unless
// Config.AllowedNets opens part of them: RFC 1918 (10/8, 172.16/12,
// 192.168/16, where LANs and internal services live) and RFC 6598 (100.64/10,
// carrier-grade NAT and the tailnets of VPNs). The pool's own range is not
// affected: VM-to-VM traffic never leaves the bridge and has its own rules,
// and the gateway (DNS and GatewayTCPPorts) is the host itself. Link-local
// is in DefaultBlockedNets, which AllowedNets cannot open.
var DefaultPrivateNets = []netip.Prefix{
	netip.MustParsePrefix("10.0.0.0/8"),
	netip.MustParsePrefix("172.16.0.0/12"),
	netip.MustParsePrefix("192.168.0.0/16"),
	netip.MustParsePrefix("100.64.0.0/10"),
}

// Config is the host-side network configuration of noid-server.
//
// The zero value of every field means its default; call WithDefaults to
// see the effective values.
type Config struct {
	// Bridge is the name of the bridge every TAP is enslaved to; default
	// "noid0". It must not start with TapPrefix.
	Bridge string
	// Pool is the IPv4 network VMs get addresses from; default
	// 172.16.0.0/16. The first host address (172.16.0.1) is the gateway and
	// lives on the bridge; NthHost numbers the rest.
	Pool netip.Prefix
	// AllowSameUser lets every VM talk to every other VM of the same owner,
	// as if each had VMNet.AllowPeers set. VMs of different owners can never
	// talk to each other.
	AllowSameUser bool
	// DNSPort is the gateway port VMs may reach for DNS (UDP and TCP);
	// default 53. Tests use a high port.
	DNSPort uint16
	// BlockedNets are extra destinations VMs may not reach, on top of
	// DefaultBlockedNets.
	BlockedNets []netip.Prefix
	// AllowedNets are destinations inside DefaultPrivateNets that VMs may
	// reach (a LAN package mirror, or a whole range). Default none: every
	// private range is closed. They cannot open DefaultBlockedNets or
	// BlockedNets, which are checked first.
	AllowedNets []netip.Prefix
	// GatewayTCPPorts are extra TCP ports of the gateway address that VMs
	// may connect to, for host services meant for VMs (a package cache, a
	// test server). Default none: VMs reach only DNS on the host.
	GatewayTCPPorts []uint16
}

// WithDefaults returns c with every unset field set to its default.
func (c Config) WithDefaults() Config {
	if c.Bridge == "" {
		c.Bridge = DefaultBridge
	}
	if !c.Pool.IsValid() {
		c.Pool = DefaultPool
	}
	if c.DNSPort == 0 {
		c.DNSPort = DefaultDNSPort
	}
	return c
}

// Validate checks c (with defaults applied) on its own, and then checks that
// the pool overlaps no route of the network namespace the caller runs in
// (other than the routes of c.Bridge itself, which Setup creates, and the
// default route). The error wraps errdefs.ErrInvalidArgument and names the
// conflicting route.
func (c Config) Validate() error {
	if err := c.validateStatic(); err != nil {
		return err
	}
	h, err := newHandle(nsNone())
	if err != nil {
		return err
	}
	defer h.Close()
	return c.WithDefaults().checkRoutes(h)
}

// validateStatic checks everything that does not depend on the host.
func (c Config) validateStatic() error {
	c = c.WithDefaults()
	bad := func(format string, a ...any) error {
		return fmt.Errorf("network config: "+format+": %w", append(a, errdefs.ErrInvalidArgument)...)
	}
	if len(c.Bridge) > maxIfName || !validIfName(c.Bridge) {
		return bad("bridge name %q is not a valid interface name (1-15 of [A-Za-z0-9_.-])", c.Bridge)
	}
	if strings.HasPrefix(c.Bridge, TapPrefix) {
		return bad("bridge name %q must not start with %q, which is reserved for VM interfaces", c.Bridge, TapPrefix)
	}
	p := c.Pool
	if !p.Addr().Is4() {
		return bad("pool %s is not an IPv4 prefix", p)
	}
	if p.Masked() != p {
		return bad("pool %s has host bits set; did you mean %s?", p, p.Masked())
	}
	if p.Bits() < 8 || p.Bits() > 29 {
		return bad("pool %s must have a prefix length between /8 and /29", p)
	}
	if !privatePools.containsPrefix(p) {
		return bad("pool %s is not inside a private range (10/8, 172.16/12, 192.168/16, 100.64/10 or 198.18/15)", p)
	}
	for _, b := range c.blockedNets() {
		if b.Overlaps(p) {
			return bad("pool %s overlaps blocked range %s", p, b)
		}
	}
	for _, a := range c.AllowedNets {
		if !a.IsValid() || !a.Addr().Is4() {
			return bad("allowed net %s is not an IPv4 prefix", a)
		}
	}
	return nil
}

type prefixList []netip.Prefix

// privatePools are the ranges a pool may come from: RFC 1918, RFC 6598
// (carrier-grade NAT) and RFC 2544 (benchmarking).
var privatePools = prefixList{
	netip.MustParsePrefix("10.0.0.0/8"),
	netip.MustParsePrefix("172.16.0.0/12"),
	netip.MustParsePrefix("192.168.0.0/16"),
	netip.MustParsePrefix("100.64.0.0/10"),
	netip.MustParsePrefix("198.18.0.0/15"),
}

func (l prefixList) containsPrefix(p netip.Prefix) bool {
	for _, q := range l {
		if q.Bits() <= p.Bits() && q.Contains(p.Addr()) {
			return true
		}
	}
	return false
}

func (c Config) blockedNets() []netip.Prefix {
	out := append([]netip.Prefix(nil), DefaultBlockedNets...)
	for _, b := range c.BlockedNets {
		if b.IsValid() && b.Addr().Is4() {
			out = append(out, b.Masked())
		}
	}
	return out
}

// allowedNets are the AllowedNets, masked.
func (c Config) allowedNets() []netip.Prefix {
	var out []netip.Prefix
	for _, a := range c.AllowedNets {
		if a.IsValid() && a.Addr().Is4() {
			out = append(out, a.Masked())
		}
	}
	return out
}

// Gateway is the host's address on the bridge: the first host address of
// the pool. VMs use it as their default route and DNS server.
func (c Config) Gateway() netip.Addr {
	return c.WithDefaults().Pool.Addr().Next()
}

// PrefixLen is the pool's prefix length, which is also the VMs' netmask.
func (c Config) PrefixLen() int {
	return c.WithDefaults().Pool.Bits()
}

// PoolSize is the number of VM addresses in the pool: every address but
// the network address, the gateway and the broadcast address. Valid
// indexes for NthHost are 0 … PoolSize()-1.
func (c Config) PoolSize() int {
	bits := 32 - c.PrefixLen()
	if bits < 2 {
		return 0
	}
	return 1<<bits - 3
}

// NthHost returns the n-th VM address of the pool (n counts from 0, which
// is the address after the gateway), and false if n is out of range. The
// store allocates addresses by picking the smallest n not in use inside its
// transaction.
func (c Config) NthHost(n int) (netip.Addr, bool) {
	if n < 0 || n >= c.PoolSize() {
		return netip.Addr{}, false
	}
	base := addrToU32(c.WithDefaults().Pool.Addr())
	return u32ToAddr(base + 2 + uint32(n)), true
}

// HostIndex is the inverse of NthHost: it returns n for a VM address of the
// pool, and false for anything else (outside the pool, the network address,
// the gateway, the broadcast address, IPv6).
func (c Config) HostIndex(a netip.Addr) (int, bool) {
	a = a.Unmap()
	p := c.WithDefaults().Pool
	if !a.Is4() || !p.Contains(a) {
		return 0, false
	}
	n := int(addrToU32(a)-addrToU32(p.Addr())) - 2
	if n < 0 || n >= c.PoolSize() {
		return 0, false
	}
	return n, true
}

func addrToU32(a netip.Addr) uint32 {
	b := a.As4()
	return binary.BigEndian.Uint32(b[:])
}

func u32ToAddr(v uint32) netip.Addr {
	var b [4]byte
	binary.BigEndian.PutUint32(b[:], v)
	return netip.AddrFrom4(b)
}

// MACFor derives a VM's guest MAC address from its id: a locally
// administered unicast address (first octet 0x?2/6/A/E) built from the
// SHA-256 of the id, so the same id always gets the same MAC (a rewind
// keeps it) and a clone, which has a new id, gets a new one. Two ids share a
// MAC with probability about n²/2⁴⁷; AddVM refuses such a collision with
// errdefs.ErrConflict, so the caller can pick another (random) MAC.
func MACFor(id string) net.HardwareAddr {
	sum := sha256.Sum256([]byte("noid-mac\x00" + id))
	mac := net.HardwareAddr(sum[:6])
	mac[0] = mac[0]&^0x01 | 0x02 // unicast, locally administered
	return mac
}

// TapName is the host interface name of the VM with the given id:
// TapPrefix followed by 10 hex digits of the SHA-256 of the id (15
// characters, the Linux limit). It is deterministic, so a restarted server
// finds its TAPs again.
func TapName(id string) string {
	sum := sha256.Sum256([]byte(id))
	return TapPrefix + hex.EncodeToString(sum[:])[:maxIfName-len(TapPrefix)]
}

func validIfName(s string) bool {
	if s == "" || len(s) > maxIfName || s == "." || s == ".." {
		return false
	}
	for _, r := range s {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '-', r == '_', r == '.':
		default:
			return false
		}
	}
	return true
}

// VMNet is the network identity of one VM.
type VMNet struct {
	// ID is the VM's unique, stable id.
	ID string
	// TapName is the host interface; empty means TapName(ID). It must start
	// with TapPrefix and be at most 15 characters.
	TapName string
	// MAC is the guest's MAC address (what QEMU gets as -device …,mac=);
	// nil means MACFor(ID). It must be unicast.
	MAC net.HardwareAddr
	// IP is the guest's address; it must be a VM address of the pool (see
	// NthHost).
	IP netip.Addr
	// Owner is the user the VM belongs to. Peers are only ever allowed
	// between VMs with the same non-empty owner.
	Owner string
	// AllowPeers lets this VM talk to the other VMs of the same owner that
	// also allow peers (or to all of them when Config.AllowSameUser is set).
	AllowPeers bool
	// TapUID, when non-zero, makes that uid the TAP's owner so an
	// unprivileged VMM process can open it. Zero means root (or
	// CAP_NET_ADMIN) only.
	TapUID uint32
	// TapGID, when non-zero, makes that gid the TAP's group.
	TapGID uint32
}

// NormalizeVM validates v against c and returns it with its defaults
// filled in (TapName, MAC), as AddVM will install it. The server can use it
// to learn the TAP name and MAC to hand to the VMM. Errors wrap
// errdefs.ErrInvalidArgument.
func (c Config) NormalizeVM(v VMNet) (VMNet, error) {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("vm %q network: "+format+": %w", append([]any{v.ID}, append(a, errdefs.ErrInvalidArgument)...)...)
	}
	if v.ID == "" {
		return v, bad("empty id")
	}
	if v.TapName == "" {
		v.TapName = TapName(v.ID)
	}
	if !strings.HasPrefix(v.TapName, TapPrefix) || !validIfName(v.TapName) || len(v.TapName) == len(TapPrefix) {
		return v, bad("tap name %q must be %s followed by 1-10 of [A-Za-z0-9_.-]", v.TapName, TapPrefix)
	}
	if v.MAC == nil {
		v.MAC = MACFor(v.ID)
	}
	if len(v.MAC) != 6 || v.MAC[0]&1 != 0 || isZeroMAC(v.MAC) {
		return v, bad("MAC %s is not a unicast Ethernet address", v.MAC)
	}
	v.MAC = append(net.HardwareAddr(nil), v.MAC...)
	v.IP = v.IP.Unmap()
	if _, ok := c.HostIndex(v.IP); !ok {
		return v, bad("IP %s is not a VM address of pool %s", v.IP, c.WithDefaults().Pool)
	}
	if v.TapUID > math.MaxInt32 || v.TapGID > math.MaxInt32 {
		return v, bad("tap uid/gid out of range")
	}
	return v, nil
}

func isZeroMAC(m net.HardwareAddr) bool {
	for _, b := range m {
		if b != 0 {
			return false
		}
	}
	return true
}

// sameNet reports whether a and b describe the same network identity.
func sameNet(a, b VMNet) bool {
	return a.ID == b.ID && a.TapName == b.TapName && a.MAC.String() == b.MAC.String() &&
		a.IP == b.IP && a.Owner == b.Owner && a.AllowPeers == b.AllowPeers &&
		a.TapUID == b.TapUID && a.TapGID == b.TapGID
}
