//go:build e2e

package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/miekg/dns"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/noid-vm/noid/client"
	"github.com/noid-vm/noid/internal/network"
	"github.com/noid-vm/noid/internal/testutil"
)

// Issue 5 (networking), end to end: real noid-server, real QEMU guests,
// real bridge, TAPs, nftables and DNS. Every server runs inside a network
// namespace the test creates, so nothing here touches the host's network:
// the namespace's only way out is a veth to a second namespace of the test
// (the "internet"), which is also its default route.

const (
	netGwPort     = 8090 // a gateway port listed in gateway_tcp_ports
	netGwClosed   = 8091 // a gateway port VMs may not reach
	netVMPort     = 8080 // busybox httpd inside the guests
	netUplinkHost = "203.0.113.1"
	netUplinkWAN  = "203.0.113.2"
	netWANPort    = 8088
	netMetadata   = "169.254.169.254"
)

// ---- the lab: network namespaces of the test's own ----

// netLab is a network namespace for one noid-server, with an optional
// "internet" namespace behind a veth as its default route.
type netLab struct {
	t           *testing.T
	ns          netns.NsHandle
	h           *netlink.Handle
	wan         netns.NsHandle
	dnsUpstream string // the stand-in for the host's resolver, if any
	// spareDir is the server's warm-pool directory: the TAPs of spares
	// (VMMs prepared ahead of time, no VM yet) are not VM interfaces.
	spareDir string
}

// newNamespace creates an anonymous network namespace with lo up. It is
// destroyed when the handle is closed and no process is left in it; the
// cleanup kills (by pid) any process still inside, which can only be one
// this test started, then closes the handle.
func newNamespace(t *testing.T) netns.NsHandle {
	t.Helper()
	var ns netns.NsHandle
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		defer orig.Close()
		n, err := netns.New() // unshares this thread into a new namespace
		if err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		ns = n
		if err := netns.Set(orig); err != nil {
			errc <- err // stay locked: the thread dies with the goroutine
			return
		}
		runtime.UnlockOSThread()
		errc <- nil
	}()
	if err := <-errc; err != nil {
		t.Fatalf("creating network namespace: %v", err)
	}
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		ns.Close()
		t.Fatal(err)
	}
	defer h.Close()
	lo, err := h.LinkByName("lo")
	if err == nil {
		err = h.LinkSetUp(lo)
	}
	if err != nil {
		ns.Close()
		t.Fatalf("lo up: %v", err)
	}
	t.Cleanup(func() {
		for _, pid := range pidsInNamespace(ns) {
			t.Errorf("process %d still in the test's network namespace at cleanup; killing it", pid)
			syscall.Kill(pid, syscall.SIGKILL)
		}
		ns.Close()
	})
	return ns
}

// pidsInNamespace lists the processes whose network namespace is ns.
func pidsInNamespace(ns netns.NsHandle) []int {
	var st syscall.Stat_t
	if err := syscall.Fstat(int(ns), &st); err != nil {
		return nil
	}
	ents, _ := os.ReadDir("/proc")
	var out []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		var ps syscall.Stat_t
		if syscall.Stat(filepath.Join("/proc", e.Name(), "ns/net"), &ps) == nil && ps.Ino == st.Ino && ps.Dev == st.Dev {
			out = append(out, pid)
		}
	}
	return out
}

func newNetLab(t *testing.T) *netLab {
	t.Helper()
	testutil.RequireRoot(t)
	l := &netLab{t: t, ns: newNamespace(t)}
	h, err := netlink.NewHandleAt(l.ns)
	if err != nil {
		t.Fatal(err)
	}
	l.h = h
	t.Cleanup(h.Close)
	return l
}

// addInternet creates the "internet": a second namespace behind the veth
// uplink0 (netUplinkHost) ↔ wan0 (netUplinkWAN), the lab's default route.
// It serves HTTP on netUplinkWAN:netWANPort and on the cloud metadata
// address, answering with the caller's address.
func (l *netLab) addInternet() {
	t := l.t
	t.Helper()
	l.wan = newNamespace(t)
	wh, err := netlink.NewHandleAt(l.wan)
	if err != nil {
		t.Fatal(err)
	}
	defer wh.Close()
	if err := l.h.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "uplink0"}, PeerName: "wan0", PeerNamespace: netlink.NsFd(l.wan)}); err != nil {
		t.Fatal(err)
	}
	up, err := l.h.LinkByName("uplink0")
	if err != nil {
		t.Fatal(err)
	}
	nlAddr(t, l.h, up, netUplinkHost+"/24")
	if err := l.h.LinkSetUp(up); err != nil {
		t.Fatal(err)
	}
	if err := l.h.RouteAdd(&netlink.Route{LinkIndex: up.Attrs().Index, Gw: net.ParseIP(netUplinkWAN)}); err != nil {
		t.Fatal(err)
	}
	wan, err := wh.LinkByName("wan0")
	if err != nil {
		t.Fatal(err)
	}
	nlAddr(t, wh, wan, netUplinkWAN+"/24")
	if err := wh.LinkSetUp(wan); err != nil {
		t.Fatal(err)
	}
	lo, _ := wh.LinkByName("lo")
	nlAddr(t, wh, lo, netMetadata+"/32")
	// The internet routes the default pool to the host, like a LAN
	// neighbour trying to get in would; VMs' own traffic is masqueraded.
	if err := wh.RouteAdd(&netlink.Route{Dst: &net.IPNet{IP: network.DefaultPool.Addr().AsSlice(), Mask: net.CIDRMask(network.DefaultPool.Bits(), 32)},
		Gw: net.ParseIP(netUplinkHost)}); err != nil {
		t.Fatal(err)
	}
	serveWhoAmI(t, l.wan, net.JoinHostPort(netUplinkWAN, fmt.Sprint(netWANPort)), "internet")
	serveWhoAmI(t, l.wan, net.JoinHostPort(netMetadata, "80"), "metadata")
	l.upstreamDNS(wh)
}

// fakeDNSAnswer is what the lab's stand-in for the host's resolver answers
// for fakeDNSName.
const (
	fakeDNSName   = "upstream-check.example."
	fakeDNSAnswer = "192.0.2.55"
)

