package network

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"testing"

	"github.com/noid-vm/noid/internal/testutil"
)

// TestReconcileManyVMs: a restarted server with many VMs rebuilds the sets
// so that the peer groups it allocates anew (in another order than the
// last process did) are the ones in force: a VM added afterwards joins its
// own user's VMs and no other user's.
//
// The rebuild used to send one message per set and VM: from a few hundred
// VMs on, the batch outgrew the netlink socket and was refused whole, the
// last process's elements stayed with that process's group numbers, and
// bob's next VM got the number alice's VMs still had in the kernel, so it
// reached them. Now the batch is a few messages per set on a socket with
// room for it; and when the kernel refuses it all the same (here: a socket
// buffer made too small for it), the sets are emptied and rebuilt one VM
// at a time.
func TestReconcileManyVMs(t *testing.T) {
	for _, c := range []struct {
		name     string
		buf      int
		fallback bool
	}{{"one batch", nftSocketBuffer, false}, {"one VM at a time", 64 << 10, true}} {
		t.Run(c.name, func(t *testing.T) { reconcileManyVMs(t, c.buf, c.fallback) })
	}
}

func reconcileManyVMs(t *testing.T, buf int, fallback bool) {
	const others = 1000 // VMs of ten other users, with peers: 6 elements each
	e := newEnv(t, testConfig())
	ctx := context.Background()
	// First process: alice's group is allocated first, then bob's.
	a1 := e.addVM("alice-1", "alice", 0, true)
	b1 := e.addVM("bob-1", "bob", 1, true)
	if err := e.m.Close(); err != nil {
		t.Fatal(err)
	}

	// Second process: it meets bob first and alice last.
	var log testutil.LogBuffer
	m, err := New(ctx, e.cfg, slog.New(slog.NewTextHandler(&log, nil)), WithNetNS(e.host))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	m.nftBuf = buf
	if err := m.nft.CloseLasting(); err != nil {
		t.Fatal(err)
	}
	if err := m.dialNFT(); err != nil {
		t.Fatal(err)
	}
	m.ensureLink = func(v VMNet) (bool, error) {
		if _, ok := e.vms[v.ID]; ok {
			return e.ensureVeth(v)
		}
		return m.ensureTap(v)
	}
	e.m = m
	if err := m.Setup(ctx); err != nil {
		t.Fatal(err)
	}
	want := []VMNet{b1.v}
	for i := 0; i < others; i++ {
		want = append(want, vmNet(t, e.cfg, fmt.Sprintf("other-%d", i), fmt.Sprintf("user-%d", i%10), 3+i, true))
	}
	want = append(want, a1.v)
	if err := m.Reconcile(ctx, want); err != nil {
		t.Errorf("Reconcile of %d VMs: %v", len(want), err)
	}
	if n, wantN := dumpNFT(t, e.host).noidElements(), 6*len(want); n != wantN {
		t.Errorf("%d set elements after Reconcile, want %d", n, wantN)
	}
	if got := strings.Contains(log.String(), "one VM at a time"); got != fallback {
		t.Errorf("Reconcile fell back to one VM at a time: %v, want %v; log:\n%s", got, fallback, log.String())
	}

	b2 := e.addVM("bob-2", "bob", 2, true)
	mustReach(t, e.host, "", a1.addr(), "control: host → alice's VM")
	mustReach(t, b2.ns, "", b1.addr(), "bob's new VM → bob's VM")
	mustNotReach(t, b2.ns, "", a1.addr(), "bob's new VM → alice's VM")
	mustNotReach(t, a1.ns, "", b2.addr(), "alice's VM → bob's new VM")
}
