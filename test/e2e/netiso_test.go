//go:build e2e

package e2e

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/nftables"

	"github.com/noid-vm/noid/client"
	"github.com/noid-vm/noid/internal/network"
)

// TestNetworkCrossUser tests the rule that VMs of different users never
// reach each other (issue 19 item 8) on its own, with every other reason a
// connection could fail taken away. Alice has a1 and a2, bob has b1 and b2,
// all four with --allow-peers, so each VM on its own side would accept the
// connection and no bridge port is isolated: only noid's peer rules can
// tell alice's pairs from the cross-user ones. a1 and b1 serve HTTP. Every
// cross-user probe (b1 → a1, a1 → b1) runs next to the same probe by the
// target's own peer (a2 → a1, b2 → b1) against the same listener by the
// same path, which must succeed, so a blocked result cannot come from a
// missing listener, a closed port or a broken path:
//
//   - direct over the bridge, decided by the bridge forward chain alone
//     (bridge-nf-call-iptables=0) and with the inet forward chain also
//     seeing bridged IPv4 (=1): ARP, and TCP with the target's MAC
//     entered by hand so that the TCP rule is tested apart from ARP;
//   - routed through the gateway (host routes in the guests), decided by
//     the inet forward chain, with the prober's path to the gateway and the
//     host's path to the target shown to work.
func TestNetworkCrossUser(t *testing.T) {
	l := newNetLab(t)
	gw := network.DefaultPool.Addr().Next().String()
	dump := dumpServerLog(t)
	e := NewEnv(t, WithNetNS(l.ns), WithConfig(fmt.Sprintf("[network]\nenabled = true\ngateway_tcp_ports = [%d]\n", netGwPort)))
	l.spareDir = filepath.Join(e.Dir, "data", "pool")
	*dump = e
	alice := e.Client
	bob := addUser(t, e, "bob")
	serveWhoAmI(t, l.ns, net.JoinHostPort(gw, fmt.Sprint(netGwPort)), "gateway")

	owner := map[string]*client.Client{"a1": alice, "a2": alice, "b1": bob, "b2": bob}
	vms := map[string]*client.VM{}
	var mu sync.Mutex
	var wg sync.WaitGroup
	for name, c := range owner {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
			defer cancel()
			v, err := c.CreateVM(cx, client.CreateVMRequest{Name: name, AllowPeers: true})
			if err != nil {
				t.Errorf("create %s: %v", name, err)
				return
			}
			mu.Lock()
			vms[name] = v
			mu.Unlock()
		}()
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	serveID(t, alice, "a1")
	serveID(t, bob, "b1")
	ipOf := func(name string) string { return vms[name].IP }

	// The four probes of every round: the cross-user pair, each next to its
	// control by the target's own peer.
	type pair struct{ from, to string }
	controls := []pair{{"a2", "a1"}, {"b2", "b1"}}
	crossUser := []pair{{"b1", "a1"}, {"a1", "b1"}}
	// round runs the four probes at once; fetches is set when the script
	// prints the target's /id.
	round := func(t *testing.T, how string, fetches bool, script func(p pair, secs int) string) {
		t.Helper()
		var ps []*vmProbe
		for _, p := range controls {
			body := ""
			if fetches {
				body = p.to
			}
			ps = append(ps, &vmProbe{c: owner[p.from], vm: p.from, what: fmt.Sprintf("control: %s → %s (%s)", p.from, p.to, how), script: script(p, okSecs), want: true, body: body})
		}
		for _, p := range crossUser {
			ps = append(ps, &vmProbe{c: owner[p.from], vm: p.from, what: fmt.Sprintf("another user: %s → %s (%s)", p.from, p.to, how), script: script(p, blockedSecs)})
		}
		runProbes(t, ps...)
	}
	fetchID := func(p pair, secs int) string {
		return fmt.Sprintf(`timeout %d wget -q -O - http://%s:%d/id`, secs, ipOf(p.to), netVMPort)
	}

	t.Run("set-up and controls", func(t *testing.T) {
		// Nothing on either side would refuse: every VM allows peers and no
		// bridge port is isolated (port isolation would otherwise separate
		// the VMs whatever nftables says).
		links := l.links()
		for name, v := range vms {
			link, ok := links[v.Tap]
			if !ok {
				t.Fatalf("%s: no interface %s", name, v.Tap)
			}
			pi, err := l.h.LinkGetProtinfo(link)
			if err != nil {
				t.Fatal(err)
			}
			if pi.Isolated {
				t.Errorf("%s: bridge port %s is isolated", name, v.Tap)
			}
		}
		// Each user's VMs share one peer group, and the two groups differ:
		// the rule under test is what separates them.
		g := l.peerGroups()
		for _, n := range []string{"a1", "a2", "b1", "b2"} {
			if g[vms[n].Tap] == 0 {
				t.Fatalf("%s (%s) is in no peer group: %v", n, vms[n].Tap, g)
			}
		}
		if g[vms["a1"].Tap] != g[vms["a2"].Tap] || g[vms["b1"].Tap] != g[vms["b2"].Tap] || g[vms["a1"].Tap] == g[vms["b1"].Tap] {
			t.Errorf("peer groups: a1 %d, a2 %d, b1 %d, b2 %d; want one per user", g[vms["a1"].Tap], g[vms["a2"].Tap], g[vms["b1"].Tap], g[vms["b2"].Tap])
		}
		// The listeners answer, from the host.
		for _, n := range []string{"a1", "b1"} {
			if got, err := l.get(net.JoinHostPort(ipOf(n), fmt.Sprint(netVMPort)), "/id", okWait); err != nil || strings.TrimSpace(got) != n {
				t.Errorf("host → %s:%d: %q %v", n, netVMPort, got, err)
			}
		}
		// Every VM's own path through the bridge to the gateway works.
		var ps []*vmProbe
		for n, c := range owner {
			ps = append(ps, &vmProbe{c: c, vm: n, what: n + " → gateway", want: true, body: "gateway " + ipOf(n),
				script: fmt.Sprintf(`timeout %d wget -q -O - http://%s:%d/`, okSecs, gw, netGwPort)})
		}
		runProbes(t, ps...)
	})
	if t.Failed() {
		t.FailNow()
	}

	for _, brnf := range []string{"0", "1"} {
		t.Run("direct with bridge-nf-call-iptables="+brnf, func(t *testing.T) {
			if err := inNetNS(l.ns, func() error {
				return os.WriteFile("/proc/sys/net/bridge/bridge-nf-call-iptables", []byte(brnf), 0o644)
			}); err != nil {
				t.Fatal(err)
			}
			// ARP requests (broadcast) reach the peer and not the other user.
			round(t, "arp", false, func(p pair, secs int) string {
				return fmt.Sprintf(`arping -f -w %d -I eth0 %s`, secs, ipOf(p.to))
			})
			// TCP with the target's MAC entered by hand: the frames go
			// straight to the target's port, with no ARP needed.
			round(t, "tcp, static arp", true, func(p pair, secs int) string {
				return fmt.Sprintf(`arp -i eth0 -s %s %s && `, ipOf(p.to), vms[p.to].MAC) + fetchID(p, secs)
			})
		})
	}

	t.Run("routed through the gateway", func(t *testing.T) {
		// Every VM sends to the others through the gateway (host routes),
		// so the host routes VM → VM packets back out of the bridge: the
		// bridge forward chain never sees them; the inet forward chain
		// decides.
		for n, c := range owner {
			var script []string
			other := ""
			for o := range owner {
				if o != n {
					script = append(script, fmt.Sprintf(`ip route replace %s/32 via %s dev eth0`, ipOf(o), gw))
					other = o
				}
			}
			script = append(script, `ip route get `+ipOf(other))
			if out := mustSh(t, c, n, strings.Join(script, " && ")); !strings.Contains(out, "via "+gw) {
				t.Fatalf("%s: the route to %s is not via the gateway: %s", n, other, out)
			}
		}
		round(t, "tcp, via the gateway", true, fetchID)
	})
}

