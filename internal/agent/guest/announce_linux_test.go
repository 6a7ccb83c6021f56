package guest

import (
	"net"
	"os"
	"runtime"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// TestAnnounceIPv4UpdatesNeighbour runs the real gratuitous ARP between two
// network namespaces joined by a veth pair: the "host" side holds a
// neighbour entry for the guest's address with an old MAC, and after
// AnnounceIPv4 it has the guest's MAC.
func TestAnnounceIPv4UpdatesNeighbour(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates network namespaces")
	}
	runtime.LockOSThread() // this thread moves into the namespaces
	orig, err := netns.Get()
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := netns.Set(orig); err == nil {
			runtime.UnlockOSThread() // else the thread dies with the test goroutine
		}
		orig.Close()
	}()
	host, err := netns.New()
	if err != nil {
		t.Fatal(err)
	}
	defer host.Close()
	guest, err := netns.New() // the thread is now in guest
	if err != nil {
		t.Fatal(err)
	}
	defer guest.Close()
	hh, err := netlink.NewHandleAt(host)
	if err != nil {
		t.Fatal(err)
	}
	defer hh.Close()
	gmac, _ := net.ParseMAC("02:00:00:00:00:02")
	if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "eth0", HardwareAddr: gmac}, PeerName: "br0", PeerNamespace: netlink.NsFd(host)}); err != nil {
		t.Fatal(err)
	}
	eth0, _ := netlink.LinkByName("eth0")
	a, _ := netlink.ParseAddr("10.9.0.5/24")
	if err := netlink.AddrAdd(eth0, a); err != nil {
		t.Fatal(err)
	}
	if err := netlink.LinkSetUp(eth0); err != nil {
		t.Fatal(err)
	}
	br, _ := hh.LinkByName("br0")
	ha, _ := netlink.ParseAddr("10.9.0.1/24")
	if err := hh.AddrAdd(br, ha); err != nil {
		t.Fatal(err)
	}
	if err := hh.LinkSetUp(br); err != nil {
		t.Fatal(err)
	}
	old, _ := net.ParseMAC("02:00:00:00:00:01")
	if err := hh.NeighSet(&netlink.Neigh{LinkIndex: br.Attrs().Index, Family: netlink.FAMILY_V4, State: netlink.NUD_REACHABLE,
		IP: net.ParseIP("10.9.0.5"), HardwareAddr: old}); err != nil {
		t.Fatal(err)
	}
	if err := (LinuxSystem{}).AnnounceIPv4("eth0", "10.9.0.5"); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(2 * time.Second)
	for {
		ns, err := hh.NeighList(br.Attrs().Index, netlink.FAMILY_V4)
		if err != nil {
			t.Fatal(err)
		}
		for _, n := range ns {
			if n.IP.Equal(net.ParseIP("10.9.0.5")) && n.HardwareAddr.String() == gmac.String() {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("the host's neighbour entry was not updated: %v", ns)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
