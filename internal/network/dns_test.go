package network

import (
	"context"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"

	"github.com/miekg/dns"
	"github.com/vishvananda/netns"
)

// fakeUpstream is the "host resolver": a DNS server on loopback in ns that
// knows example.com and a big TXT record that does not fit in 512 bytes.
func fakeUpstream(t *testing.T, ns netns.NsHandle) string {
	t.Helper()
	h := dns.HandlerFunc(func(w dns.ResponseWriter, r *dns.Msg) {
		m := new(dns.Msg)
		m.SetReply(r)
		m.RecursionAvailable = true
		q := r.Question[0]
		switch {
		case q.Name == "example.com." && q.Qtype == dns.TypeA:
			rr, _ := dns.NewRR("example.com. 60 IN A 192.0.2.7")
			m.Answer = append(m.Answer, rr)
		case q.Name == "big.example." && q.Qtype == dns.TypeTXT:
			for i := 0; i < 20; i++ {
				rr, _ := dns.NewRR(`big.example. 60 IN TXT "` + strings.Repeat("x", 60) + `"`)
				m.Answer = append(m.Answer, rr)
			}
			if _, udp := w.RemoteAddr().(*net.UDPAddr); udp {
				m.Truncate(dns.MinMsgSize)
			}
		default:
			m.Rcode = dns.RcodeNameError
		}
		_ = w.WriteMsg(m)
	})
	var pc net.PacketConn
	var ln net.Listener
	inside(t, ns, func() (err error) {
		if pc, err = net.ListenPacket("udp4", "127.0.0.1:0"); err != nil {
			return err
		}
		ln, err = net.Listen("tcp4", pc.LocalAddr().String())
		return err
	})
	var wg sync.WaitGroup
	t.Cleanup(wg.Wait) // after the Shutdowns below (cleanups are LIFO)
	for _, srv := range []*dns.Server{{PacketConn: pc, Handler: h}, {Listener: ln, Handler: h}} {
		started := make(chan struct{})
		srv.NotifyStartedFunc = func() { close(started) }
		wg.Add(1)
		go func() { defer wg.Done(); _ = srv.ActivateAndServe() }()
		<-started
		t.Cleanup(func() { _ = srv.Shutdown() })
	}
	return pc.LocalAddr().String()
}

// query asks server from inside ns.
func query(t *testing.T, ns netns.NsHandle, network, server, name string, qtype uint16) *dns.Msg {
	t.Helper()
	var resp *dns.Msg
	inside(t, ns, func() (err error) {
		m := new(dns.Msg)
		m.SetQuestion(dns.Fqdn(name), qtype)
		c := &dns.Client{Net: network, Timeout: okTimeout}
		resp, _, err = c.Exchange(m, server)
		return err
	})
	return resp
}

func answerA(m *dns.Msg) []string {
	var out []string
	for _, rr := range m.Answer {
		if a, ok := rr.(*dns.A); ok {
			out = append(out, a.A.String())
		}
	}
	return out
}

