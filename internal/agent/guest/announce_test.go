package guest

import (
	"log/slog"
	"slices"
	"testing"

	"github.com/noid-vm/noid/internal/agent/proto"
)

// netSystem is a System whose network changes succeed and which records
// announcements.
type netSystem struct {
	nopSystem
	st        NetState
	announced []string
}

func (s *netSystem) NetState(string) (NetState, error) { return s.st, nil }
func (s *netSystem) SetMAC(_, mac string) error        { s.st.MAC = mac; return nil }
func (s *netSystem) SetIPv4(_, cidr string) error      { s.st.IPv4 = []string{cidr}; return nil }
func (s *netSystem) SetGateway(_, gw string) error     { s.st.Gateway = gw; return nil }
func (s *netSystem) AnnounceIPv4(ifname, ip string) error {
	s.announced = append(s.announced, ifname+" "+ip)
	return nil
}

// TestSyncAnnouncesNewAddress: a sync that gives the guest a new address or
// MAC announces it (gratuitous ARP), so neighbours that knew the address
// with another MAC update at once; a sync that changes nothing does not.
func TestSyncAnnouncesNewAddress(t *testing.T) {
	sys := &netSystem{st: NetState{MAC: "02:00:00:00:00:01", IPv4: []string{"172.16.0.5/16"}, Gateway: "172.16.0.1"}}
	a := New(Config{Logger: slog.New(slog.DiscardHandler), System: sys, EtcDir: t.TempDir()})
	id := proto.Identity{MAC: "02:00:00:00:00:01", IPv4: "172.16.0.5/16", Gateway: "172.16.0.1"}
	steps := []struct {
		what string
		id   proto.Identity
		want []string
	}{
		{"unchanged", id, nil},
		{"new address (a clone)", func() proto.Identity { i := id; i.IPv4 = "172.16.0.9/16"; return i }(), []string{"eth0 172.16.0.9"}},
		{"new MAC", func() proto.Identity { i := id; i.IPv4 = "172.16.0.9/16"; i.MAC = "02:00:00:00:00:02"; return i }(), []string{"eth0 172.16.0.9"}},
		{"again unchanged", func() proto.Identity { i := id; i.IPv4 = "172.16.0.9/16"; i.MAC = "02:00:00:00:00:02"; return i }(), nil},
	}
	for _, st := range steps {
		sys.announced = nil
		res := a.applySync(proto.Sync{Identity: &st.id})
		if len(res.Errors) > 0 {
			t.Fatalf("%s: %v", st.what, res.Errors)
		}
		if !slices.Equal(sys.announced, st.want) {
			t.Errorf("%s: announced %v, want %v (changed %v)", st.what, sys.announced, st.want, res.Changed)
		}
	}
}
