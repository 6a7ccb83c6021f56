package network

import (
	"context"
	"os"
	"reflect"
	"strings"
	"testing"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
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

// TestSetupReplacesIncompatibleTable: a "noid" table left by something
// incompatible (here: "input" as a regular chain, which cannot become a
// base chain in place) is recreated, and ends up identical to a fresh one.
func TestSetupReplacesIncompatibleTable(t *testing.T) {
	requireRoot(t)
	fresh := newNS(t)
	mf := newTestManager(t, fresh, testConfig())
	if err := mf.Setup(context.Background()); err != nil {
		t.Fatal(err)
	}
	want := dumpNFT(t, fresh)

	ns := newNS(t)
	c := nftConn(t, ns)
	tb := c.AddTable(&nftables.Table{Name: TableName, Family: nftables.TableFamilyINet})
	ch := c.AddChain(&nftables.Chain{Name: chainInput, Table: tb})
	c.AddRule(&nftables.Rule{Table: tb, Chain: ch, Exprs: []expr.Any{&expr.Verdict{Kind: expr.VerdictAccept}}})
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	m := newTestManager(t, ns, testConfig())
	if err := m.Setup(context.Background()); err != nil {
		t.Fatalf("Setup over an incompatible table: %v", err)
	}
	if got := dumpNFT(t, ns); !reflect.DeepEqual(got, want) {
		t.Errorf("ruleset differs from a fresh Setup:\ngot  %+v\nwant %+v", got, want)
	}
}