// vmProbe is a shell script run in a VM as its owner, and whether it
// should succeed (exit 0, printing body when body is set).
type vmProbe struct {
	c      *client.Client
	vm     string
	what   string
	script string
	want   bool
	body   string
}

// runProbes runs the probes at once (a blocked probe takes its whole
// timeout, so running them together keeps the test short) and reports
// every probe whose outcome is not the wanted one.
func runProbes(t *testing.T, ps ...*vmProbe) {
	t.Helper()
	type result struct {
		out  string
		code int
		err  error
	}
	res := make([]result, len(ps))
	var wg sync.WaitGroup
	for i, p := range ps {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var out bytes.Buffer
			cx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			st, err := p.c.Exec(cx, p.vm, client.ExecRequest{Argv: []string{"sh", "-c", p.script}}, client.ExecIO{Stdout: &out, Stderr: &out})
			res[i] = result{out: strings.TrimSpace(out.String()), err: err}
			if err == nil {
				res[i].code = st.Code
			}
		}()
	}
	wg.Wait()
	for i, p := range ps {
		r := res[i]
		switch {
		case r.err != nil:
			t.Errorf("%s: exec in %s: %v", p.what, p.vm, r.err)
		case p.want && r.code != 0:
			t.Errorf("%s: failed (exit %d), want success: %s\n  script: %s", p.what, r.code, r.out, p.script)
		case p.want && p.body != "" && r.out != p.body:
			t.Errorf("%s: got %q, want %q", p.what, r.out, p.body)
		case !p.want && r.code == 0:
			t.Errorf("%s: succeeded, want it blocked: %s\n  script: %s", p.what, r.out, p.script)
		}
	}
}

// peerGroups reads noid's bridge peer_group map: TAP → peer group (0 for a
// TAP in none).
func (l *netLab) peerGroups() map[string]uint32 {
	l.t.Helper()
	c, err := nftables.New(nftables.WithNetNSFd(int(l.ns)))
	if err != nil {
		l.t.Fatal(err)
	}
	s, err := c.GetSetByName(&nftables.Table{Name: network.TableName, Family: nftables.TableFamilyBridge}, "peer_group")
	if err != nil {
		l.t.Fatal(err)
	}
	els, err := c.GetSetElements(s)
	if err != nil {
		l.t.Fatal(err)
	}
	out := map[string]uint32{}
	for _, el := range els {
		if len(el.Val) == 4 {
			out[string(bytes.TrimRight(el.Key, "\x00"))] = binary.NativeEndian.Uint32(el.Val)
		}
	}
	return out
}