// upstreamDNS stands in for the host's resolver inside the lab: noid-server
// forwards non-.noid queries to the nameserver of /etc/resolv.conf, so that
// address is served here (on the internet's lo, or on the lab's lo for a
// loopback resolver) and the query never leaves the lab. l.dnsUpstream is
// left empty when the host has no resolver configured.
func (l *netLab) upstreamDNS(wh *netlink.Handle) {
	t := l.t
	b, err := os.ReadFile("/etc/resolv.conf")
	if err != nil {
		return
	}
	var ns netip.Addr
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) >= 2 && f[0] == "nameserver" {
			if a, err := netip.ParseAddr(f[1]); err == nil && a.Is4() {
				ns = a
				break
			}
		}
	}
	if !ns.IsValid() {
		return
	}
	where, h := l.wan, wh
	if ns.IsLoopback() {
		where, h = l.ns, l.h
	}
	lo, _ := h.LinkByName("lo")
	if !ns.IsLoopback() {
		nlAddr(t, h, lo, ns.String()+"/32")
	}
	var pc net.PacketConn
	if err := inNetNS(where, func() (err error) {
		pc, err = net.ListenPacket("udp4", net.JoinHostPort(ns.String(), "53"))
		return err
	}); err != nil {
		t.Fatalf("fake upstream resolver: %v", err)
	}
	srv := &dns.Server{PacketConn: pc, Handler: dns.HandlerFunc(func(w dns.ResponseWriter, r *dns.Msg) {
		m := new(dns.Msg)
		m.SetReply(r)
		if len(r.Question) == 1 && strings.EqualFold(r.Question[0].Name, fakeDNSName) && r.Question[0].Qtype == dns.TypeA {
			m.Answer = append(m.Answer, &dns.A{Hdr: dns.RR_Header{Name: r.Question[0].Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 5},
				A: net.ParseIP(fakeDNSAnswer)})
		} else if len(r.Question) == 1 && r.Question[0].Qtype == dns.TypeA {
			m.Rcode = dns.RcodeNameError
		}
		w.WriteMsg(m)
	})}
	go srv.ActivateAndServe()
	t.Cleanup(func() { srv.Shutdown() })
	l.dnsUpstream = ns.String()
}

func nlAddr(t *testing.T, h *netlink.Handle, l netlink.Link, cidr string) {
	t.Helper()
	a, err := netlink.ParseAddr(cidr)
	if err != nil {
		t.Fatal(err)
	}
	if err := h.AddrAdd(l, a); err != nil {
		t.Fatalf("add %s to %s: %v", cidr, l.Attrs().Name, err)
	}
}

// serveWhoAmI serves HTTP on addr inside ns; every answer is
// "<tag> <caller's ip>".
func serveWhoAmI(t *testing.T, ns netns.NsHandle, addr, tag string) {
	t.Helper()
	var ln net.Listener
	if err := inNetNS(ns, func() (err error) { ln, err = net.Listen("tcp4", addr); return err }); err != nil {
		t.Fatalf("listen on %s: %v", addr, err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		host, _, _ := net.SplitHostPort(r.RemoteAddr)
		fmt.Fprintf(w, "%s %s\n", tag, host)
	}), ReadHeaderTimeout: 10 * time.Second}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
}

// dial connects from inside the lab.
func (l *netLab) dial(ctx context.Context, addr string) (net.Conn, error) {
	var c net.Conn
	err := inNetNS(l.ns, func() (err error) {
		var d net.Dialer
		c, err = d.DialContext(ctx, "tcp4", addr)
		return err
	})
	return c, err
}

// get fetches http://addr/path from inside the lab.
func (l *netLab) get(addr, path string, timeout time.Duration) (string, error) {
	hc := &http.Client{Timeout: timeout, Transport: &http.Transport{
		DialContext:       func(ctx context.Context, _, a string) (net.Conn, error) { return l.dial(ctx, a) },
		DisableKeepAlives: true,
	}}
	resp, err := hc.Get("http://" + addr + path)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		return string(b), fmt.Errorf("GET %s: %s", path, resp.Status)
	}
	return string(b), err
}

// links returns the lab's interfaces by name.
func (l *netLab) links() map[string]netlink.Link {
	l.t.Helper()
	ls, err := l.h.LinkList()
	if err != nil {
		l.t.Fatal(err)
	}
	out := map[string]netlink.Link{}
	for _, x := range ls {
		out[x.Attrs().Name] = x
	}
	return out
}

// taps returns the names of noid's VM interfaces in the lab, sorted.
func (l *netLab) taps() []string {
	spares := map[string]bool{}
	if ents, err := os.ReadDir(l.spareDir); err == nil {
		for _, e := range ents {
			spares[network.TapName(e.Name())] = true
		}
	}
	var out []string
	for name := range l.links() {
		if strings.HasPrefix(name, network.TapPrefix) && !spares[name] {
			out = append(out, name)
		}
	}
	sort.Strings(out)
	return out
}

// nftState is what noid has in nftables: its tables, the number of rules
// (which must not depend on the VMs) and every set element, by
// "family/set".
type nftState struct {
	tables int
	rules  int
	elems  map[string][][]byte
}

func (l *netLab) nft() nftState {
	l.t.Helper()
	c, err := nftables.New(nftables.WithNetNSFd(int(l.ns)))
	if err != nil {
		l.t.Fatal(err)
	}
	st := nftState{elems: map[string][][]byte{}}
	tables, err := c.ListTables()
	if err != nil {
		l.t.Fatal(err)
	}
	chains, err := c.ListChains()
	if err != nil {
		l.t.Fatal(err)
	}
	for _, tb := range tables {
		if tb.Name != network.TableName {
			continue
		}
		st.tables++
		fam := map[nftables.TableFamily]string{nftables.TableFamilyBridge: "bridge", nftables.TableFamilyINet: "inet"}[tb.Family]
		sets, err := c.GetSets(tb)
		if err != nil {
			l.t.Fatal(err)
		}
		for _, s := range sets {
			els, err := c.GetSetElements(s)
			if err != nil {
				l.t.Fatal(err)
			}
			key := fam + "/" + s.Name
			st.elems[key] = st.elems[key][:0:0]
			for _, e := range els {
				st.elems[key] = append(st.elems[key], e.Key)
			}
		}
		for _, ch := range chains {
			if ch.Table.Name != tb.Name || ch.Table.Family != tb.Family {
				continue
			}
			rs, err := c.GetRules(tb, ch)
			if err != nil {
				l.t.Fatal(err)
			}
			st.rules += len(rs)
		}
	}
	return st
}

// refs returns the interface names and addresses the set elements refer
// to (see the element layout in internal/network/nft.go).
func (s nftState) refs() (taps map[string]int, ips map[netip.Addr]int) {
	taps, ips = map[string]int{}, map[netip.Addr]int{}
	ifn := func(b []byte) string { return string(bytes.TrimRight(b, "\x00")) }
	ip := func(b []byte) netip.Addr { return netip.AddrFrom4([4]byte(b)) }
	for set, keys := range s.elems {
		for _, k := range keys {
			switch set {
			case "bridge/vm_mac", "bridge/peer_group":
				taps[ifn(k[:16])]++
			case "bridge/vm_ip":
				taps[ifn(k[:16])]++
				ips[ip(k[16:20])]++
			case "bridge/peer_member":
				taps[ifn(k[4:20])]++
			case "inet/peer_group":
				ips[ip(k[:4])]++
			case "inet/peer_member":
				ips[ip(k[4:8])]++
			}
		}
	}
	return
}

func (s nftState) count() int {
	n := 0
	for _, k := range s.elems {
		n += len(k)
	}
	return n
}

// ---- talking to guests ----

