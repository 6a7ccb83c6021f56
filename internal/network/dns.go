package network

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"time"

	"github.com/miekg/dns"
)

// Resolver answers "<name>.noid" for the DNS server. The server supplies
// it from its database, so answers follow creates, restores, clones and
// destroys at once.
type Resolver interface {
	// LookupVM returns the current IP of the VM called name that belongs to
	// the same owner as the VM whose address is asker, and false if there is
	// none (no such VM, another owner's VM, or asker is no VM). name is
	// lower-case and has the domain removed ("web" for "web.noid.").
	LookupVM(ctx context.Context, asker netip.Addr, name string) (netip.Addr, bool)
}

// ResolverFunc adapts a function to the Resolver interface.
type ResolverFunc func(ctx context.Context, asker netip.Addr, name string) (netip.Addr, bool)

// LookupVM calls f.
func (f ResolverFunc) LookupVM(ctx context.Context, asker netip.Addr, name string) (netip.Addr, bool) {
	return f(ctx, asker, name)
}

// DNSOptions configures a DNSServer. The zero value is usable.
type DNSOptions struct {
	// Domain is the zone answered locally; default "noid".
	Domain string
	// Upstreams are the "host:port" servers everything else is forwarded
	// to, tried in order. Nil means the nameservers of ResolvConf, read
	// when the server is created. Loopback upstreams are fine: the host
	// forwards, not the VM.
	Upstreams []string
	// ResolvConf is read when Upstreams is nil; default /etc/resolv.conf.
	ResolvConf string
	// Timeout bounds each forwarding attempt and each Resolver call;
	// default 2s.
	Timeout time.Duration
	// TTL of local answers in seconds; default 0, so guests never cache an
	// address that a restore or destroy is about to change.
	TTL uint32
	// Rate is how many queries per second one source address (one VM) may
	// send, over UDP and TCP together, with bursts of twice that; more are
	// dropped (UDP) or refused (TCP). Default DefaultDNSRate.
	Rate float64
	// Concurrency bounds the work of all sources together: at most this
	// many UDP queries are answered at once (each may hold a socket to an
	// upstream for up to Timeout per upstream) and at most this many TCP
	// connections are open; one source gets at most a quarter of either.
	// What does not fit is dropped (UDP) or closed (TCP). Default
	// DefaultDNSConcurrency.
	Concurrency int
}

// Defaults of DNSOptions.Rate and DNSOptions.Concurrency.
const (
	DefaultDNSRate        = 100
	DefaultDNSConcurrency = 64
)

// DNSServer answers "<vm>.<Domain>" A queries through a Resolver, scoped
// to the asking VM's owner, returns NXDOMAIN for unknown names of that
// domain, and forwards every other query to the upstream resolvers.
type DNSServer struct {
	res       Resolver
	zone      string // "noid."
	upstreams []string
	timeout   time.Duration
	ttl       uint32
	log       *slog.Logger
	dial      func(ctx context.Context, network, addr string) (net.Conn, error)

	ctx    context.Context // cancelled by Close
	cancel context.CancelFunc

	// limits admits queries and TCP connections per source; busy bounds
	// the UDP queries being answered.
	limits *sourceLimiter
	busy   chan struct{}

	mu      sync.Mutex
	servers []*dns.Server
	pcs     []net.PacketConn
	wg      sync.WaitGroup
	closed  bool
	self    []string
}

// NewDNSServer returns a DNS server that is not serving yet; see Serve, or
// Manager.StartDNS which also opens the sockets.
func NewDNSServer(r Resolver, opts DNSOptions, logger *slog.Logger) (*DNSServer, error) {
	if r == nil {
		return nil, errors.New("dns: nil Resolver")
	}
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	domain := strings.Trim(strings.ToLower(opts.Domain), ".")
	if domain == "" {
		domain = "noid"
	}
	if _, ok := dns.IsDomainName(domain); !ok {
		return nil, fmt.Errorf("dns: bad domain %q", opts.Domain)
	}
	s := &DNSServer{
		res:     r,
		zone:    domain + ".",
		timeout: opts.Timeout,
		ttl:     opts.TTL,
		log:     logger.With("component", "dns"),
	}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	if s.timeout <= 0 {
		s.timeout = 2 * time.Second
	}
	rate, conc := opts.Rate, opts.Concurrency
	if rate <= 0 {
		rate = DefaultDNSRate
	}
	if conc <= 0 {
		conc = DefaultDNSConcurrency
	}
	s.limits = newSourceLimiter(rate, conc)
	s.busy = make(chan struct{}, conc)
	var d net.Dialer
	s.dial = d.DialContext
	s.upstreams = opts.Upstreams
	if s.upstreams == nil {
		path := opts.ResolvConf
		if path == "" {
			path = "/etc/resolv.conf"
		}
		cc, err := dns.ClientConfigFromFile(path)
		if err != nil {
			s.log.Warn("no upstream resolvers: only local names will resolve", "resolv_conf", path, "err", err)
		} else {
			for _, h := range cc.Servers {
				s.upstreams = append(s.upstreams, net.JoinHostPort(h, cc.Port))
			}
		}
	}
	return s, nil
}

