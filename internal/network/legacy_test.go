package network

import (
	"context"
	"net"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
)

// TestLegacyTaps makes, in a namespace of its own, what the original
// noid's noid-netd leaves (TAPs noid0 and noid3, one with its /30 in
// 172.16.0.0/16) next to look-alikes that are not its (a bridge named
// noid9, a TAP of this noid's naming): only the two TAPs are found, the
// removal command names them, and a network set-up there fails without
// touching them.
func TestLegacyTaps(t *testing.T) {
	requireRoot(t)
	ns := newNS(t)
	h := nsHandle(t, ns)
	inside(t, ns, func() error {
		for _, name := range []string{"noid0", "noid3", TapPrefix + "abc"} {
			if err := netlink.LinkAdd(&netlink.Tuntap{LinkAttrs: netlink.LinkAttrs{Name: name}, Mode: netlink.TUNTAP_MODE_TAP}); err != nil {
				return err
			}
		}
		return netlink.LinkAdd(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "noid9"}})
	})
	l, err := h.LinkByName("noid3")
	if err != nil {
		t.Fatal(err)
	}
	if err := h.LinkSetUp(l); err != nil {
		t.Fatal(err)
	}
	if err := h.AddrAdd(l, &netlink.Addr{IPNet: &net.IPNet{IP: net.IPv4(172, 16, 0, 13), Mask: net.CIDRMask(30, 32)}}); err != nil {
		t.Fatal(err)
	}
	var taps []string
	inside(t, ns, func() (err error) {
		taps, err = LegacyTaps()
		return err
	})
	if strings.Join(taps, " ") != "noid0 noid3" {
		t.Errorf("LegacyTaps: %v, want [noid0 noid3]", taps)
	}
	if got := LegacyTapsRemoval(taps); got != "ip link delete noid0; ip link delete noid3" {
		t.Errorf("removal command: %q", got)
	}
	if hint := LegacyHint(taps); !strings.Contains(hint, "systemctl disable --now noid-netd") || !strings.Contains(hint, "iptables -t nat -D POSTROUTING -s 172.16.0.0/16") {
		t.Errorf("hint: %s", hint)
	}

	// This noid's default pool and bridge name meet them: it refuses and
	// leaves them as they are.
	m, err := New(context.Background(), Config{}, testLogger(t), WithNetNS(ns))
	if err == nil {
		err = m.Setup(context.Background())
		m.Close()
	}
	if err == nil {
		t.Fatalf("network set-up next to noid-netd's TAPs succeeded")
	}
	t.Logf("set-up: %v", err)
	for _, name := range []string{"noid0", "noid3"} {
		l, err := h.LinkByName(name)
		if err != nil || l.Type() != "tuntap" {
			t.Errorf("%s after the set-up: %v %v", name, l, err)
		}
	}
	if addrs, _ := h.AddrList(l, netlink.FAMILY_V4); len(addrs) != 1 {
		t.Errorf("noid3's addresses after the set-up: %v", addrs)
	}
}