// sh runs a shell script in vm as the client's user.
func sh(t *testing.T, c *client.Client, vm, script string) (string, int) {
	t.Helper()
	var out, errb bytes.Buffer
	cx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	st, err := c.Exec(cx, vm, client.ExecRequest{Argv: []string{"sh", "-c", script}}, client.ExecIO{Stdout: &out, Stderr: &errb})
	if err != nil {
		t.Fatalf("exec in %s: %v", vm, err)
	}
	return out.String() + errb.String(), st.Code
}

func mustSh(t *testing.T, c *client.Client, vm, script string) string {
	t.Helper()
	out, code := sh(t, c, vm, script)
	if code != 0 {
		t.Fatalf("in %s: %q: exit %d: %s", vm, script, code, out)
	}
	return out
}

// guestNet is what the guest itself says about eth0.
type guestNet struct {
	MAC, CIDR, Gateway, Resolv string
}

func readGuestNet(t *testing.T, c *client.Client, vm string) guestNet {
	t.Helper()
	g, _ := probeGuest(t, c, vm, "")
	return g
}

// probeGuest reads the guest's view of eth0 and, when url is set, fetches
// url from the guest in the same exec (execs are slow under TCG). fetched
// is the body, or "FAILED".
func probeGuest(t *testing.T, c *client.Client, vm, url string) (g guestNet, fetched string) {
	t.Helper()
	script := `cat /sys/class/net/eth0/address; ip -4 addr show dev eth0 | awk '/inet /{print $2}'; ip -4 route show default | awk '{print $3}'; grep nameserver /etc/resolv.conf | awk '{print $2}'`
	if url != "" {
		script += fmt.Sprintf(`; echo =====; timeout %d wget -q -O - %s || echo FAILED`, okSecs, url)
	}
	out := mustSh(t, c, vm, script)
	head, tail, _ := strings.Cut(out, "=====\n")
	f := strings.Fields(head)
	for len(f) < 4 {
		f = append(f, "")
	}
	return guestNet{MAC: f[0], CIDR: f[1], Gateway: f[2], Resolv: f[3]}, strings.TrimSpace(tail)
}

// serveID starts busybox httpd on netVMPort in vm, serving /id = vm name.
func serveID(t *testing.T, c *client.Client, vm string) {
	t.Helper()
	mustSh(t, c, vm, fmt.Sprintf(`mkdir -p /tmp/www && echo %s > /tmp/www/id && httpd -p %d -h /tmp/www </dev/null >/dev/null 2>&1`, vm, netVMPort))
}

// fetch runs wget in vm against url with a timeout of secs; ok is false
// when the fetch failed.
func fetch(t *testing.T, c *client.Client, vm, url string, secs int) (string, bool) {
	t.Helper()
	out, code := sh(t, c, vm, fmt.Sprintf(`timeout %d wget -q -O - %s`, secs, url))
	return strings.TrimSpace(out), code == 0
}

// resolve asks the guest's resolver (busybox nslookup, which reads
// /etc/resolv.conf like getent would) for name and returns the addresses
// of the answer, or nil for a failed lookup.
func resolve(t *testing.T, c *client.Client, vm, name string) []string {
	t.Helper()
	out, code := sh(t, c, vm, "nslookup -type=a "+name)
	if code != 0 {
		return nil
	}
	var addrs []string
	seenName := false
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) >= 2 && f[0] == "Name:" {
			seenName = true
		}
		if seenName && len(f) >= 2 && f[0] == "Address:" {
			addrs = append(addrs, f[1])
		}
	}
	return addrs
}

// Timeouts of connectivity checks: long where success is expected (they
// return as soon as they succeed), short where a block is expected (they
// always take that long), and "at once" where a stale neighbour entry
// would delay success: a Linux neighbour entry with the old MAC is used
// until it is reachable no more (15–45 s after it was confirmed), then
// waits delay_first_probe_time (5 s) and 3 unicast probes of 1 s before
// the address is resolved again, and TCP's SYN retries at 1, 3, 7 and
// 15 s; so success at once is within 6 s, which leaves a loaded machine
// room for wget's own start in a TCG guest.
const (
	okSecs      = 10
	blockedSecs = 4
	onceSecs    = 6
	okWait      = okSecs * time.Second
	onceWait    = onceSecs * time.Second
)

// canReach reports whether from (as c) fetches to's /id over the bridge
// within secs seconds.
func canReach(t *testing.T, c *client.Client, from string, toIP string, toName string, secs int) bool {
	t.Helper()
	out, ok := fetch(t, c, from, fmt.Sprintf("http://%s:%d/id", toIP, netVMPort), secs)
	if ok && out != toName {
		t.Errorf("%s fetched %q from %s, want %q", from, out, toIP, toName)
	}
	return ok
}

// checkWired checks a running VM's network identity from every side: the
// API, the guest's own view, the host's TAP and the nftables elements.
// When probeURL is set the guest also fetches it; the body is returned.
func checkWired(t *testing.T, l *netLab, c *client.Client, v *client.VM, pool netip.Prefix, probeURL ...string) string {
	t.Helper()
	ip, err := netip.ParseAddr(v.IP)
	if err != nil || !pool.Contains(ip) {
		t.Fatalf("vm %s has ip %q, want one in %s", v.Name, v.IP, pool)
	}
	gw := pool.Addr().Next().String()
	g, fetched := probeGuest(t, c, v.Name, strings.Join(probeURL, ""))
	want := guestNet{MAC: v.MAC, CIDR: fmt.Sprintf("%s/%d", v.IP, pool.Bits()), Gateway: gw, Resolv: gw}
	if g != want {
		t.Errorf("vm %s: guest sees %+v, want %+v", v.Name, g, want)
	}
	tap := v.Tap
	link, ok := l.links()[tap]
	if !ok {
		t.Fatalf("vm %s: no interface %s", v.Name, tap)
	}
	if link.Attrs().OperState == netlink.OperDown {
		t.Errorf("vm %s: %s is down", v.Name, tap)
	}
	taps, ips := l.nft().refs()
	if taps[tap] == 0 || ips[ip] == 0 {
		t.Errorf("vm %s: nftables has no elements for %s / %s", v.Name, tap, ip)
	}
	return fetched
}

func p50(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	sort.Float64s(s)
	return s[len(s)/2]
}

// addUser creates a token user with noid-server add-user and returns a
// client for it on the local socket.
func addUser(t *testing.T, e *Env, name string) *client.Client {
	t.Helper()
	out, err := exec.Command(e.Bins.Server, "add-user", name, "--config", e.Config).CombinedOutput()
	if err != nil {
		t.Fatalf("add-user %s: %v: %s", name, err, out)
	}
	c, err := client.New("unix://"+e.Socket, strings.TrimSpace(string(out)))
	if err != nil {
		t.Fatal(err)
	}
	// The Env's cleanup destroys only the admin's VMs; this runs first.
	t.Cleanup(func() {
		select {
		case <-e.exited:
			e.Start()
		default:
		}
		if _, err := e.Client.RemoveUser(context.Background(), name); err != nil {
			t.Errorf("removing user %s: %v", name, err)
		}
	})
	return c
}

