package network

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/noid-vm/noid/internal/errdefs"
)

func TestAddressMath(t *testing.T) {
	var c Config // defaults: 172.16.0.0/16
	if g := c.Gateway(); g != netip.MustParseAddr("172.16.0.1") {
		t.Errorf("Gateway = %s", g)
	}
	if c.PrefixLen() != 16 || c.PoolSize() != 65533 {
		t.Errorf("PrefixLen %d PoolSize %d, want 16 and 65533", c.PrefixLen(), c.PoolSize())
	}
	for n, want := range map[int]string{0: "172.16.0.2", 253: "172.16.0.255", 254: "172.16.1.0", 65532: "172.16.255.254"} {
		a, ok := c.NthHost(n)
		if !ok || a.String() != want {
			t.Errorf("NthHost(%d) = %s %v, want %s", n, a, ok, want)
		}
		if i, ok := c.HostIndex(a); !ok || i != n {
			t.Errorf("HostIndex(%s) = %d %v, want %d", a, i, ok, n)
		}
	}
	for _, n := range []int{-1, 65533} {
		if a, ok := c.NthHost(n); ok {
			t.Errorf("NthHost(%d) = %s, want out of range", n, a)
		}
	}
	for _, s := range []string{"172.16.0.0", "172.16.0.1", "172.16.255.255", "172.17.0.2", "10.0.0.2", "::1"} {
		if i, ok := c.HostIndex(netip.MustParseAddr(s)); ok {
			t.Errorf("HostIndex(%s) = %d, want not a VM address", s, i)
		}
	}
	small := Config{Pool: netip.MustParsePrefix("192.168.7.0/29")}
	if small.PoolSize() != 5 {
		t.Errorf("/29 PoolSize = %d, want 5", small.PoolSize())
	}
	if a, _ := small.NthHost(4); a.String() != "192.168.7.6" {
		t.Errorf("last host of /29 = %s", a)
	}

	m1, m2 := MACFor("a"), MACFor("b")
	if m1.String() != MACFor("a").String() || m1.String() == m2.String() {
		t.Errorf("MACFor not deterministic or not distinct: %s %s", m1, m2)
	}
	for _, m := range []string{m1.String(), m2.String()} {
		mac := MACFor(m)
		if mac[0]&1 != 0 || mac[0]&2 == 0 {
			t.Errorf("MAC %s is not locally administered unicast", mac)
		}
	}
	for _, id := range []string{"x", strings.Repeat("long-id-", 20), "0f3c5e2a-5b7e-4b7a-9d2c-2f0d6c1e9a11"} {
		n := TapName(id)
		if len(n) != 15 || !strings.HasPrefix(n, TapPrefix) || !validIfName(n) {
			t.Errorf("TapName(%q) = %q", id, n)
		}
	}
}

func TestConfigValidateStatic(t *testing.T) {
	bad := map[string]Config{
		"IPv6 pool":          {Pool: netip.MustParsePrefix("fd00::/64")},
		"host bits set":      {Pool: netip.MustParsePrefix("172.16.0.1/16")},
		"too small":          {Pool: netip.MustParsePrefix("10.0.0.0/30")},
		"too big":            {Pool: netip.MustParsePrefix("0.0.0.0/4")},
		"public":             {Pool: netip.MustParsePrefix("8.8.0.0/16")},
		"straddles private":  {Pool: netip.MustParsePrefix("172.0.0.0/8")},
		"blocked overlap":    {Pool: netip.MustParsePrefix("10.1.0.0/16"), BlockedNets: []netip.Prefix{netip.MustParsePrefix("10.1.2.0/24")}},
		"bridge with prefix": {Bridge: "noid-br"},
		"bridge too long":    {Bridge: "abcdefghijklmnop"},
		"bridge bad char":    {Bridge: "br/0"},
	}
	for name, c := range bad {
		err := c.validateStatic()
		if !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("%s: err = %v, want ErrInvalidArgument", name, err)
		}
	}
	for _, c := range []Config{{}, {Pool: netip.MustParsePrefix("10.200.0.0/24")}, {Pool: netip.MustParsePrefix("100.64.0.0/16")}, {Bridge: "br-vms"}} {
		if err := c.validateStatic(); err != nil {
			t.Errorf("%+v: %v", c, err)
		}
	}
}

// TestPoolOverlapRefused: New refuses a pool that overlaps a route of the
// namespace and names the route; the bridge's own routes do not count, so a
// restarted server accepts its own pool.
func TestPoolOverlapRefused(t *testing.T) {
	requireRoot(t)
	ns := newNS(t)
	h := nsHandle(t, ns)
	ctx := context.Background()
	// (This kernel has no dummy driver; a veth does as well.)
	link := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "eth9"}, PeerName: "eth9-peer"}
	if err := h.LinkAdd(link); err != nil {
		t.Fatal(err)
	}
	l, _ := h.LinkByName("eth9")
	if err := h.LinkSetUp(l); err != nil {
		t.Fatal(err)
	}
	mustAddr(t, h, l, "172.16.5.1/24")
	_, dst, _ := netParseCIDR("10.50.0.0/16")
	if err := h.RouteAdd(&netlink.Route{LinkIndex: l.Attrs().Index, Dst: dst, Table: 100}); err != nil {
		t.Fatal(err)
	}

	_, err := New(ctx, Config{}, testLogger(t), WithNetNS(ns))
	if !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), "172.16.5.0/24") || !strings.Contains(err.Error(), "eth9") {
		t.Errorf("default pool over 172.16.5.0/24: err = %v; want ErrInvalidArgument naming the route and device", err)
	}
	t.Logf("message: %v", err)
	_, err = New(ctx, Config{Pool: netip.MustParsePrefix("10.50.3.0/24")}, testLogger(t), WithNetNS(ns))
	if !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), "10.50.0.0/16") || !strings.Contains(err.Error(), "table 100") {
		t.Errorf("pool inside a policy-routing table's route: err = %v", err)
	}

	// A free pool works, and keeps working after Setup added its own routes.
	cfg := Config{Pool: netip.MustParsePrefix("10.99.0.0/16"), DNSPort: 5353}
	m := newTestManager(t, ns, cfg)
	if err := m.Setup(ctx); err != nil {
		t.Fatal(err)
	}
	m.Close() // the server stops; its bridge and routes stay
	m2, err := New(ctx, cfg, testLogger(t), WithNetNS(ns))
	if err != nil {
		t.Fatalf("restart with the same pool refused: %v", err)
	}
	m2.Close()
}

func netParseCIDR(s string) (net.IP, *net.IPNet, error) { return net.ParseCIDR(s) }
