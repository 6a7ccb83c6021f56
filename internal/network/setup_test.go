package network

import (
	"context"
	"os"
	"reflect"
	"strings"
	"testing"
)

func TestSetupIdempotent(t *testing.T) {
	requireRoot(t)
	ns := newNS(t)
	h := nsHandle(t, ns)
	m := newTestManager(t, ns, testConfig())
	ctx := context.Background()

	before := dumpNFT(t, ns)
	if before.has("inet noid") || before.has("bridge noid") {
		t.Fatalf("fresh namespace already has noid tables: %v", before.Tables)
	}
	if err := m.Setup(ctx); err != nil {
		t.Fatalf("Setup: %v", err)
	}
	first := dumpNFT(t, ns)
	firstLinks := linkState(t, h)
	for k, v := range first.Rules {
		t.Logf("%s (%s):", k, first.Chains[k])
		for _, r := range v {
			t.Logf("    %s", r)
		}
	}
	if err := m.Setup(ctx); err != nil {
		t.Fatalf("second Setup: %v", err)
	}
	second := dumpNFT(t, ns)
	secondLinks := linkState(t, h)
	if !reflect.DeepEqual(first, second) {
		t.Errorf("nftables state changed on the second Setup:\nfirst:  %+v\nsecond: %+v", first, second)
	}
	if !reflect.DeepEqual(firstLinks, secondLinks) {
		t.Errorf("links changed on the second Setup:\nfirst:  %v\nsecond: %v", firstLinks, secondLinks)
	}

	// What Setup must have created.
	for _, tb := range []string{"inet noid", "bridge noid"} {
		if !first.has(tb) {
			t.Errorf("table %s missing; have %v", tb, first.Tables)
		}
	}
	for _, ch := range []string{"bridge noid prerouting", "bridge noid forward", "inet noid input", "inet noid forward", "inet noid postrouting"} {
		if len(first.Rules[ch]) == 0 {
			t.Errorf("chain %s has no rules", ch)
		}
	}
	if !strings.Contains(strings.Join(first.Rules["inet noid postrouting"], "\n"), "Masq") {
		t.Errorf("no masquerade rule: %v", first.Rules["inet noid postrouting"])
	}
	if !strings.Contains(strings.Join(first.Rules["inet noid forward"], "\n"), "Exthdr") {
		t.Errorf("no MSS clamping rule: %v", first.Rules["inet noid forward"])
	}
	br := firstLinks["noid0"]
	if !strings.HasPrefix(br, "bridge ") || !strings.Contains(br, "up=true") || !strings.Contains(br, "172.16.0.1/16") {
		t.Errorf("bridge: got %q, want an up bridge with 172.16.0.1/16", br)
	}
	var fwd []byte
	inside(t, ns, func() (err error) {
		fwd, err = os.ReadFile("/proc/sys/net/ipv4/ip_forward")
		return err
	})
	if strings.TrimSpace(string(fwd)) != "1" {
		t.Errorf("ip_forward = %q, want 1", fwd)
	}
}