// cliCreate runs `noid create NAME ARGS --json` and decodes the VM. It is
// safe to call from any goroutine.
func cliCreate(cx context.Context, e *Env, name string, args ...string) (*client.VM, error) {
	cmd := exec.CommandContext(cx, e.Bins.Noid, append([]string{"create", name, "--json"}, args...)...)
	cmd.Env = append(os.Environ(), "NOID_URL=unix://"+e.Socket)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("noid create %s %v: %v: %s", name, args, err, errb.String())
	}
	var v client.VM
	if err := json.Unmarshal(out.Bytes(), &v); err != nil {
		return nil, fmt.Errorf("noid create --json printed %q: %v", out.String(), err)
	}
	return &v, nil
}

func create(t *testing.T, c *client.Client, req client.CreateVMRequest) *client.VM {
	t.Helper()
	cx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	v, err := c.CreateVM(cx, req)
	if err != nil {
		t.Fatalf("create %s: %v", req.Name, err)
	}
	return v
}

func getVM(t *testing.T, c *client.Client, name string) *client.VM {
	t.Helper()
	v, err := c.GetVM(ctx(t), name)
	if err != nil {
		t.Fatalf("info %s: %v", name, err)
	}
	return v
}

// ---- the tests ----

// TestNetwork covers acceptance 1-6 of issue 5 on one server, plus the
// IP in info/list and the cost of network set-up.
func TestNetwork(t *testing.T) {
	l := newNetLab(t)
	l.addInternet()
	pool := network.DefaultPool
	gw := pool.Addr().Next().String()
	dump := dumpServerLog(t)
	e := NewEnv(t, WithNetNS(l.ns), WithConfig(fmt.Sprintf("[network]\nenabled = true\ngateway_tcp_ports = [%d]\n", netGwPort)))
	l.spareDir = filepath.Join(e.Dir, "data", "pool")
	*dump = e
	alice := e.Client // root on the local socket
	bob := addUser(t, e, "bob")
	rulesAtStart := l.nft().rules
	if rulesAtStart == 0 {
		t.Fatal("noid installed no nftables rules")
	}
	serveWhoAmI(t, l.ns, net.JoinHostPort(gw, fmt.Sprint(netGwPort)), "gateway")
	serveWhoAmI(t, l.ns, net.JoinHostPort(gw, fmt.Sprint(netGwClosed)), "closed")
	serveWhoAmI(t, l.ns, net.JoinHostPort(netUplinkHost, fmt.Sprint(netGwPort)), "uplink")

	var createNet, cloneNet, goldenNet []float64
	vms := map[string]*client.VM{}
	// Four VMs of alice (c and d allow peers; d through the CLI flag) and
	// one of bob that allows peers too, so that only the cross-user rule
	// keeps c and e apart; created in parallel.
	var wg sync.WaitGroup
	var mu sync.Mutex
	for _, r := range []struct {
		c     *client.Client
		name  string
		allow bool
	}{{alice, "a", false}, {alice, "b", false}, {alice, "c", true}, {alice, "d", true}, {bob, "e", true}} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
			defer cancel()
			var v *client.VM
			var err error
			if r.name == "d" {
				v, err = cliCreate(cx, e, "d", "--allow-peers")
			} else {
				v, err = r.c.CreateVM(cx, client.CreateVMRequest{Name: r.name, AllowPeers: r.allow})
			}
			if err != nil {
				t.Errorf("create %s: %v", r.name, err)
				return
			}
			mu.Lock()
			vms[r.name] = v
			if v.Timings != nil {
				createNet = append(createNet, v.Timings.NetMs)
			}
			mu.Unlock()
		}()
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	clientOf := func(name string) *client.Client {
		if name == "e" {
			return bob
		}
		return alice
	}
	for _, v := range vms {
		serveID(t, clientOf(v.Name), v.Name)
	}

	t.Run("1 ip and gateway", func(t *testing.T) {
		seen := map[string]string{}
		for name, v := range vms {
			checkWired(t, l, clientOf(name), v, pool)
			if o, dup := seen[v.IP]; dup {
				t.Errorf("%s and %s share ip %s", o, name, v.IP)
			}
			seen[v.IP] = name
		}
		a := vms["a"]
		// VM → a TCP server on the gateway side (a gateway_tcp_ports port);
		// the server sees the VM's own address.
		out, ok := fetch(t, alice, "a", fmt.Sprintf("http://%s:%d/", gw, netGwPort), okSecs)
		if !ok || out != "gateway "+a.IP {
			t.Errorf("a → gateway:%d: %q ok=%v, want %q", netGwPort, out, ok, "gateway "+a.IP)
		}
		// Gateway side → a TCP server in the VM.
		if got, err := l.get(net.JoinHostPort(a.IP, fmt.Sprint(netVMPort)), "/id", okWait); err != nil || strings.TrimSpace(got) != "a" {
			t.Errorf("gateway → a:%d: %q %v", netVMPort, got, err)
		}
		// Other gateway ports are closed to VMs.
		if out, ok := fetch(t, alice, "a", fmt.Sprintf("http://%s:%d/", gw, netGwClosed), blockedSecs); ok {
			t.Errorf("a reached gateway:%d, which is not in gateway_tcp_ports: %q", netGwClosed, out)
		}
		// NAT out through the lab's default route; metadata is blocked.
		out, ok = fetch(t, alice, "a", fmt.Sprintf("http://%s:%d/", netUplinkWAN, netWANPort), okSecs)
		if !ok || out != "internet "+netUplinkHost {
			t.Errorf("a → internet: %q ok=%v, want %q (masqueraded)", out, ok, "internet "+netUplinkHost)
		}
		if out, ok := fetch(t, alice, "a", "http://"+netMetadata+"/", blockedSecs); ok {
			t.Errorf("a reached the metadata address: %q", out)
		}
		// The host's other addresses are closed to VMs, and nothing from
		// outside gets in to a VM.
		if out, ok := fetch(t, alice, "a", fmt.Sprintf("http://%s:%d/", netUplinkHost, netGwPort), blockedSecs); ok {
			t.Errorf("a reached a service on the host's uplink address: %q", out)
		}
		if err := inNetNS(l.wan, func() error {
			c, err := net.DialTimeout("tcp4", net.JoinHostPort(a.IP, fmt.Sprint(netVMPort)), blockedSecs*time.Second)
			if err == nil {
				c.Close()
				return errors.New("connected")
			}
			return nil
		}); err != nil {
			t.Errorf("the internet opened a connection to a: %v", err)
		}
		// Everything but .noid is forwarded to the host's resolver.
		if l.dnsUpstream == "" {
			t.Log("no nameserver in /etc/resolv.conf: forwarding not checked")
		} else if got := resolve(t, alice, "a", strings.TrimSuffix(fakeDNSName, ".")); !slices.Equal(got, []string{fakeDNSAnswer}) {
			t.Errorf("forwarded query for %s: %v, want %s (upstream %s)", fakeDNSName, got, fakeDNSAnswer, l.dnsUpstream)
		}
		// info and list show the IP.
		info := e.MustCLI("info", "a")
		if !tableHas(info, "ip", a.IP) || !tableHas(info, "mac", a.MAC) || a.Tap == "" || !tableHas(info, "tap", a.Tap) {
			t.Errorf("noid info a does not show ip %s, mac %s and tap %q:\n%s", a.IP, a.MAC, a.Tap, info)
		}
		list := e.MustCLI("list")
		for _, n := range []string{"a", "b", "c", "d"} {
			if !listHas(list, n, vms[n].IP) {
				t.Errorf("noid list does not show %s with ip %s:\n%s", n, vms[n].IP, list)
			}
		}
	})

	t.Run("2 isolation and peers", func(t *testing.T) {
		type pair struct {
			from, to string
			want     bool
		}
		for _, p := range []pair{
			{"a", "b", false}, {"b", "a", false}, // default: isolated
			{"c", "d", true}, {"d", "c", true}, // both --allow-peers
			{"a", "c", false}, {"c", "a", false}, // only one side allows
			{"c", "e", false}, {"e", "c", false}, // another user, both allow peers (TestNetworkCrossUser has the controls)
		} {
			secs := blockedSecs
			if p.want {
				secs = okSecs
			}
			got := canReach(t, clientOf(p.from), p.from, vms[p.to].IP, p.to, secs)
			if got != p.want {
				t.Errorf("%s → %s: reachable=%v, want %v", p.from, p.to, got, p.want)
			}
		}
	})

	t.Run("3 dns", func(t *testing.T) {
		for _, q := range []struct {
			c        *client.Client
			from, nm string
			want     string
		}{
			{alice, "a", "b.noid", vms["b"].IP},
			{alice, "b", "a.noid", vms["a"].IP},
			{alice, "a", "a.noid", vms["a"].IP},
			{alice, "c", "D.noid", vms["d"].IP},
			{bob, "e", "e.noid", vms["e"].IP},
			{bob, "e", "a.noid", ""},   // alice's VM: not for bob
			{alice, "a", "e.noid", ""}, // bob's VM: not for alice
			{alice, "a", "nosuchvm.noid", ""},
		} {
			got := resolve(t, q.c, q.from, q.nm)
			want := []string(nil)
			if q.want != "" {
				want = []string{q.want}
			}
			if !slices.Equal(got, want) {
				t.Errorf("in %s, %s resolves to %v, want %v", q.from, q.nm, got, want)
			}
		}
	})

	t.Run("4 clone and rewind", func(t *testing.T) {
		if _, err := alice.Checkpoint(ctx(t), "a", client.CheckpointRequest{Name: "cp"}); err != nil {
			t.Fatal(err)
		}
		a := vms["a"]
		var clones []*client.VM
		for i := 0; i < 5; i++ {
			v, err := alice.Clone(ctx(t), "a", "cp", fmt.Sprintf("a%d", i+2))
			if err != nil {
				t.Fatalf("clone: %v", err)
			}
			clones = append(clones, v)
			if v.Timings != nil {
				cloneNet = append(cloneNet, v.Timings.NetMs)
			}
		}
		a2 := clones[0]
		if a2.IP == a.IP || a2.MAC == a.MAC || a2.IP == "" || a2.MAC == "" {
			t.Fatalf("clone a2 has ip %s mac %s; original has ip %s mac %s", a2.IP, a2.MAC, a.IP, a.MAC)
		}
		seen := map[string]bool{a.IP: true}
		for _, v := range clones {
			if seen[v.IP] {
				t.Errorf("clone %s reuses ip %s", v.Name, v.IP)
			}
			seen[v.IP] = true
		}
		checkWired(t, l, alice, a2, pool)
		checkWired(t, l, alice, getVM(t, alice, "a"), pool)
		// Both work: outbound from each, and each one's httpd (which a2
		// inherited, running, from the checkpoint) answers on its own IP.
		for _, v := range []*client.VM{a, a2} {
			if out, ok := fetch(t, alice, v.Name, fmt.Sprintf("http://%s:%d/", gw, netGwPort), okSecs); !ok || out != "gateway "+v.IP {
				t.Errorf("%s → gateway: %q ok=%v", v.Name, out, ok)
			}
			if got, err := l.get(net.JoinHostPort(v.IP, fmt.Sprint(netVMPort)), "/id", okWait); err != nil || strings.TrimSpace(got) != "a" {
				t.Errorf("gateway → %s: %q %v", v.Name, got, err)
			}
		}
		if got := resolve(t, alice, "b", "a2.noid"); !slices.Equal(got, []string{a2.IP}) {
			t.Errorf("a2.noid = %v, want %s", got, a2.IP)
		}
		if got := resolve(t, alice, "b", "a.noid"); !slices.Equal(got, []string{a.IP}) {
			t.Errorf("a.noid = %v, want %s", got, a.IP)
		}
		for _, v := range clones[1:] {
			if _, err := alice.DestroyVM(ctx(t), v.Name); err != nil {
				t.Fatal(err)
			}
		}
		// DNS follows a destroy at once.
		if got := resolve(t, alice, "b", clones[1].Name+".noid"); got != nil {
			t.Errorf("%s.noid still resolves after its destroy: %v", clones[1].Name, got)
		}

		// Rewind in place: a keeps its IP and MAC.
		mustSh(t, alice, "a", "echo after-checkpoint > /tmp/marker")
		ra, err := alice.Restore(ctx(t), "a", "cp")
		if err != nil {
			t.Fatal(err)
		}
		if ra.IP != a.IP || ra.MAC != a.MAC {
			t.Errorf("after rewind a has ip %s mac %s, want %s %s", ra.IP, ra.MAC, a.IP, a.MAC)
		}
		if out, _ := sh(t, alice, "a", "cat /tmp/marker"); strings.Contains(out, "after-checkpoint") {
			t.Errorf("rewind did not rewind: /tmp/marker = %q", out)
		}
		checkWired(t, l, alice, ra, pool)
		if out, ok := fetch(t, alice, "a", fmt.Sprintf("http://%s:%d/", gw, netGwPort), okSecs); !ok || out != "gateway "+a.IP {
			t.Errorf("a → gateway after rewind: %q ok=%v", out, ok)
		}
		// Rewinding the clone to a's checkpoint (by id) restores a's
		// memory, but a2 keeps its own identity.
		cps, err := alice.ListCheckpoints(ctx(t), "a")
		if err != nil || len(cps) != 1 {
			t.Fatalf("checkpoints of a: %v %v", cps, err)
		}
		r2, err := alice.Restore(ctx(t), "a2", cps[0].ID)
		if err != nil {
			t.Fatal(err)
		}
		if r2.IP != a2.IP || r2.MAC != a2.MAC {
			t.Errorf("after rewinding a2 to a's checkpoint: ip %s mac %s, want %s %s", r2.IP, r2.MAC, a2.IP, a2.MAC)
		}
		checkWired(t, l, alice, r2, pool)
		for _, v := range []*client.VM{a, a2} {
			if got, err := l.get(net.JoinHostPort(v.IP, fmt.Sprint(netVMPort)), "/id", okWait); err != nil || strings.TrimSpace(got) != "a" {
				t.Errorf("gateway → %s after rewinds: %q %v", v.Name, got, err)
			}
		}
		vms["a2"] = a2
	})

	t.Run("none", func(t *testing.T) {
		before := l.taps()
		r := e.CLI("", "create", "offline", "--network", "none")
		if r.Code != 0 {
			t.Fatalf("create --network none: %d %s %s", r.Code, r.Stdout, r.Stderr)
		}
		v := getVM(t, alice, "offline")
		if v.IP != "" || v.MAC != "" || v.Network != "none" {
			t.Errorf("offline: ip %q mac %q network %q", v.IP, v.MAC, v.Network)
		}
		if got := strings.Fields(mustSh(t, alice, "offline", "ls /sys/class/net")); !slices.Equal(got, []string{"lo"}) {
			t.Errorf("offline has interfaces %v, want only lo", got)
		}
		if after := l.taps(); !slices.Equal(before, after) {
			t.Errorf("--network none changed the TAPs: %v → %v", before, after)
		}
		if !tableHas(e.MustCLI("info", "offline"), "ip", "-") {
			t.Errorf("info offline does not show ip -")
		}
		if _, err := alice.DestroyVM(ctx(t), "offline"); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("5 parallel creates and destroy", func(t *testing.T) {
		// a's checkpoint becomes the golden snapshot, so the 20 creates are
		// real (each waits for its agent) and cheap enough to run at once
		// on a small host; they go through the same network wiring as a
		// cold create. (The VMs of the other subtests were cold-booted.)
		if _, err := alice.PromoteGolden(ctx(t), "a", "cp"); err != nil {
			t.Fatalf("promote golden: %v", err)
		}
		const n = 20
		baseTaps, baseNft := l.taps(), l.nft()
		got := make([]*client.VM, n)
		var wg sync.WaitGroup
		start := time.Now()
		for i := range n {
			wg.Add(1)
			go func() {
				defer wg.Done()
				cx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
				defer cancel()
				v, err := alice.CreateVM(cx, client.CreateVMRequest{Name: fmt.Sprintf("p%02d", i)})
				if err != nil {
					t.Errorf("create p%02d: %v", i, err)
					return
				}
				got[i] = v
			}()
		}
		wg.Wait()
		t.Logf("%d parallel creates took %v", n, time.Since(start))
		if t.Failed() {
			t.FailNow()
		}
		ips := map[string]string{}
		var par []float64
		for _, v := range got {
			if v.BootPath != "golden" {
				t.Errorf("%s: boot path %s (%s), want golden", v.Name, v.BootPath, v.BootReason)
			}
			if o, dup := ips[v.IP]; dup {
				t.Errorf("%s and %s both got %s", o, v.Name, v.IP)
			}
			for _, old := range vms {
				if old.IP == v.IP {
					t.Errorf("%s got %s, which %s has", v.Name, v.IP, old.Name)
				}
			}
			ips[v.IP] = v.Name
			par = append(par, v.Timings.NetMs)
		}
		goldenNet = append(goldenNet, par...)
		t.Logf("net_ms of %d parallel golden creates: p50 %.2f ms", n, p50(par))
		// Every one is wired (API, guest, TAP, nftables) and works both ways
		// (checked in parallel: execs are slow under TCG).
		t.Run("each", func(t *testing.T) {
			for _, v := range got {
				t.Run(v.Name, func(t *testing.T) {
					t.Parallel()
					if out := checkWired(t, l, alice, v, pool, fmt.Sprintf("http://%s:%d/", gw, netGwPort)); out != "gateway "+v.IP {
						t.Errorf("%s → gateway: %q", v.Name, out)
					}
					// The golden VM's httpd came along, running.
					if body, err := l.get(net.JoinHostPort(v.IP, fmt.Sprint(netVMPort)), "/id", okWait); err != nil || strings.TrimSpace(body) != "a" {
						t.Errorf("gateway → %s: %q %v", v.Name, body, err)
					}
				})
			}
		})
		for _, v := range got {
			wg.Add(1)
			go func() {
				defer wg.Done()
				cx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
				defer cancel()
				if _, err := alice.DestroyVM(cx, v.Name); err != nil {
					t.Errorf("destroy %s: %v", v.Name, err)
				}
			}()
		}
		wg.Wait()
		if after := l.taps(); !slices.Equal(after, baseTaps) {
			t.Errorf("TAPs after destroying the %d VMs: %v, want %v", n, after, baseTaps)
		}
		after := l.nft()
		if after.count() != baseNft.count() || after.rules != baseNft.rules {
			t.Errorf("nftables after destroy: %d elements %d rules, want %d and %d", after.count(), after.rules, baseNft.count(), baseNft.rules)
		}
		taps, eips := after.refs()
		for _, v := range got {
			ip, _ := netip.ParseAddr(v.IP)
			if taps[v.Tap] != 0 || eips[ip] != 0 {
				t.Errorf("%s: nftables elements left behind", v.Name)
			}
		}
		if err := alice.RemoveGolden(ctx(t), 0, 0); err != nil {
			t.Errorf("remove golden: %v", err)
		}
	})

	t.Run("6 kill -9 and restart", func(t *testing.T) {
		// Rewinds may have moved VMs to other TAPs (a warm spare's): take
		// the VMs as they are now.
		for name := range vms {
			c := alice
			if name == "e" {
				c = bob
			}
			if v, err := c.GetVM(ctx(t), name); err == nil {
				vms[name] = v
			}
		}
		before := l.links()
		e.Kill9()
		// The rules stay while the server is down: VMs keep connectivity.
		if got, err := l.get(net.JoinHostPort(vms["b"].IP, fmt.Sprint(netVMPort)), "/id", okWait); err != nil || strings.TrimSpace(got) != "b" {
			t.Errorf("gateway → b with the server down: %q %v", got, err)
		}
		// Leftovers of a crash: a TAP of a VM that no longer exists, with its
		// nftables elements; plus interfaces that are not noid's.
		orphan := network.TapName("vm-destroyed-during-crash")
		orphanIP := netip.MustParseAddr("172.16.200.200")
		mkTap := func(name string) {
			if err := inNetNS(l.ns, func() error {
				return netlink.LinkAdd(&netlink.Tuntap{LinkAttrs: netlink.LinkAttrs{Name: name}, Mode: netlink.TUNTAP_MODE_TAP})
			}); err != nil {
				t.Fatalf("creating %s: %v", name, err)
			}
		}
		mkTap(orphan)
		mkTap("other-tap0")
		if err := l.h.LinkAdd(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "noidx0"}}); err != nil {
			t.Fatal(err)
		}
		addOrphanElements(t, l, orphan, orphanIP)
		if taps, ips := l.nft().refs(); taps[orphan] == 0 || ips[orphanIP] == 0 {
			t.Fatal("could not plant orphan elements")
		}

		e.Start()
		now := l.links()
		if _, ok := now[orphan]; ok {
			t.Errorf("orphan %s survived the restart", orphan)
		}
		for _, keep := range []string{"other-tap0", "noidx0", "uplink0"} {
			if _, ok := now[keep]; !ok {
				t.Errorf("the restart removed %s, which is not noid's", keep)
			}
		}
		if taps, ips := l.nft().refs(); taps[orphan] != 0 || ips[orphanIP] != 0 {
			t.Errorf("orphan nftables elements survived the restart")
		}
		if r := l.nft().rules; r != rulesAtStart {
			t.Errorf("%d rules after restart, %d at start", r, rulesAtStart)
		}
		for name, v := range vms {
			tap := v.Tap
			if now[tap] == nil || before[tap] == nil || now[tap].Attrs().Index != before[tap].Attrs().Index {
				t.Errorf("%s: TAP %s was not kept as it was across the restart", name, tap)
			}
		}
		// Existing VMs still have connectivity, both ways, and DNS.
		for _, name := range []string{"a", "a2", "b"} {
			v := vms[name]
			if out, ok := fetch(t, alice, name, fmt.Sprintf("http://%s:%d/", gw, netGwPort), okSecs); !ok || out != "gateway "+v.IP {
				t.Errorf("%s → gateway after restart: %q ok=%v", name, out, ok)
			}
			want := name
			if name == "a2" {
				want = "a"
			}
			if got, err := l.get(net.JoinHostPort(v.IP, fmt.Sprint(netVMPort)), "/id", okWait); err != nil || strings.TrimSpace(got) != want {
				t.Errorf("gateway → %s after restart: %q %v", name, got, err)
			}
		}
		if !canReach(t, alice, "c", vms["d"].IP, "d", okSecs) || canReach(t, alice, "a", vms["b"].IP, "b", blockedSecs) {
			t.Errorf("peer rules changed across the restart")
		}
		if got := resolve(t, alice, "a", "b.noid"); !slices.Equal(got, []string{vms["b"].IP}) {
			t.Errorf("b.noid after restart = %v", got)
		}
		l.h.LinkDel(now["other-tap0"])
		l.h.LinkDel(now["noidx0"])
	})

	t.Run("destroy all", func(t *testing.T) {
		for name := range vms {
			if _, err := clientOf(name).DestroyVM(ctx(t), name); err != nil {
				t.Errorf("destroy %s: %v", name, err)
			}
		}
		if taps := l.taps(); len(taps) != 0 {
			t.Errorf("TAPs left after destroying every VM: %v", taps)
		}
		st := l.nft()
		if st.count() != 0 || st.tables != 2 || st.rules != rulesAtStart {
			t.Errorf("nftables after destroying every VM: %d elements, %d tables, %d rules (want 0, 2, %d): %v", st.count(), st.tables, st.rules, rulesAtStart, st.elems)
		}
	})

	t.Logf("network set-up (timings.net_ms) p50: cold create %.2f ms (n=%d, 5 at once), clone %.2f ms (n=%d, one at a time), golden create %.2f ms (n=%d, 20 at once)",
		p50(createNet), len(createNet), p50(cloneNet), len(cloneNet), p50(goldenNet), len(goldenNet))
}

