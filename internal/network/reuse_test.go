package network

import (
	"context"
	"net/netip"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
)

// TestAddressReuse: when a VM is removed and another VM (new MAC) gets its
// address, the host reaches the new VM at once, although it had the old
// VM's MAC in its neighbour table. Without the neighbour clean-up the host
// keeps sending to the old MAC until the entry goes stale and is probed
// (several seconds). A reconcile also drops neighbour entries that no
// wanted VM has.
func TestAddressReuse(t *testing.T) {
	e := newEnv(t, testConfig())
	ctx := context.Background()
	// Another port keeps the bridge's carrier up when the old VM's goes
	// (a carrier loss would flush the neighbour table by itself).
	e.addVM("bystander", "bob", 3, false)
	old := e.addVM("old-vm", "alice", 0, false)
	mustReach(t, e.host, "", old.addr(), "host → old vm")
	if !hasNeigh(t, e.h, e.cfg.Bridge, old.v.IP) {
		t.Fatal("the host has no neighbour entry for the old VM; the test proves nothing")
	}
	if err := e.m.RemoveVM(ctx, old.v.ID); err != nil {
		t.Fatal(err)
	}
	if hasNeigh(t, e.h, e.cfg.Bridge, old.v.IP) {
		t.Error("RemoveVM left the VM's neighbour entry on the bridge")
	}

	// Plant a stale entry again (as if another path had learnt it), then
	// add the new VM on the same address.
	br, err := e.h.LinkByName(e.cfg.Bridge)
	if err != nil {
		t.Fatal(err)
	}
	stale := &netlink.Neigh{LinkIndex: br.Attrs().Index, Family: netlink.FAMILY_V4, State: netlink.NUD_REACHABLE,
		IP: old.v.IP.AsSlice(), HardwareAddr: old.v.MAC}
	if err := e.h.NeighSet(stale); err != nil {
		t.Fatal(err)
	}
	nu := e.addVM("new-vm", "alice", 0, false)
	if nu.v.IP != old.v.IP || nu.v.MAC.String() == old.v.MAC.String() {
		t.Fatalf("new vm %s %s, old %s %s", nu.v.IP, nu.v.MAC, old.v.IP, old.v.MAC)
	}
	// A planted REACHABLE entry stays so for the bridge's reachable time
	// (15–45 s by default) before it is even probed, so a dial that gives
	// up after 10 s still fails without the clean-up, and is generous to a
	// loaded machine with it.
	start := time.Now()
	if _, err := dialFrom(e.host, "", nu.addr(), 10*time.Second); err != nil {
		t.Errorf("host → new vm on a reused address: %v (after %v)", err, time.Since(start))
	}

	// Reconcile drops entries of addresses no wanted VM has, and keeps the
	// entries of wanted VMs.
	other, _ := e.cfg.NthHost(7)
	stale.IP = other.AsSlice()
	if err := e.h.NeighSet(stale); err != nil {
		t.Fatal(err)
	}
	if err := e.m.Reconcile(ctx, []VMNet{nu.v}); err != nil {
		t.Fatal(err)
	}
	if hasNeigh(t, e.h, e.cfg.Bridge, other) {
		t.Error("Reconcile kept a neighbour entry of an address no VM has")
	}
	if !hasNeigh(t, e.h, e.cfg.Bridge, nu.v.IP) {
		t.Error("Reconcile dropped the neighbour entry of a wanted VM")
	}
}

func hasNeigh(t *testing.T, h *netlink.Handle, bridge string, ip netip.Addr) bool {
	t.Helper()
	br, err := h.LinkByName(bridge)
	if err != nil {
		t.Fatal(err)
	}
	ns, err := h.NeighList(br.Attrs().Index, netlink.FAMILY_V4)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range ns {
		if a, ok := netip.AddrFromSlice(n.IP.To4()); ok && a == ip && n.State&(netlink.NUD_FAILED|netlink.NUD_INCOMPLETE) == 0 {
			return true
		}
	}
	return false
}
