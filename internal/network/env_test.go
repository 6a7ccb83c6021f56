package network

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// env is a host namespace running a Manager whose VMs are emulated: each
// "VM" is a network namespace whose eth0 is the far end of a veth pair,
// and the near end (named like the TAP) is what AddVM enslaves to the
// bridge in place of a TAP. An optional "internet" namespace hangs off an
// uplink veth and is the host's default route.
type env struct {
	t    *testing.T
	host netns.NsHandle
	h    *netlink.Handle
	m    *Manager
	cfg  Config
	vms  map[string]*fakeVM
	inet netns.NsHandle
}

type fakeVM struct {
	ns netns.NsHandle
	h  *netlink.Handle
	v  VMNet
}

const (
	uplinkHost = "203.0.113.1"
	uplinkInet = "203.0.113.2"
	vmPort     = 7000
)

func newEnv(t *testing.T, cfg Config) *env {
	t.Helper()
	requireRoot(t)
	e := &env{t: t, host: newNS(t), cfg: cfg.WithDefaults(), vms: map[string]*fakeVM{}}
	e.h = nsHandle(t, e.host)
	e.m = newTestManager(t, e.host, cfg)
	e.m.ensureLink = e.ensureVeth
	if err := e.m.Setup(context.Background()); err != nil {
		t.Fatalf("Setup: %v", err)
	}
	return e
}

// ensureVeth is the test ensureLink: a veth pair whose far end is the
// VM's eth0, configured like the agent would (address, default route).
// It must not call t.Fatal: the Manager's lock is held.
func (e *env) ensureVeth(v VMNet) (bool, error) {
	if _, err := e.h.LinkByName(v.TapName); err == nil {
		return false, nil
	}
	vm, ok := e.vms[v.ID]
	if !ok {
		return false, fmt.Errorf("test: no namespace prepared for vm %q", v.ID)
	}
	return true, e.makeVeth(v, vm)
}

func (e *env) makeVeth(v VMNet, vm *fakeVM) error {
	veth := &netlink.Veth{
		LinkAttrs:        netlink.LinkAttrs{Name: v.TapName},
		PeerName:         "eth0",
		PeerNamespace:    netlink.NsFd(vm.ns),
		PeerHardwareAddr: v.MAC,
	}
	if err := e.h.LinkAdd(veth); err != nil {
		return fmt.Errorf("test veth %s: %w", v.TapName, err)
	}
	eth0, err := vm.h.LinkByName("eth0")
	if err != nil {
		return err
	}
	addr := &netlink.Addr{IPNet: &net.IPNet{IP: v.IP.AsSlice(), Mask: net.CIDRMask(e.cfg.PrefixLen(), 32)}}
	if err := vm.h.AddrAdd(eth0, addr); err != nil {
		return err
	}
	if err := vm.h.LinkSetUp(eth0); err != nil {
		return err
	}
	return vm.h.RouteAdd(&netlink.Route{LinkIndex: eth0.Attrs().Index, Gw: e.cfg.Gateway().AsSlice()})
}

// addVM creates a VM namespace, AddVMs it and starts a TCP server in it
// on :vmPort.
func (e *env) addVM(id, owner string, n int, allow bool) *fakeVM {
	e.t.Helper()
	ip, ok := e.cfg.NthHost(n)
	if !ok {
		e.t.Fatalf("no host %d", n)
	}
	ns := newNS(e.t)
	vm := &fakeVM{ns: ns, h: nsHandle(e.t, ns), v: VMNet{ID: id, TapName: TapName(id), MAC: MACFor(id), IP: ip, Owner: owner, AllowPeers: allow}}
	e.vms[id] = vm
	if err := e.m.AddVM(context.Background(), vm.v); err != nil {
		e.t.Fatalf("AddVM %s: %v", id, err)
	}
	tcpServer(e.t, ns, fmt.Sprintf("0.0.0.0:%d", vmPort))
	return vm
}

// setAllow re-adds the VM with another AllowPeers.
func (e *env) setAllow(vm *fakeVM, allow bool) {
	e.t.Helper()
	vm.v.AllowPeers = allow
	if err := e.m.AddVM(context.Background(), vm.v); err != nil {
		e.t.Fatalf("AddVM %s (allow=%v): %v", vm.v.ID, allow, err)
	}
}

// forgetNeighbours drops the VM's ARP cache. A VM whose ARP requests were
// dropped while a peer was blocked keeps an INCOMPLETE entry that fails the
// next connection even after the peer is allowed (the kernel gives up after
// its 3 probes); a real guest would just retry. Tests that flip the policy
// call this before expecting success, so each check starts clean.
func (vm *fakeVM) forgetNeighbours(t testing.TB) {
	t.Helper()
	ns, err := vm.h.NeighList(0, netlink.FAMILY_V4)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range ns {
		if err := vm.h.NeighDel(&n); err != nil {
			t.Fatalf("flush neighbour %s: %v", n.IP, err)
		}
	}
}

func (vm *fakeVM) addr() string { return hostPort(vm.v.IP, vmPort) }

// addInternet creates the "internet" namespace behind an uplink veth
// (host side uplink0 with the given MTU, 0 = default) and makes it the
// host's default route. The internet also holds 169.254.169.254 on its lo,
// standing in for a cloud metadata service.
func (e *env) addInternet(hostMTU int) {
	e.t.Helper()
	e.inet = newNS(e.t)
	ih := nsHandle(e.t, e.inet)
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "uplink0", MTU: hostMTU}, PeerName: "wan0", PeerNamespace: netlink.NsFd(e.inet), PeerMTU: 1500}
	if err := e.h.LinkAdd(veth); err != nil {
		e.t.Fatal(err)
	}
	up, err := e.h.LinkByName("uplink0")
	if err != nil {
		e.t.Fatal(err)
	}
	mustAddr(e.t, e.h, up, uplinkHost+"/24")
	if err := e.h.LinkSetUp(up); err != nil {
		e.t.Fatal(err)
	}
	wan, err := ih.LinkByName("wan0")
	if err != nil {
		e.t.Fatal(err)
	}
	mustAddr(e.t, ih, wan, uplinkInet+"/24")
	if err := ih.LinkSetUp(wan); err != nil {
		e.t.Fatal(err)
	}
	lo, _ := ih.LinkByName("lo")
	mustAddr(e.t, ih, lo, "169.254.169.254/32")
	if err := e.h.RouteAdd(&netlink.Route{LinkIndex: up.Attrs().Index, Gw: net.ParseIP(uplinkInet)}); err != nil {
		e.t.Fatal(err)
	}
}

func mustAddr(t testing.TB, h *netlink.Handle, l netlink.Link, cidr string) {
	t.Helper()
	a, err := netlink.ParseAddr(cidr)
	if err != nil {
		t.Fatal(err)
	}
	if err := h.AddrAdd(l, a); err != nil {
		t.Fatalf("add %s to %s: %v", cidr, l.Attrs().Name, err)
	}
}

// sysctl writes a /proc/sys value inside ns.
func sysctl(t testing.TB, ns netns.NsHandle, path, val string) {
	t.Helper()
	inside(t, ns, func() error { return os.WriteFile("/proc/sys/"+path, []byte(val), 0o644) })
}

func ipOf(hostport string) netip.Addr {
	ap, err := netip.ParseAddrPort(hostport)
	if err != nil {
		return netip.Addr{}
	}
	return ap.Addr()
}