// dumpServerLog arranges for the server's log to be written to
// $NOID_E2E_NET_LOG when the test ends (after the Env's own cleanup), for
// looking into a passing run. Call it before NewEnv and set *e after.
func dumpServerLog(t *testing.T) **Env {
	var e *Env
	if p := os.Getenv("NOID_E2E_NET_LOG"); p != "" {
		t.Cleanup(func() {
			if e != nil {
				os.WriteFile(p+"."+strings.ReplaceAll(t.Name(), "/", "_"), []byte(e.Log()), 0o644)
			}
		})
	}
	return &e
}

// addOrphanElements plants nftables elements for tap/ip the way noid
// would have, as a crash would leave them.
func addOrphanElements(t *testing.T, l *netLab, tap string, ip netip.Addr) {
	t.Helper()
	c, err := nftables.New(nftables.WithNetNSFd(int(l.ns)))
	if err != nil {
		t.Fatal(err)
	}
	bt := &nftables.Table{Name: network.TableName, Family: nftables.TableFamilyBridge}
	ifn := make([]byte, 16)
	copy(ifn, tap)
	a4 := ip.As4()
	mac := network.MACFor("orphan")
	for _, x := range []struct {
		set string
		key []byte
	}{{"vm_ip", append(slices.Clone(ifn), a4[:]...)}, {"vm_mac", append(slices.Clone(ifn), append([]byte(mac), 0, 0)...)}} {
		s, err := c.GetSetByName(bt, x.set)
		if err != nil {
			t.Fatal(err)
		}
		if err := c.SetAddElements(s, []nftables.SetElement{{Key: x.key}}); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
}

// tableHas reports whether the table output has a row "field value".
func tableHas(out, field, value string) bool {
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) >= 2 && f[0] == field && f[1] == value {
			return true
		}
	}
	return false
}

