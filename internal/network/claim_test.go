package network

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"testing"

	"github.com/noid-vm/noid/internal/errdefs"
)

// TestClaim: while a Manager lives, a second one in its network namespace
// is refused before it changes anything, whether it names the same bridge,
// another bridge, or an overlapping pool; the first one's VM keeps its TAP
// and set elements. A Manager in another namespace is unaffected, and once
// the first one closes, the namespace is free again.
func TestClaim(t *testing.T) {
	ns, h, m := setupHost(t, testConfig())
	ctx := context.Background()
	v := vmNet(t, m.Config(), "vm-first", "alice", 0, false)
	if err := m.AddVM(ctx, v); err != nil {
		t.Fatal(err)
	}
	before := dumpNFT(t, ns).noidElements()
	pid := fmt.Sprintf("pid %d", os.Getpid())

	for _, tc := range []struct {
		name string
		cfg  Config
		want []string
	}{
		{"same bridge", testConfig(), []string{"bridge noid0 is in use", pid}},
		{"other bridge and pool", Config{Bridge: "br-other", Pool: netip.MustParsePrefix("10.50.0.0/24"), DNSPort: 5354},
			[]string{"network namespace's noid network (bridge noid0, pool 172.16.0.0/16) is in use", pid}},
		{"overlapping pool", Config{Bridge: "br-other", Pool: netip.MustParsePrefix("172.16.9.0/24"), DNSPort: 5354},
			[]string{"pool 172.16.9.0/24 overlaps it", pid}},
	} {
		m2, err := New(ctx, tc.cfg, testLogger(t), WithNetNS(ns))
		if err == nil {
			m2.Close()
			t.Errorf("%s: a second Manager in the namespace was allowed", tc.name)
			continue
		}
		if !errors.Is(err, errdefs.ErrConflict) || errdefs.HintOf(err) == "" {
			t.Errorf("%s: err %v, want ErrConflict with a hint", tc.name, err)
		}
		for _, w := range tc.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("%s: %q does not say %q", tc.name, err, w)
			}
		}
	}
	if _, err := h.LinkByName(TapName(v.ID)); err != nil {
		t.Errorf("the first Manager's TAP: %v", err)
	}
	if _, err := h.LinkByName("br-other"); err == nil {
		t.Error("a refused Manager created its bridge")
	}
	if after := dumpNFT(t, ns).noidElements(); after != before {
		t.Errorf("set elements %d, were %d", after, before)
	}

	// Another namespace has its own noid network, bridge name and all.
	other := newTestManager(t, newNS(t), testConfig())
	if err := other.Setup(ctx); err != nil {
		t.Fatalf("a Manager in another namespace: %v", err)
	}

	// Closed (the server stopped): the namespace can be taken again.
	m.Close()
	m3, err := New(ctx, testConfig(), testLogger(t), WithNetNS(ns))
	if err != nil {
		t.Fatalf("New after the first Manager closed: %v", err)
	}
	m3.Close()
}