// Serve starts answering on pc (UDP) and ln (TCP); either may be nil. It
// returns once both are serving. The sockets are closed by Close.
func (s *DNSServer) Serve(pc net.PacketConn, ln net.Listener) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return errors.New("dns: server closed")
	}
	// Our own addresses are never upstreams (no forwarding loops). Set
	// before any handler can run.
	if pc != nil {
		s.self = append(s.self, pc.LocalAddr().String())
	}
	if ln != nil {
		s.self = append(s.self, ln.Addr().String())
	}
	h := dns.HandlerFunc(s.handle)
	var started []chan error
	start := func(srv *dns.Server) {
		ch := make(chan error, 1)
		srv.NotifyStartedFunc = func() { ch <- nil }
		srv.Handler = h
		s.servers = append(s.servers, srv)
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			if err := srv.ActivateAndServe(); err != nil {
				select {
				case ch <- err:
				default:
				}
			}
		}()
		started = append(started, ch)
	}
	if pc != nil {
		s.pcs = append(s.pcs, pc)
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			s.serveUDP(pc)
		}()
	}
	if ln != nil {
		start(&dns.Server{Listener: &limitListener{Listener: ln, limits: s.limits}, Net: "tcp"})
	}
	var errs []error
	for _, ch := range started {
		if err := <-ch; err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Close stops the server and closes its sockets. It is safe to call more
// than once.
func (s *DNSServer) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	servers, pcs := s.servers, s.pcs
	s.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var errs []error
	s.cancel()
	for _, pc := range pcs {
		pc.Close()
	}
	for _, srv := range servers {
		if err := srv.ShutdownContext(ctx); err != nil && !strings.Contains(err.Error(), "not started") {
			errs = append(errs, err)
		}
	}
	s.wg.Wait()
	return errors.Join(errs...)
}

func askerOf(w dns.ResponseWriter) (netip.Addr, bool) {
	switch a := w.RemoteAddr().(type) {
	case *net.UDPAddr:
		ap := a.AddrPort()
		return ap.Addr().Unmap(), true
	case *net.TCPAddr:
		ap := a.AddrPort()
		return ap.Addr().Unmap(), false
	}
	return netip.Addr{}, false
}

// serveUDP reads queries from pc until it is closed. One goroutine reads;
// a query its source may send (see sourceLimiter) is answered by a
// goroutine of its own while fewer than Concurrency are busy, and dropped
// otherwise, so a flood costs neither goroutines nor upstream sockets
// beyond those bounds.
func (s *DNSServer) serveUDP(pc net.PacketConn) {
	var wg sync.WaitGroup
	defer wg.Wait()
	buf := make([]byte, dns.MaxMsgSize)
	for {
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			if !errors.Is(err, net.ErrClosed) {
				s.log.Warn("dns: stopped serving udp", "addr", pc.LocalAddr().String(), "err", err)
			}
			return
		}
		ua, ok := from.(*net.UDPAddr)
		if !ok || n < 12 || buf[2]&0x80 != 0 { // too short for a header, or a response
			continue
		}
		src := ua.AddrPort().Addr().Unmap()
		if !s.limits.admit(src) {
			continue
		}
		select {
		case s.busy <- struct{}{}:
		default:
			s.limits.done(src)
			continue
		}
		b := append([]byte(nil), buf[:n]...)
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-s.busy }()
			defer s.limits.done(src)
			req := new(dns.Msg)
			if req.Unpack(b) != nil {
				return
			}
			if out, err := s.answer(src, true, req).Pack(); err == nil {
				_, _ = pc.WriteTo(out, from)
			}
		}()
	}
}

// handle answers one query of a TCP connection (the miekg/dns handler).
func (s *DNSServer) handle(w dns.ResponseWriter, req *dns.Msg) {
	asker, udp := askerOf(w)
	if !s.limits.admit(asker) {
		resp := new(dns.Msg)
		resp.SetRcode(req, dns.RcodeRefused)
		_ = w.WriteMsg(resp)
		return
	}
	defer s.limits.done(asker)
	_ = w.WriteMsg(s.answer(asker, udp, req))
}

// answer returns the reply to req from asker, over UDP or TCP.
func (s *DNSServer) answer(asker netip.Addr, udp bool, req *dns.Msg) *dns.Msg {
	ctx := s.ctx
	if req.Opcode != dns.OpcodeQuery || len(req.Question) != 1 {
		resp := new(dns.Msg)
		resp.SetRcode(req, dns.RcodeNotImplemented)
		if len(req.Question) != 1 {
			resp.SetRcode(req, dns.RcodeFormatError)
		}
		return resp
	}
	q := req.Question[0]
	name := strings.ToLower(q.Name)
	if name == s.zone || strings.HasSuffix(name, "."+s.zone) {
		return s.answerLocal(ctx, asker, req, name)
	}
	resp := s.forward(ctx, req)
	if resp == nil {
		resp = new(dns.Msg)
		resp.SetRcode(req, dns.RcodeServerFailure)
		resp.RecursionAvailable = true
	}
	resp.Id = req.Id
	if udp {
		resp.Truncate(udpSize(req))
	}
	return resp
}

