package network

import (
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
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
	t.Run("outsiders cannot use the gateway address", func(t *testing.T) {
		ih := nsHandle(t, e.inet)
		wan, _ := ih.LinkByName("wan0")
		r := &netlink.Route{LinkIndex: wan.Attrs().Index, Dst: &net.IPNet{IP: e.cfg.Pool.Addr().AsSlice(), Mask: net.CIDRMask(e.cfg.PrefixLen(), 32)}, Gw: net.ParseIP(uplinkHost)}
		if err := ih.RouteAdd(r); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = ih.RouteDel(r) })
		mustReach(t, e.inet, "", uplinkHost+":8081", "control: internet → host uplink address")
		mustNotReach(t, e.inet, "", hostPort(gw, 8081), "internet → gateway address")
		mustNotReach(t, e.inet, "", hostPort(gw, int(e.cfg.DNSPort)), "internet → gateway DNS port")
		mustNotReach(t, e.inet, "", a1.addr(), "internet → VM")
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
		// One-way UDP to a sink on the internet side shows whether a forged
		// packet leaves the host at all (a TCP test would also fail on the
		// return path, proving less). Each forged datagram is followed by a
		// genuine "barrier" datagram on the same path; once the barrier has
		// arrived, the forged one would have too.
		sink := newUDPSink(t, e.inet, uplinkInet+":9999")
		eth0, err := a1.h.LinkByName("eth0")
		if err != nil {
			t.Fatal(err)
		}
		tempAddr(t, a1.h, eth0, "172.16.0.99/16")
		tempAddr(t, a1.h, eth0, b1.v.IP.String()+"/32")
		sendUDP(t, a1.ns, a1.v.IP.String(), sink.addr, "genuine")
		sink.await(t, "genuine")
		for i, src := range []string{"172.16.0.99", b1.v.IP.String()} {
			msg := fmt.Sprintf("forged-ip-%d", i)
			sendUDP(t, a1.ns, src, sink.addr, msg)
			sendUDP(t, a1.ns, a1.v.IP.String(), sink.addr, "barrier-"+msg)
			sink.await(t, "barrier-"+msg)
			if sink.got(msg) {
				t.Errorf("a datagram with forged source %s left the host", src)
			}
		}
		// TCP from a forged source gets nowhere either (also covers the
		// gateway, where the DNS port itself is open).
		mustReach(t, a1.ns, a1.v.IP.String()+":0", uplinkInet+":80", "control: own source")
		mustNotReach(t, a1.ns, "172.16.0.99:0", uplinkInet+":80", "forged source 172.16.0.99")
		mustNotReach(t, a1.ns, "172.16.0.99:0", hostPort(gw, int(e.cfg.DNSPort)), "forged source to the gateway")
		// A forged source MAC, in a hand-made frame that is otherwise
		// valid (genuine source IP, addressed to the gateway's MAC).
		sendRawUDP(t, a1.ns, "eth0", net.HardwareAddr{0x02, 0, 0, 0, 0, 0x99}, bridgeMAC(e.cfg.Bridge), a1.v.IP, ipOf(sink.addr), 9999, "forged-mac")
		sendRawUDP(t, a1.ns, "eth0", a1.v.MAC, bridgeMAC(e.cfg.Bridge), a1.v.IP, ipOf(sink.addr), 9999, "barrier-mac")
		sink.await(t, "barrier-mac")
		if sink.got("forged-mac") {
			t.Errorf("a frame with a forged source MAC left the host")
		}
		// ARP claiming another VM's address must not reach the host: after a
		// gratuitous ARP for b1's IP from a1, the host still maps b1's IP to
		// b1's MAC.
		// Likewise an ARP that puts another VM's MAC behind a1's own IP.
		mustReach(t, e.host, "", b1.addr(), "host → b1 (fills the host's ARP cache)")
		mustReach(t, e.host, "", a1.addr(), "host → a1 (fills the host's ARP cache)")
		sendGratuitousARP(t, a1.ns, "eth0", a1.v.MAC, b1.v.IP)
		sendGratuitousARP(t, a1.ns, "eth0", b1.v.MAC, a1.v.IP)
		// Barrier: a later frame of a1's on the same path.
		mustReach(t, a1.ns, "", hostPort(gw, int(e.cfg.DNSPort)), "barrier: a1 → gateway")
		hostNeighbourIs(t, e, b1.v.IP, b1.v.MAC)
		hostNeighbourIs(t, e, a1.v.IP, a1.v.MAC)
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
		// VMs that send to each other via the gateway's MAC (here: host
		// routes both ways) make the host route their packets back out of
		// the bridge, past the bridge forward chain: the inet forward chain
		// must apply the same peer policy.
		e.setAllow(a1, true)
		e.setAllow(a2, false)
		e.setAllow(b1, true)
		via := func(from *fakeVM, to ...*fakeVM) {
			eth0, _ := from.h.LinkByName("eth0")
			for _, dst := range to {
				r := &netlink.Route{LinkIndex: eth0.Attrs().Index, Dst: &net.IPNet{IP: dst.v.IP.AsSlice(), Mask: net.CIDRMask(32, 32)}, Gw: gw.AsSlice()}
				if err := from.h.RouteAdd(r); err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() {
					if err := from.h.RouteDel(r); err != nil {
						t.Errorf("remove test route: %v", err)
					}
				})
			}
		}
		via(a1, a2, b1)
		via(a2, a1)
		via(b1, a1)
		mustNotReach(t, a1.ns, "", a2.addr(), "routed, peer does not allow")
		mustNotReach(t, a1.ns, "", b1.addr(), "routed, other owner")
		mustNotReach(t, b1.ns, "", a1.addr(), "routed, other owner (reverse)")
		e.setAllow(a2, true)
		mustReach(t, a1.ns, "", a2.addr(), "routed, both allow")
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