// listHas reports whether noid list shows vm with ip.
func listHas(out, vm, ip string) bool {
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) > 0 && f[0] == vm && slices.Contains(f, ip) {
			return true
		}
	}
	return false
}

// TestNetworkSmallPool: allow_same_user, an exhausted pool (clear error,
// nothing half-created), --network none with a full pool, and reuse of a
// destroyed VM's address.
func TestNetworkSmallPool(t *testing.T) {
	l := newNetLab(t)
	pool := netip.MustParsePrefix("10.77.0.0/29") // 5 VM addresses
	dump := dumpServerLog(t)
	e := NewEnv(t, WithNetNS(l.ns), WithConfig("[network]\nenabled = true\npool = \"10.77.0.0/29\"\nallow_same_user = true\n"))
	l.spareDir = filepath.Join(e.Dir, "data", "pool")
	*dump = e
	alice := e.Client
	bob := addUser(t, e, "bob")
	p1 := create(t, alice, client.CreateVMRequest{Name: "p1"})
	p2 := create(t, alice, client.CreateVMRequest{Name: "p2"})
	q1 := create(t, bob, client.CreateVMRequest{Name: "q1"})
	t.Logf("net_ms of one-at-a-time cold creates: %.2f %.2f %.2f ms", p1.Timings.NetMs, p2.Timings.NetMs, q1.Timings.NetMs)
	for _, x := range []struct {
		c *client.Client
		v *client.VM
	}{{alice, p1}, {alice, p2}, {bob, q1}} {
		checkWired(t, l, x.c, x.v, pool)
		serveID(t, x.c, x.v.Name)
	}
	t.Run("allow_same_user", func(t *testing.T) {
		if !canReach(t, alice, "p1", p2.IP, "p2", okSecs) || !canReach(t, alice, "p2", p1.IP, "p1", okSecs) {
			t.Errorf("allow_same_user: p1 and p2 cannot talk")
		}
		// q1 is in bob's peer group (allow_same_user) and serves: only the
		// cross-user rule can keep p1 and q1 apart.
		if got, err := l.get(net.JoinHostPort(q1.IP, fmt.Sprint(netVMPort)), "/id", okWait); err != nil || strings.TrimSpace(got) != "q1" {
			t.Errorf("control: gateway → q1: %q %v", got, err)
		}
		if canReach(t, alice, "p1", q1.IP, "q1", blockedSecs) || canReach(t, bob, "q1", p1.IP, "p1", blockedSecs) {
			t.Errorf("allow_same_user let VMs of different users talk")
		}
	})
	t.Run("exhausted", func(t *testing.T) {
		p3 := create(t, alice, client.CreateVMRequest{Name: "p3", NoWait: true})
		p4 := create(t, alice, client.CreateVMRequest{Name: "p4", NoWait: true})
		taps, nft := l.taps(), l.nft()
		dirs := vmDirs(t, e)
		r := e.CLI("", "create", "p5")
		if r.Code == 0 {
			t.Fatalf("create p5 in a full pool succeeded: %s", r.Stdout)
		}
		if !strings.Contains(r.Stderr, "pool 10.77.0.0/29 is exhausted") {
			t.Errorf("create in a full pool: unclear error: %s", r.Stderr)
		}
		if _, err := alice.GetVM(ctx(t), "p5"); err == nil {
			t.Errorf("p5 exists after a failed create")
		}
		if now := l.taps(); !slices.Equal(now, taps) {
			t.Errorf("failed create changed TAPs: %v → %v", taps, now)
		}
		if now := l.nft(); now.count() != nft.count() {
			t.Errorf("failed create changed nftables elements: %d → %d", nft.count(), now.count())
		}
		if now := vmDirs(t, e); !slices.Equal(now, dirs) {
			t.Errorf("failed create left files: %v → %v", dirs, now)
		}
		// A VM without a NIC needs no address.
		create(t, alice, client.CreateVMRequest{Name: "n1", Network: "none"})
		if got := strings.Fields(mustSh(t, alice, "n1", "ls /sys/class/net")); !slices.Equal(got, []string{"lo"}) {
			t.Errorf("n1 has interfaces %v", got)
		}
		// A destroyed VM's address is free again, and the new VM is
		// reachable at once although the host last saw another MAC there.
		serveID(t, alice, "p4")
		if got, err := l.get(net.JoinHostPort(p4.IP, fmt.Sprint(netVMPort)), "/id", okWait); err != nil || strings.TrimSpace(got) != "p4" {
			t.Fatalf("gateway → p4: %q %v", got, err)
		}
		if !canReach(t, alice, "p1", p4.IP, "p4", okSecs) {
			t.Fatalf("p1 → p4 failed (allow_same_user)")
		}
		if _, err := alice.DestroyVM(ctx(t), "p4"); err != nil {
			t.Fatal(err)
		}
		p5 := create(t, alice, client.CreateVMRequest{Name: "p5"})
		if p5.IP != p4.IP || p5.MAC == p4.MAC {
			t.Errorf("p5 got %s %s, want the freed %s and a new MAC (p4 had %s)", p5.IP, p5.MAC, p4.IP, p4.MAC)
		}
		serveID(t, alice, "p5")
		if got, err := l.get(net.JoinHostPort(p5.IP, fmt.Sprint(netVMPort)), "/id", onceWait); err != nil || strings.TrimSpace(got) != "p5" {
			t.Errorf("gateway → p5 (p4's old address): %q %v", got, err)
		}
		if !canReach(t, alice, "p1", p5.IP, "p5", onceSecs) {
			t.Errorf("p1 → p5 (p4's old address, which p1 last saw with p4's MAC) failed")
		}
		checkWired(t, l, alice, p5, pool)
		seen := map[string]bool{}
		for _, v := range []*client.VM{p1, p2, q1, p3, p5} {
			if ip, err := netip.ParseAddr(v.IP); err != nil || !pool.Contains(ip) || seen[v.IP] {
				t.Errorf("%s has ip %q (taken twice, or outside %s)", v.Name, v.IP, pool)
			}
			seen[v.IP] = true
		}
	})
}

