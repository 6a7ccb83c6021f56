package network

import (
	"context"
	"net"
	"net/netip"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// slowUpstream is an upstream resolver on loopback that answers
// example.com at once and never answers anything else, so every other
// forwarded query holds the forwarder's socket until its timeout. It is a
// single goroutine, so it adds nothing to the counts under test.
func slowUpstream(t *testing.T) string {
	t.Helper()
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	t.Cleanup(func() { pc.Close(); <-done })
	go func() {
		defer close(done)
		buf := make([]byte, 4096)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			req := new(dns.Msg)
			if req.Unpack(buf[:n]) != nil || len(req.Question) != 1 || req.Question[0].Name != "example.com." {
				continue
			}
			m := new(dns.Msg)
			m.SetReply(req)
			rr, _ := dns.NewRR("example.com. 60 IN A 192.0.2.7")
			m.Answer = append(m.Answer, rr)
			if b, err := m.Pack(); err == nil {
				pc.WriteTo(b, from)
			}
		}
	}()
	return pc.LocalAddr().String()
}

// loopbackDNS serves DNS with opts on 127.0.0.1, over UDP or TCP, for a
// resolver that knows no VM.
func loopbackDNS(t *testing.T, opts DNSOptions, udp bool) (net.PacketConn, net.Listener) {
	t.Helper()
	res := ResolverFunc(func(context.Context, netip.Addr, string) (netip.Addr, bool) { return netip.Addr{}, false })
	s, err := NewDNSServer(res, opts, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	var pc net.PacketConn
	var ln net.Listener
	if udp {
		pc, err = net.ListenPacket("udp4", "127.0.0.1:0")
	} else {
		ln, err = net.Listen("tcp4", "127.0.0.1:0")
	}
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Serve(pc, ln); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return pc, ln
}

func openFDs(t *testing.T) int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// TestDNSFloodBounded (issue 18, finding 8): 20 000 queries from one VM,
// each of which an upstream would hold for the forwarder's whole timeout,
// cost the DNS server a bounded number of goroutines and sockets (counted
// while the flood runs), and another VM still resolves meanwhile.
func TestDNSFloodBounded(t *testing.T) {
	pc, _ := loopbackDNS(t, DNSOptions{Upstreams: []string{slowUpstream(t)}}, true)
	server := pc.LocalAddr().(*net.UDPAddr)

	// Count goroutines and fds from now until the flood has been sent (a
	// forwarded query holds its goroutine and socket for 2 s, longer than
	// that takes).
	baseG, baseFD := runtime.NumGoroutine(), openFDs(t)
	var peakG, peakFD atomic.Int64
	stop := make(chan struct{})
	var sampling sync.WaitGroup
	sampling.Add(1)
	go func() {
		defer sampling.Done()
		for {
			if g := int64(runtime.NumGoroutine()); g > peakG.Load() {
				peakG.Store(g)
			}
			if f := int64(openFDs(t)); f > peakFD.Load() {
				peakFD.Store(f)
			}
			select {
			case <-stop:
				return
			case <-time.After(time.Millisecond):
			}
		}
	}()

	// The flooding VM is 127.0.0.2; the well-behaved one 127.0.0.3.
	flood, err := net.DialUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 2)}, server)
	if err != nil {
		t.Fatal(err)
	}
	defer flood.Close()
	q := new(dns.Msg)
	q.SetQuestion("held-by-upstream.example.", dns.TypeA)
	pkt, err := q.Pack()
	if err != nil {
		t.Fatal(err)
	}
	const total = 20000
	var sent atomic.Int64
	halfway := make(chan struct{})
	flooded := make(chan struct{})
	go func() {
		defer close(flooded)
		for i := range total {
			pkt[0], pkt[1] = byte(i>>8), byte(i)
			flood.Write(pkt)
			if sent.Add(1) == total/4 {
				close(halfway)
			}
		}
	}()
	<-halfway
	good := &dns.Client{Net: "udp", Timeout: time.Second, Dialer: &net.Dialer{LocalAddr: &net.UDPAddr{IP: net.IPv4(127, 0, 0, 3)}}}
	m := new(dns.Msg)
	m.SetQuestion("example.com.", dns.TypeA)
	var r *dns.Msg
	for try := 0; try < 5 && r == nil; try++ {
		r, _, err = good.Exchange(m, server.String())
	}
	if r == nil || len(answerA(r)) != 1 || answerA(r)[0] != "192.0.2.7" {
		t.Errorf("a well-behaved VM did not resolve example.com during the flood: %v %v", r, err)
	}
	<-flooded
	close(stop)
	sampling.Wait()
	dg, dfd := peakG.Load()-int64(baseG), peakFD.Load()-int64(baseFD)
	t.Logf("%d queries sent: at most %d more goroutines and %d more fds than before", sent.Load(), dg, dfd)
	if dg > 150 || dfd > 150 {
		t.Errorf("a flood of %d queries took up to %d goroutines and %d fds, want a bound well below 150 each", total, dg, dfd)
	}
}

// TestDNSTCPConnectionsBounded: one source gets at most a quarter of the
// TCP connections; the rest are closed at once, and another source still
// gets in.
func TestDNSTCPConnectionsBounded(t *testing.T) {
	_, ln := loopbackDNS(t, DNSOptions{Upstreams: []string{}, Concurrency: 8}, false)
	ask := func(from net.IP) (*dns.Conn, bool) {
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: from}, Timeout: 5 * time.Second}
		c, err := d.Dial("tcp4", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		dc := &dns.Conn{Conn: c}
		c.SetDeadline(time.Now().Add(5 * time.Second))
		m := new(dns.Msg)
		m.SetQuestion("nothing.noid.", dns.TypeA)
		if err := dc.WriteMsg(m); err != nil {
			return dc, false
		}
		r, err := dc.ReadMsg()
		return dc, err == nil && r.Rcode == dns.RcodeNameError
	}
	answered := 0
	for range 10 {
		c, ok := ask(net.IPv4(127, 0, 0, 2))
		defer c.Close()
		if ok {
			answered++
		}
	}
	if answered != 2 {
		t.Errorf("one source had %d of 10 TCP connections answered, want 2 (a quarter of 8)", answered)
	}
	if c, ok := ask(net.IPv4(127, 0, 0, 3)); !ok {
		t.Errorf("another source was refused")
	} else {
		c.Close()
	}
}

// TestSourceLimiterRate: a source gets its burst at once, then Rate
// queries per second; sources do not share a bucket.
func TestSourceLimiterRate(t *testing.T) {
	l := newSourceLimiter(10, 400)
	now := time.Unix(1000, 0)
	l.now = func() time.Time { return now }
	a, b := netip.MustParseAddr("172.16.0.2"), netip.MustParseAddr("172.16.0.3")
	n := 0
	for l.admit(a) {
		l.done(a)
		n++
	}
	if n != 20 {
		t.Errorf("burst of %d queries, want 20 (twice the rate)", n)
	}
	if !l.admit(b) {
		t.Errorf("another source was refused")
	}
	now = now.Add(500 * time.Millisecond)
	n = 0
	for l.admit(a) {
		l.done(a)
		n++
	}
	if n != 5 {
		t.Errorf("%d queries after half a second, want 5", n)
	}
}