// TestDNS runs the DNS server on the gateway through the real firewall and
// queries it from VM namespaces.
func TestDNS(t *testing.T) {
	e := newEnv(t, testConfig())
	a1 := e.addVM("alice-1", "alice", 0, false)
	a2 := e.addVM("alice-2", "alice", 1, false)
	b1 := e.addVM("bob-1", "bob", 2, false)
	upstream := fakeUpstream(t, e.host)

	var mu sync.Mutex
	addrs := map[string]netip.Addr{} // overrides, to move a VM
	res := ResolverFunc(func(ctx context.Context, asker netip.Addr, name string) (netip.Addr, bool) {
		mu.Lock()
		defer mu.Unlock()
		var askerOwner string
		for _, vm := range e.vms {
			if vm.v.IP == asker {
				askerOwner = vm.v.Owner
			}
		}
		vm, ok := e.vms[name]
		if !ok || askerOwner == "" || vm.v.Owner != askerOwner {
			return netip.Addr{}, false
		}
		if a, ok := addrs[name]; ok {
			return a, true
		}
		return vm.v.IP, true
	})
	if _, err := e.m.StartDNS(context.Background(), res, DNSOptions{Upstreams: []string{upstream}}); err != nil {
		t.Fatalf("StartDNS: %v", err)
	}
	server := hostPort(e.cfg.Gateway(), int(e.cfg.DNSPort))

	for _, network := range []string{"udp", "tcp"} {
		t.Run(network, func(t *testing.T) {
			r := query(t, a1.ns, network, server, "alice-2.noid", dns.TypeA)
			if got := answerA(r); len(got) != 1 || got[0] != a2.v.IP.String() || r.Rcode != dns.RcodeSuccess {
				t.Errorf("alice-1 asks alice-2.noid: rcode %s answers %v, want %s", dns.RcodeToString[r.Rcode], got, a2.v.IP)
			}
			r = query(t, a1.ns, network, server, "ALICE-2.noid.", dns.TypeA)
			if got := answerA(r); len(got) != 1 || got[0] != a2.v.IP.String() {
				t.Errorf("names are case-insensitive: got %v", got)
			}
			r = query(t, b1.ns, network, server, "alice-2.noid", dns.TypeA)
			if r.Rcode != dns.RcodeNameError || len(r.Answer) != 0 {
				t.Errorf("bob-1 asks alice-2.noid: rcode %s answers %v, want NXDOMAIN", dns.RcodeToString[r.Rcode], r.Answer)
			}
			r = query(t, a1.ns, network, server, "bob-1.noid", dns.TypeA)
			if r.Rcode != dns.RcodeNameError {
				t.Errorf("alice-1 asks bob-1.noid: rcode %s, want NXDOMAIN", dns.RcodeToString[r.Rcode])
			}
			r = query(t, a1.ns, network, server, "nosuchvm.noid", dns.TypeA)
			if r.Rcode != dns.RcodeNameError {
				t.Errorf("unknown .noid name: rcode %s, want NXDOMAIN", dns.RcodeToString[r.Rcode])
			}
			r = query(t, a1.ns, network, server, "alice-2.noid", dns.TypeAAAA)
			if r.Rcode != dns.RcodeSuccess || len(r.Answer) != 0 {
				t.Errorf("AAAA of an existing VM: rcode %s answers %v, want NOERROR and no data", dns.RcodeToString[r.Rcode], r.Answer)
			}
			r = query(t, a1.ns, network, server, "example.com", dns.TypeA)
			if got := answerA(r); len(got) != 1 || got[0] != "192.0.2.7" {
				t.Errorf("forwarded example.com: rcode %s answers %v, want 192.0.2.7", dns.RcodeToString[r.Rcode], got)
			}
			r = query(t, a1.ns, network, server, "nxdomain.example", dns.TypeA)
			if r.Rcode != dns.RcodeNameError {
				t.Errorf("forwarded NXDOMAIN: rcode %s", dns.RcodeToString[r.Rcode])
			}
		})
	}

	t.Run("big answers: truncated over UDP, whole over TCP", func(t *testing.T) {
		r := query(t, a1.ns, "udp", server, "big.example", dns.TypeTXT)
		if !r.Truncated {
			t.Errorf("UDP answer of %d records not truncated", len(r.Answer))
		}
		r = query(t, a1.ns, "tcp", server, "big.example", dns.TypeTXT)
		if r.Truncated || len(r.Answer) != 20 {
			t.Errorf("TCP answer: truncated=%v records=%d, want 20", r.Truncated, len(r.Answer))
		}
	})

	t.Run("records follow moves at once", func(t *testing.T) {
		moved, _ := e.cfg.NthHost(77)
		mu.Lock()
		addrs["alice-2"] = moved
		mu.Unlock()
		r := query(t, a1.ns, "udp", server, "alice-2.noid", dns.TypeA)
		if got := answerA(r); len(got) != 1 || got[0] != moved.String() {
			t.Errorf("after a move: %v, want %s", got, moved)
		}
		if len(r.Answer) == 1 && r.Answer[0].Header().Ttl != 0 {
			t.Errorf("TTL %d, want 0", r.Answer[0].Header().Ttl)
		}
	})

	t.Run("dead upstream gives SERVFAIL", func(t *testing.T) {
		// A second server whose only upstream refuses.
		s, err := NewDNSServer(res, DNSOptions{Upstreams: []string{"127.0.0.1:1"}}, testLogger(t))
		if err != nil {
			t.Fatal(err)
		}
		s.dial = nsDialer(e.host)
		var pc net.PacketConn
		inside(t, e.host, func() (err error) {
			pc, err = net.ListenPacket("udp4", "127.0.0.1:0")
			return err
		})
		if err := s.Serve(pc, nil); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		r := query(t, e.host, "udp", pc.LocalAddr().String(), "example.com", dns.TypeA)
		if r.Rcode != dns.RcodeServerFailure {
			t.Errorf("rcode %s, want SERVFAIL", dns.RcodeToString[r.Rcode])
		}
	})

	t.Run("VMs reach no other port of the gateway over UDP", func(t *testing.T) {
		// The same DNS server, on a port the firewall does not open.
		s, err := NewDNSServer(res, DNSOptions{Upstreams: []string{upstream}}, testLogger(t))
		if err != nil {
			t.Fatal(err)
		}
		s.dial = nsDialer(e.host)
		var pc net.PacketConn
		inside(t, e.host, func() (err error) {
			pc, err = net.ListenPacket("udp4", hostPort(e.cfg.Gateway(), 5354))
			return err
		})
		if err := s.Serve(pc, nil); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		r := query(t, e.host, "udp", pc.LocalAddr().String(), "example.com", dns.TypeA)
		if len(answerA(r)) != 1 {
			t.Fatalf("control: the host itself gets no answer on :5354")
		}
		err = inNS(a1.ns, func() error {
			m := new(dns.Msg)
			m.SetQuestion("example.com.", dns.TypeA)
			_, _, err := (&dns.Client{Net: "udp", Timeout: blockedTimeout}).Exchange(m, pc.LocalAddr().String())
			return err
		})
		if err == nil {
			t.Errorf("a VM got an answer from gateway:5354, which the firewall should drop")
		}
	})
}

