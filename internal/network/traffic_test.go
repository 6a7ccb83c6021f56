package network

import (
	"context"
	"fmt"
	"net"
	"strconv"
	"sync"
	"testing"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// TestTraffic proves the isolation, NAT, clamping and anti-spoofing rules
// with real packets between namespaces.
func TestTraffic(t *testing.T) {
	e := newEnv(t, testConfig())
	e.addInternet(1400)
	gw := e.cfg.Gateway()
	a1 := e.addVM("alice-1", "alice", 0, false)
	a2 := e.addVM("alice-2", "alice", 1, false)
	b1 := e.addVM("bob-1", "bob", 2, false)

	tcpServer(t, e.host, hostPort(gw, int(e.cfg.DNSPort))) // the DNS port, over TCP
	tcpServer(t, e.host, hostPort(gw, 8080))
	tcpServer(t, e.host, "0.0.0.0:8081")
	tcpServer(t, e.inet, uplinkInet+":80")
	tcpServer(t, e.inet, "169.254.169.254:80")
	mssServer(t, e)

	t.Run("host reaches VM", func(t *testing.T) {
		seen := mustReach(t, e.host, "", a1.addr(), "host → VM")
		if ipOf(seen) != gw {
			t.Errorf("VM saw the host as %s, want %s", seen, gw)
		}
	})
	t.Run("VM reaches gateway DNS port over TCP", func(t *testing.T) {
		mustReach(t, a1.ns, "", hostPort(gw, int(e.cfg.DNSPort)), "VM → gateway DNS port")
	})
	t.Run("VM cannot reach other host ports", func(t *testing.T) {
		mustReach(t, e.host, "", hostPort(gw, 8080), "control: host → its own :8080")
		mustNotReach(t, a1.ns, "", hostPort(gw, 8080), "VM → gateway:8080")
		mustReach(t, e.host, "", uplinkHost+":8081", "control: host → its uplink address")
		mustNotReach(t, a1.ns, "", uplinkHost+":8081", "VM → host uplink address")
	})
	t.Run("NAT out through the uplink", func(t *testing.T) {
		seen := mustReach(t, a1.ns, "", uplinkInet+":80", "VM → internet")
		if ipOf(seen).String() != uplinkHost {
			t.Errorf("internet saw the VM as %s, want it masqueraded to %s", seen, uplinkHost)
		}
	})
	t.Run("MSS clamped to the uplink MTU", func(t *testing.T) {
		got, err := dialFrom(a1.ns, "", uplinkInet+":81", okTimeout)
		if err != nil {
			t.Fatal(err)
		}
		mss, _ := strconv.Atoi(got)
		// The VM's MTU is 1500 (MSS 1460); the uplink's is 1400 (MSS 1360).
		if mss <= 0 || mss > 1360 {
			t.Errorf("server-side MSS = %q, want ≤ 1360 (clamped to the 1400-byte uplink)", got)
		}
		t.Logf("server-side MSS with clamping: %d", mss)
	})
	t.Run("metadata and link-local blocked", func(t *testing.T) {
		mustReach(t, e.host, "", "169.254.169.254:80", "control: host → metadata")
		mustNotReach(t, a1.ns, "", "169.254.169.254:80", "VM → metadata")
	})
	t.Run("anti-spoofing", func(t *testing.T) {
		eth0, err := a1.h.LinkByName("eth0")
		if err != nil {
			t.Fatal(err)
		}
		// A forged source address: an unused one, and a neighbour's.
		mustAddr(t, a1.h, eth0, "172.16.0.99/16")
		mustAddr(t, a1.h, eth0, b1.v.IP.String()+"/32")
		mustReach(t, a1.ns, a1.v.IP.String()+":0", uplinkInet+":80", "control: own source")
		mustNotReach(t, a1.ns, "172.16.0.99:0", uplinkInet+":80", "forged source 172.16.0.99")
		mustNotReach(t, a1.ns, b1.v.IP.String()+":0", uplinkInet+":80", "forged source of another VM")
		mustNotReach(t, a1.ns, "172.16.0.99:0", hostPort(gw, int(e.cfg.DNSPort)), "forged source to the gateway")
		for _, c := range []string{"172.16.0.99/16", b1.v.IP.String() + "/32"} {
			a, _ := netlink.ParseAddr(c)
			if err := a1.h.AddrDel(eth0, a); err != nil {
				t.Fatal(err)
			}
		}
		// A forged source MAC.
		forged := net.HardwareAddr{0x02, 0, 0, 0, 0, 0x99}
		if err := a1.h.LinkSetHardwareAddr(eth0, forged); err != nil {
			t.Fatal(err)
		}
		mustNotReach(t, a1.ns, "", uplinkInet+":80", "forged MAC")
		if err := a1.h.LinkSetHardwareAddr(eth0, a1.v.MAC); err != nil {
			t.Fatal(err)
		}
		mustReach(t, a1.ns, "", uplinkInet+":80", "own MAC again")
	})

	// VM ↔ VM, under both br_netfilter settings (when on, bridged IPv4 also
	// crosses the inet hooks, so both layers must agree).
	for _, brnf := range []string{"0", "1"} {
		t.Run("VM to VM with bridge-nf-call-iptables="+brnf, func(t *testing.T) {
			sysctl(t, e.host, "net/bridge/bridge-nf-call-iptables", brnf)
			e.setAllow(a1, false)
			e.setAllow(a2, false)
			e.setAllow(b1, false)
			assertIsolated(t, e, a1, true)
			mustNotReach(t, a1.ns, "", a2.addr(), "same owner, default")
			mustNotReach(t, a2.ns, "", a1.addr(), "same owner, default (reverse)")
			mustNotReach(t, a1.ns, "", b1.addr(), "other owner, default")

			e.setAllow(a1, true)
			mustNotReach(t, a1.ns, "", a2.addr(), "only one side allows peers")
			e.setAllow(a2, true)
			e.setAllow(b1, true)
			assertIsolated(t, e, a1, false)
			for _, vm := range []*fakeVM{a1, a2, b1} {
				vm.forgetNeighbours(t)
			}
			mustReach(t, a1.ns, "", a2.addr(), "same owner, both allow")
			seen := mustReach(t, a2.ns, "", a1.addr(), "same owner, both allow (reverse)")
			if ipOf(seen) != a2.v.IP {
				t.Errorf("peer saw %s, want %s (no NAT between VMs)", seen, a2.v.IP)
			}
			mustNotReach(t, a1.ns, "", b1.addr(), "other owner, all allow")
			mustNotReach(t, b1.ns, "", a2.addr(), "other owner, all allow (reverse)")
		})
	}

	t.Run("VM to VM routed through the gateway", func(t *testing.T) {
		// A VM that sends to a neighbour via the gateway's MAC makes the host
		// route the packet back out of the bridge: the inet forward chain
		// must apply the same peer policy.
		e.setAllow(a1, true)
		e.setAllow(a2, false)
		e.setAllow(b1, true)
		eth0, _ := a1.h.LinkByName("eth0")
		for _, dst := range []*fakeVM{a2, b1} {
			r := &netlink.Route{LinkIndex: eth0.Attrs().Index, Dst: &net.IPNet{IP: dst.v.IP.AsSlice(), Mask: net.CIDRMask(32, 32)}, Gw: gw.AsSlice()}
			if err := a1.h.RouteAdd(r); err != nil {
				t.Fatal(err)
			}
		}
		mustNotReach(t, a1.ns, "", a2.addr(), "routed, peer does not allow")
		mustNotReach(t, a1.ns, "", b1.addr(), "routed, other owner")
		e.setAllow(a2, true)
		a1.forgetNeighbours(t)
		a2.forgetNeighbours(t)
		mustReach(t, a1.ns, "", a2.addr(), "routed, both allow")
		for _, dst := range []*fakeVM{a2, b1} {
			r := &netlink.Route{LinkIndex: eth0.Attrs().Index, Dst: &net.IPNet{IP: dst.v.IP.AsSlice(), Mask: net.CIDRMask(32, 32)}, Gw: gw.AsSlice()}
			if err := a1.h.RouteDel(r); err != nil {
				t.Fatal(err)
			}
		}
	})

	t.Run("each layer blocks VM to VM on its own", func(t *testing.T) {
		sysctl(t, e.host, "net/bridge/bridge-nf-call-iptables", "0")
		e.setAllow(a1, false)
		e.setAllow(a2, false)
		// nftables alone: switch port isolation off by hand.
		for _, vm := range []*fakeVM{a1, a2} {
			l, err := e.h.LinkByName(vm.v.TapName)
			if err != nil {
				t.Fatal(err)
			}
			if err := e.h.LinkSetIsolated(l, false); err != nil {
				t.Fatal(err)
			}
		}
		assertIsolated(t, e, a1, false)
		mustNotReach(t, a1.ns, "", a2.addr(), "nftables only")
		// Port isolation alone: empty noid's bridge forward chain.
		e.setAllow(a1, false) // re-isolates the ports
		e.setAllow(a2, false)
		c := nftConn(t, e.host)
		c.FlushChain(&nftables.Chain{Name: chainForward, Table: e.m.bridgeTable()})
		if err := c.Flush(); err != nil {
			t.Fatal(err)
		}
		mustNotReach(t, a1.ns, "", a2.addr(), "port isolation only")
		// Control: with neither layer, the frames do pass.
		for _, vm := range []*fakeVM{a1, a2} {
			l, _ := e.h.LinkByName(vm.v.TapName)
			if err := e.h.LinkSetIsolated(l, false); err != nil {
				t.Fatal(err)
			}
		}
		a1.forgetNeighbours(t)
		a2.forgetNeighbours(t)
		mustReach(t, a1.ns, "", a2.addr(), "control: no layer left")
		// Setup restores the rules.
		if err := e.m.Setup(context.Background()); err != nil {
			t.Fatal(err)
		}
		mustNotReach(t, a1.ns, "", a2.addr(), "after Setup restored the rules")
	})
}

func assertIsolated(t *testing.T, e *env, vm *fakeVM, want bool) {
	t.Helper()
	l, err := e.h.LinkByName(vm.v.TapName)
	if err != nil {
		t.Fatal(err)
	}
	pi, err := e.h.LinkGetProtinfo(l)
	if err != nil {
		t.Fatal(err)
	}
	if pi.Isolated != want {
		t.Errorf("%s: bridge port isolated = %v, want %v", vm.v.TapName, pi.Isolated, want)
	}
}

// mssServer listens on the internet side (:81) and answers each
// connection with the MSS the kernel settled on for it.
func mssServer(t *testing.T, e *env) {
	var ln net.Listener
	inside(t, e.inet, func() (err error) {
		ln, err = net.Listen("tcp4", uplinkInet+":81")
		return err
	})
	var wg sync.WaitGroup
	t.Cleanup(wg.Wait) // runs after ln.Close (cleanups are LIFO)
	t.Cleanup(func() { ln.Close() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mss := -1
			if rc, err := c.(*net.TCPConn).SyscallConn(); err == nil {
				rc.Control(func(fd uintptr) {
					mss, _ = unix.GetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_MAXSEG)
				})
			}
			fmt.Fprintf(c, "%d\n", mss)
			c.Close()
		}
	}()
}

var _ = context.Background
