package guest

import (
	"log/slog"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/noid-vm/noid/internal/agent/proto"
)

// netSystem is a System whose network changes succeed and which records
// announcements.
type netSystem struct {
	nopSystem
	st NetState

	mu        sync.Mutex
	announced []string
	notUp     int // calls to AnnounceIPv4 that find the link not up yet
}

func (s *netSystem) NetState(string) (NetState, error) { return s.st, nil }
func (s *netSystem) SetMAC(_, mac string) error        { s.st.MAC = mac; return nil }
func (s *netSystem) SetIPv4(_, cidr string) error      { s.st.IPv4 = []string{cidr}; return nil }
func (s *netSystem) SetGateway(_, gw string) error     { s.st.Gateway = gw; return nil }
func (s *netSystem) AnnounceIPv4(ifname, ip string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.notUp > 0 {
		s.notUp--
		return ErrLinkNotUp
	}
	s.announced = append(s.announced, ifname+" "+ip)
	return nil
}

func (s *netSystem) announcements() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.announced)
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

// TestSyncDoesNotWaitForCarrier: a sync that brings a link up (a cold
// boot's) returns without waiting for its carrier; the announcement goes
// out once the link is up.
func TestSyncDoesNotWaitForCarrier(t *testing.T) {
	sys := &netSystem{st: NetState{MAC: "02:00:00:00:00:01"}, notUp: 1 << 30} // not up until the sync returned
	a := New(Config{Logger: slog.New(slog.DiscardHandler), System: sys, EtcDir: t.TempDir()})
	id := proto.Identity{MAC: "02:00:00:00:00:01", IPv4: "172.16.0.5/16", Gateway: "172.16.0.1"}
	res := a.applySync(proto.Sync{Identity: &id})
	if len(res.Errors) > 0 {
		t.Fatal(res.Errors)
	}
	if got := sys.announcements(); len(got) != 0 {
		t.Fatalf("announced %v before the link was up", got)
	}
	sys.mu.Lock()
	sys.notUp = 0 // the carrier comes
	sys.mu.Unlock()
	deadline := time.Now().Add(10 * time.Second)
	for len(sys.announcements()) == 0 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if got, want := sys.announcements(), []string{"eth0 172.16.0.5"}; !slices.Equal(got, want) {
		t.Errorf("announced %v once the link was up, want %v", got, want)
	}
}