// TestResolverAnswersOnlyItsDomain checks the local/forward split without
// any network: names outside the domain never reach the Resolver.
func TestResolverAnswersOnlyItsDomain(t *testing.T) {
	var asked []string
	res := ResolverFunc(func(ctx context.Context, asker netip.Addr, name string) (netip.Addr, bool) {
		asked = append(asked, name)
		return netip.MustParseAddr("172.16.0.9"), true
	})
	s, err := NewDNSServer(res, DNSOptions{Domain: "noid.", Upstreams: []string{}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"web.noid.", "x.example.", "noid.example.", "webnoid."} {
		w := &recorder{}
		m := new(dns.Msg)
		m.SetQuestion(name, dns.TypeA)
		s.handle(w, m)
		if w.msg == nil {
			t.Fatalf("%s: no reply", name)
		}
	}
	if len(asked) != 1 || asked[0] != "web" {
		t.Errorf("Resolver was asked %v, want only [web]", asked)
	}
}

type recorder struct {
	dns.ResponseWriter
	msg *dns.Msg
}

func (r *recorder) RemoteAddr() net.Addr        { return &net.UDPAddr{IP: net.IPv4(172, 16, 0, 2), Port: 999} }
func (r *recorder) WriteMsg(m *dns.Msg) error   { r.msg = m; return nil }
func (r *recorder) LocalAddr() net.Addr         { return &net.UDPAddr{} }
func (r *recorder) Write(b []byte) (int, error) { return len(b), nil }
func (r *recorder) Close() error                { return nil }
func (r *recorder) TsigStatus() error           { return nil }
func (r *recorder) TsigTimersOnly(bool)         {}
func (r *recorder) Hijack()                     {}