// udpSink collects the payloads of datagrams it receives.
type udpSink struct {
	addr string
	mu   sync.Mutex
	seen map[string]bool
	cond *sync.Cond
}

func newUDPSink(t *testing.T, ns netns.NsHandle, addr string) *udpSink {
	t.Helper()
	var pc net.PacketConn
	inside(t, ns, func() (err error) {
		pc, err = net.ListenPacket("udp4", addr)
		return err
	})
	s := &udpSink{addr: addr, seen: map[string]bool{}}
	s.cond = sync.NewCond(&s.mu)
	var wg sync.WaitGroup
	t.Cleanup(wg.Wait)
	t.Cleanup(func() { pc.Close() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		buf := make([]byte, 1500)
		for {
			n, _, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			s.mu.Lock()
			s.seen[string(buf[:n])] = true
			s.cond.Broadcast()
			s.mu.Unlock()
		}
	}()
	return s
}

func (s *udpSink) got(msg string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.seen[msg]
}

// await waits for msg (the barrier), failing after okTimeout.
func (s *udpSink) await(t *testing.T, msg string) {
	t.Helper()
	timer := time.AfterFunc(okTimeout, func() {
		s.mu.Lock()
		s.seen["__timeout__"+msg] = true
		s.cond.Broadcast()
		s.mu.Unlock()
	})
	defer timer.Stop()
	s.mu.Lock()
	defer s.mu.Unlock()
	for !s.seen[msg] && !s.seen["__timeout__"+msg] {
		s.cond.Wait()
	}
	if !s.seen[msg] {
		t.Fatalf("datagram %q never arrived", msg)
	}
}

// sendUDP sends one datagram from ns, from source address src.
func sendUDP(t *testing.T, ns netns.NsHandle, src, dst, msg string) {
	t.Helper()
	inside(t, ns, func() error {
		la, err := net.ResolveUDPAddr("udp4", src+":0")
		if err != nil {
			return err
		}
		ra, err := net.ResolveUDPAddr("udp4", dst)
		if err != nil {
			return err
		}
		c, err := net.DialUDP("udp4", la, ra)
		if err != nil {
			return err
		}
		defer c.Close()
		_, err = c.Write([]byte(msg))
		return err
	})
}

// sendGratuitousARP broadcasts, from ifname in ns, a gratuitous ARP
// claiming that ip is at mac.
func sendGratuitousARP(t *testing.T, ns netns.NsHandle, ifname string, mac net.HardwareAddr, ip netip.Addr) {
	t.Helper()
	inside(t, ns, func() error {
		ifi, err := net.InterfaceByName(ifname)
		if err != nil {
			return err
		}
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_DGRAM, int(htons(unix.ETH_P_ARP)))
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		ip4 := ip.As4()
		// Gratuitous ARP request (sender IP = target IP): receivers update an
		// existing entry at once, regardless of the locktime.
		pkt := []byte{0, 1, 8, 0, 6, 4, 0, 1} // Ethernet, IPv4, request
		pkt = append(pkt, mac...)
		pkt = append(pkt, ip4[:]...)
		pkt = append(pkt, 0, 0, 0, 0, 0, 0)
		pkt = append(pkt, ip4[:]...)
		sa := &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ARP), Ifindex: ifi.Index, Halen: 6, Addr: [8]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}}
		return unix.Sendto(fd, pkt, 0, sa)
	})
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// sendRawUDP writes one Ethernet frame carrying an IPv4/UDP datagram,
// with the given addresses, from ifname in ns.
func sendRawUDP(t *testing.T, ns netns.NsHandle, ifname string, srcMAC, dstMAC net.HardwareAddr, src, dst netip.Addr, port uint16, msg string) {
	t.Helper()
	udpLen := 8 + len(msg)
	ip := []byte{0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, unix.IPPROTO_UDP, 0, 0}
	binary.BigEndian.PutUint16(ip[2:], uint16(20+udpLen))
	s4, d4 := src.As4(), dst.As4()
	ip = append(append(ip, s4[:]...), d4[:]...)
	var sum uint32
	for i := 0; i < 20; i += 2 {
		sum += uint32(binary.BigEndian.Uint16(ip[i:]))
	}
	for sum > 0xffff {
		sum = sum&0xffff + sum>>16
	}
	binary.BigEndian.PutUint16(ip[10:], ^uint16(sum))
	udp := make([]byte, 8)
	binary.BigEndian.PutUint16(udp[0:], 40000)
	binary.BigEndian.PutUint16(udp[2:], port)
	binary.BigEndian.PutUint16(udp[4:], uint16(udpLen)) // checksum 0: none
	frame := append(append(append([]byte{}, dstMAC...), srcMAC...), 0x08, 0x00)
	frame = append(append(append(frame, ip...), udp...), msg...)
	inside(t, ns, func() error {
		ifi, err := net.InterfaceByName(ifname)
		if err != nil {
			return err
		}
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		sa := &unix.SockaddrLinklayer{Ifindex: ifi.Index, Halen: 6}
		copy(sa.Addr[:], dstMAC)
		return unix.Sendto(fd, frame, 0, sa)
	})
}

// tempAddr adds cidr to l for the rest of the (sub)test.
func tempAddr(t *testing.T, h *netlink.Handle, l netlink.Link, cidr string) {
	t.Helper()
	mustAddr(t, h, l, cidr)
	t.Cleanup(func() {
		a, _ := netlink.ParseAddr(cidr)
		if err := h.AddrDel(l, a); err != nil {
			t.Errorf("remove test address %s: %v", cidr, err)
		}
	})
}

// hostNeighbourIs asserts that the host's ARP cache maps ip to mac.
func hostNeighbourIs(t *testing.T, e *env, ip netip.Addr, mac net.HardwareAddr) {
	t.Helper()
	neighs, err := e.h.NeighList(0, netlink.FAMILY_V4)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range neighs {
		if n.IP.Equal(ip.AsSlice()) {
			if n.HardwareAddr.String() != mac.String() {
				t.Errorf("host ARP cache: %s is at %s (a forged claim), want %s", n.IP, n.HardwareAddr, mac)
			}
			return
		}
	}
	t.Errorf("host has no ARP entry for %s", ip)
}