// vmDirs lists every VM directory under the data dir.
func vmDirs(t *testing.T, e *Env) []string {
	t.Helper()
	ms, _ := filepath.Glob(filepath.Join(e.Dir, "data", "*", "users", "*", "vms", "*"))
	ms2, _ := filepath.Glob(filepath.Join(e.Dir, "data", "users", "*", "vms", "*"))
	return append(ms, ms2...)
}

// TestNetworkPoolOverlap: a pool that overlaps a route of the host (here:
// of the server's namespace) is refused at start-up, saying so, and
// nothing is created.
func TestNetworkPoolOverlap(t *testing.T) {
	l := newNetLab(t)
	bins := testutil.Build(t)
	img := testutil.TinyImage(t)
	if err := l.h.LinkAdd(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "lan0"}}); err != nil {
		t.Fatal(err)
	}
	lan, err := l.h.LinkByName("lan0")
	if err != nil {
		t.Fatal(err)
	}
	nlAddr(t, l.h, lan, "10.88.1.1/24")
	if err := l.h.LinkSetUp(lan); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	cfg := filepath.Join(dir, "config.toml")
	os.WriteFile(cfg, []byte(fmt.Sprintf("data_dir = %q\nsocket = %q\nkernel = %q\ninitrd = %q\nrootfs = %q\naccel = \"tcg\"\n[network]\nenabled = true\npool = \"10.88.0.0/16\"\n",
		filepath.Join(dir, "data"), filepath.Join(dir, "noid.sock"), img.Kernel, img.Initrd, img.Rootfs)), 0o600)
	cmd := exec.Command(bins.Server, "serve", "--config", cfg)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := startInNetNS(l.ns, cmd); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err == nil {
			t.Fatalf("server started with a pool overlapping a route:\n%s", out.String())
		}
	case <-time.After(60 * time.Second):
		cmd.Process.Kill()
		<-done
		t.Fatalf("server did not refuse an overlapping pool:\n%s", out.String())
	}
	if !strings.Contains(out.String(), "pool 10.88.0.0/16 overlaps the host route 10.88.1.0/24") {
		t.Errorf("start-up error does not say which route the pool overlaps:\n%s", out.String())
	}
	if _, ok := l.links()["noid0"]; ok {
		t.Errorf("the refused server created its bridge")
	}
	if st := l.nft(); st.tables != 0 {
		t.Errorf("the refused server created %d nftables tables", st.tables)
	}
}