func udpSize(req *dns.Msg) int {
	if o := req.IsEdns0(); o != nil && int(o.UDPSize()) > dns.MinMsgSize {
		return int(o.UDPSize())
	}
	return dns.MinMsgSize
}

func (s *DNSServer) soa() dns.RR {
	return &dns.SOA{
		Hdr: dns.RR_Header{Name: s.zone, Rrtype: dns.TypeSOA, Class: dns.ClassINET, Ttl: s.ttl},
		Ns:  "ns." + s.zone, Mbox: "hostmaster." + s.zone,
		Serial: 1, Refresh: 3600, Retry: 600, Expire: 86400, Minttl: s.ttl,
	}
}

func (s *DNSServer) answerLocal(ctx context.Context, asker netip.Addr, req *dns.Msg, name string) *dns.Msg {
	q := req.Question[0]
	resp := new(dns.Msg)
	resp.SetReply(req)
	resp.Authoritative = true
	resp.RecursionAvailable = true
	if o := req.IsEdns0(); o != nil {
		resp.SetEdns0(o.UDPSize(), false)
	}
	if name == s.zone {
		if q.Qtype == dns.TypeSOA {
			resp.Answer = append(resp.Answer, s.soa())
		} else {
			resp.Ns = append(resp.Ns, s.soa())
		}
		return resp
	}
	vm := strings.TrimSuffix(name, "."+s.zone)
	lctx, cancel := context.WithTimeout(ctx, s.timeout)
	ip, ok := s.res.LookupVM(lctx, asker, vm)
	cancel()
	if !ok || !ip.Is4() {
		resp.Rcode = dns.RcodeNameError
		resp.Ns = append(resp.Ns, s.soa())
		return resp
	}
	if q.Qclass == dns.ClassINET || q.Qclass == dns.ClassANY {
		if q.Qtype == dns.TypeA || q.Qtype == dns.TypeANY {
			resp.Answer = append(resp.Answer, &dns.A{
				Hdr: dns.RR_Header{Name: q.Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: s.ttl},
				A:   ip.AsSlice(),
			})
			return resp
		}
	}
	resp.Ns = append(resp.Ns, s.soa()) // NODATA: the name exists, not this type
	return resp
}

// forward tries each upstream in turn (UDP, then TCP if the answer was
// truncated) and returns the first answer, or nil.
func (s *DNSServer) forward(ctx context.Context, req *dns.Msg) *dns.Msg {
	q := req.Copy()
	for _, up := range s.upstreams {
		if s.isSelf(up) {
			continue
		}
		resp, err := s.exchange(ctx, "udp", up, q)
		if err == nil && resp.Truncated {
			resp, err = s.exchange(ctx, "tcp", up, q)
		}
		if err != nil {
			s.log.Debug("upstream failed", "upstream", up, "err", err)
			if ctx.Err() != nil {
				return nil
			}
			continue
		}
		return resp
	}
	return nil
}

func (s *DNSServer) isSelf(up string) bool {
	for _, a := range s.self {
		if a == up {
			return true
		}
	}
	return false
}

func (s *DNSServer) exchange(ctx context.Context, network, up string, q *dns.Msg) (*dns.Msg, error) {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	c, err := s.dial(ctx, network, up)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	cl := &dns.Client{Net: network, Timeout: s.timeout}
	resp, _, err := cl.ExchangeWithConnContext(ctx, q, &dns.Conn{Conn: c})
	return resp, err
}

// StartDNS opens UDP and TCP sockets on the gateway address and
// Config.DNSPort (in the Manager's namespace) and serves DNS on them with
// r; forwarded queries also leave from that namespace. Setup must have run
// (the gateway address must exist). Close (or Teardown) stops the server;
// so does the returned DNSServer's own Close.
func (m *Manager) StartDNS(ctx context.Context, r Resolver, opts DNSOptions) (*DNSServer, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.usable(ctx); err != nil {
		return nil, err
	}
	s, err := NewDNSServer(r, opts, m.log)
	if err != nil {
		return nil, err
	}
	s.dial = nsDialer(m.ns)
	addr := netip.AddrPortFrom(m.cfg.Gateway(), m.cfg.DNSPort).String()
	var pc net.PacketConn
	var ln net.Listener
	if err := inNS(m.ns, func() error {
		var lc net.ListenConfig
		var err error
		if pc, err = lc.ListenPacket(ctx, "udp4", addr); err != nil {
			return err
		}
		if ln, err = lc.Listen(ctx, "tcp4", addr); err != nil {
			pc.Close()
			return err
		}
		return nil
	}); err != nil {
		return nil, fmt.Errorf("dns: listen on %s: %w", addr, err)
	}
	if err := s.Serve(pc, ln); err != nil {
		_ = s.Close()
		pc.Close()
		ln.Close()
		return nil, err
	}
	m.dns = append(m.dns, s)
	m.log.Info("dns serving", "addr", addr, "upstreams", s.upstreams)
	return s, nil
}
