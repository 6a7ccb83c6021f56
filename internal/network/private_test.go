package network

import (
	"net/netip"
	"testing"
)

// lanPeers are addresses of the private ranges that the test's "internet"
// namespace (the host's default route) holds, standing in for hosts of the
// LAN, a VPN or a carrier-grade NAT next to the host.
var lanPeers = []string{"10.20.0.2", "172.31.0.2", "192.168.77.2", "192.168.78.2", "100.64.5.2"}

// addLAN puts lanPeers on the internet namespace's lo, each serving TCP on
// :80, and checks that the host itself reaches them.
func (e *env) addLAN() {
	e.t.Helper()
	ih := nsHandle(e.t, e.inet)
	lo, err := ih.LinkByName("lo")
	if err != nil {
		e.t.Fatal(err)
	}
	for _, a := range lanPeers {
		mustAddr(e.t, ih, lo, a+"/32")
		tcpServer(e.t, e.inet, a+":80")
		mustReach(e.t, e.host, "", a+":80", "control: host → LAN peer "+a)
	}
}

// TestPrivateNetsBlocked (issue 18, finding 5): by default a VM reaches
// none of the private ranges (RFC 1918, 100.64/10) beyond the host, while
// its gateway's DNS port and the internet stay reachable.
func TestPrivateNetsBlocked(t *testing.T) {
	e := newEnv(t, testConfig())
	e.addInternet(0)
	e.addLAN()
	vm := e.addVM("lan-1", "alice", 0, false)
	gw := e.cfg.Gateway()
	tcpServer(t, e.host, hostPort(gw, int(e.cfg.DNSPort)))
	tcpServer(t, e.inet, uplinkInet+":80")
	mustReach(t, vm.ns, "", hostPort(gw, int(e.cfg.DNSPort)), "VM → its gateway's DNS port")
	mustReach(t, vm.ns, "", uplinkInet+":80", "VM → internet")
	for _, a := range lanPeers {
		mustNotReach(t, vm.ns, "", a+":80", "VM → LAN peer "+a)
	}
}

// TestAllowedNets: AllowedNets opens exactly what it names inside the
// private ranges, and cannot open a blocked range.
func TestAllowedNets(t *testing.T) {
	cfg := testConfig()
	cfg.AllowedNets = []netip.Prefix{netip.MustParsePrefix("192.168.77.0/24"), netip.MustParsePrefix("100.64.5.2/32"), netip.MustParsePrefix("169.254.0.0/16")}
	cfg.BlockedNets = []netip.Prefix{netip.MustParsePrefix("100.64.0.0/16")}
	e := newEnv(t, cfg)
	e.addInternet(0)
	e.addLAN()
	tcpServer(t, e.inet, "169.254.169.254:80")
	vm := e.addVM("lan-2", "alice", 0, false)
	mustReach(t, vm.ns, "", "192.168.77.2:80", "VM → allowed LAN peer")
	for _, a := range []string{"10.20.0.2", "172.31.0.2", "192.168.78.2"} {
		mustNotReach(t, vm.ns, "", a+":80", "VM → LAN peer outside allowed_nets "+a)
	}
	mustNotReach(t, vm.ns, "", "100.64.5.2:80", "VM → allowed but also blocked 100.64.5.2")
	mustNotReach(t, vm.ns, "", "169.254.169.254:80", "VM → metadata, listed in allowed_nets")
}
