package guest

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/noid-vm/noid/internal/agent/proto"
)

// NetState is the IPv4 configuration of a network interface.
type NetState struct {
	// MAC is the hardware address, lower case ("02:00:00:00:00:01").
	MAC string
	// IPv4 lists the interface's IPv4 addresses in CIDR form.
	IPv4 []string
	// Gateway is the IPv4 default route's gateway via this interface, or "".
	Gateway string
}

// System performs the privileged operations behind sync. LinuxSystem is the
// real one; tests use a fake.
type System interface {
	// Now returns the current CLOCK_REALTIME.
	Now() time.Time
	// SetClock sets CLOCK_REALTIME.
	SetClock(t time.Time) error
	// AddEntropy mixes seed into the kernel's entropy pool, crediting it.
	AddEntropy(seed []byte) error
	// ReseedCRNG forces the kernel CRNG to reseed from the pool now.
	ReseedCRNG() error
	// Hostname returns the kernel hostname.
	Hostname() (string, error)
	// SetHostname sets the kernel hostname.
	SetHostname(name string) error
	// NetState returns the configuration of interface ifname.
	NetState(ifname string) (NetState, error)
	// SetMAC changes the hardware address of ifname.
	SetMAC(ifname, mac string) error
	// SetIPv4 makes cidr the only IPv4 address of ifname and brings it up.
	SetIPv4(ifname, cidr string) error
	// SetGateway makes gw the IPv4 default route via ifname.
	SetGateway(ifname, gw string) error
}

// netIf is the interface identities apply to.
const netIf = "eth0"

// runSync handles a sync stream.
func (s *session) runSync(h *handler, req proto.Sync) {
	res := s.a.applySync(req)
	e := proto.Exit{Result: proto.Marshal(res)}
	if len(res.Errors) > 0 {
		e.Code = 1
		e.Error = strings.Join(res.Errors, "; ")
	}
	s.finish(h, e)
}

// applySync performs a sync request and reports what it did.
func (a *Agent) applySync(req proto.Sync) proto.SyncResult {
	var res proto.SyncResult
	sys := a.sys
	start := time.Now()
	fail := func(format string, args ...any) {
		res.Errors = append(res.Errors, fmt.Sprintf(format, args...))
	}
	res.StepsUS = map[string]int64{}
	mark := time.Now()
	lap := func(name string) {
		now := time.Now()
		res.StepsUS[name] += now.Sub(mark).Microseconds()
		mark = now
	}
	if req.TimeUnixNano != 0 {
		want := time.Unix(0, req.TimeUnixNano)
		delta := want.Sub(sys.Now())
		if err := sys.SetClock(want); err != nil {
			fail("setting clock: %v", err)
		} else {
			res.ClockSet, res.ClockStepNS = true, int64(delta)
		}
	}
	lap("clock")
	if len(req.Entropy) > 0 {
		if err := sys.AddEntropy(req.Entropy); err != nil {
			fail("adding entropy: %v", err)
		} else {
			res.EntropyBytes = len(req.Entropy)
			if err := sys.ReseedCRNG(); err != nil {
				fail("reseeding CRNG: %v", err)
			} else {
				res.Reseeded = true
			}
		}
	}
	lap("entropy")
	if id := req.Identity; id != nil {
		a.applyIdentity(*id, &res, fail, lap)
	}
	a.log.Info("sync", "took", time.Since(start).Round(10*time.Microsecond), "clock_step", time.Duration(res.ClockStepNS).Round(time.Millisecond), "entropy_bytes", res.EntropyBytes,
		"reseeded", res.Reseeded, "changed", strings.Join(res.Changed, ","), "errors", len(res.Errors), "steps_us", res.StepsUS)
	return res
}

// applyIdentity applies the parts of id that differ from the guest's, and
// calls lap after each step with its name.
func (a *Agent) applyIdentity(id proto.Identity, res *proto.SyncResult, fail func(string, ...any), lap func(string)) {
	sys := a.sys
	writeIfChanged := writeIfChanged
	if d, ok := sys.(interface{ Disabled() bool }); ok && d.Disabled() {
		writeIfChanged = func(string, []byte) (bool, error) { return false, ErrSyncDisabled }
	}
	changed := func(what string) { res.Changed = append(res.Changed, what) }
	if id.Hostname != "" {
		if cur, err := sys.Hostname(); err != nil || cur != id.Hostname {
			if err := sys.SetHostname(id.Hostname); err != nil {
				fail("setting hostname: %v", err)
			} else {
				changed("hostname")
			}
		}
		if ok, err := writeIfChanged(filepath.Join(a.cfg.EtcDir, "hostname"), []byte(id.Hostname+"\n")); err != nil {
			fail("writing hostname file: %v", err)
		} else if ok && !slices.Contains(res.Changed, "hostname") {
			changed("hostname")
		}
		lap("hostname")
	}
	var ip string
	if id.IPv4 != "" {
		addr, _, err := net.ParseCIDR(id.IPv4)
		if err != nil || addr.To4() == nil {
			fail("bad ipv4 %q: want address/prefix", id.IPv4)
		} else {
			ip = addr.String()
		}
	}
	if id.Hostname != "" {
		hostsPath := filepath.Join(a.cfg.EtcDir, "hosts")
		old, _ := os.ReadFile(hostsPath)
		if ok, err := writeIfChanged(hostsPath, hostsWithIdentity(old, id.Hostname, ip)); err != nil {
			fail("writing hosts file: %v", err)
		} else if ok {
			changed("hosts")
		}
		lap("hosts")
	}
	if id.MAC != "" || ip != "" || id.Gateway != "" {
		cur, err := sys.NetState(netIf)
		lap("net.read")
		if err != nil {
			fail("reading %s: %v", netIf, err)
		} else {
			if id.MAC != "" {
				hw, err := net.ParseMAC(id.MAC)
				if err != nil {
					fail("bad mac %q: %v", id.MAC, err)
				} else if !strings.EqualFold(hw.String(), cur.MAC) {
					if err := sys.SetMAC(netIf, hw.String()); err != nil {
						fail("setting mac: %v", err)
					} else {
						changed("mac")
					}
				}
			}
			lap("net.mac")
			if ip != "" && !(len(cur.IPv4) == 1 && sameCIDR(cur.IPv4[0], id.IPv4)) {
				if err := sys.SetIPv4(netIf, id.IPv4); err != nil {
					fail("setting ipv4: %v", err)
				} else {
					changed("ipv4")
				}
			}
			lap("net.ipv4")
			if id.Gateway != "" {
				gw := net.ParseIP(id.Gateway)
				if gw == nil || gw.To4() == nil {
					fail("bad gateway %q", id.Gateway)
				} else if cur.Gateway != gw.String() || slices.Contains(res.Changed, "ipv4") || slices.Contains(res.Changed, "mac") {
					// A new address or a bounced link loses the route.
					if err := sys.SetGateway(netIf, gw.String()); err != nil {
						fail("setting gateway: %v", err)
					} else if cur.Gateway != gw.String() {
						changed("gateway")
					}
				}
			}
			lap("net.gateway")
			if ip != "" && (slices.Contains(res.Changed, "ipv4") || slices.Contains(res.Changed, "mac")) {
				a.announce(ip)
			}
			lap("net.announce")
		}
	}
	if len(id.DNS) > 0 {
		var b bytes.Buffer
		b.WriteString("# written by noid-agent\n")
		for _, ns := range id.DNS {
			if net.ParseIP(ns) == nil {
				fail("bad dns server %q", ns)
				continue
			}
			fmt.Fprintf(&b, "nameserver %s\n", ns)
		}
		if ok, err := writeIfChanged(filepath.Join(a.cfg.EtcDir, "resolv.conf"), b.Bytes()); err != nil {
			fail("writing resolv.conf: %v", err)
		} else if ok {
			changed("dns")
		}
		lap("dns")
	}
}

// Announcer is implemented by Systems that can announce an address on the
// link (LinuxSystem does, with gratuitous ARP).
type Announcer interface {
	// AnnounceIPv4 tells the link's neighbours that ip is now at ifname's
	// MAC address. It returns ErrLinkNotUp, having sent nothing, while the
	// link has no carrier yet.
	AnnounceIPv4(ifname, ip string) error
}

// ErrLinkNotUp is returned by Announcer.AnnounceIPv4 while the link has no
// carrier.
var ErrLinkNotUp = errors.New("the link has no carrier yet")

// Announce retries of a link that is not up yet: every announceRetry, for
// up to announceWait.
const (
	announceRetry = 20 * time.Millisecond
	announceWait  = 2 * time.Second
)

// announce tells the host and the peer VMs that ip has moved to this
// guest's MAC. A clone or a new VM often gets the address of a VM that was
// just destroyed, and without it they would keep sending to that VM's MAC
// until their ARP entries go stale (seconds). Failing is not an error of
// the sync: the neighbours then learn the new MAC the slow way. A link
// without its carrier yet gets the announcement from the background once
// it has one, and the sync does not wait for it. The host's own neighbour
// entry does not depend on it: the server forgets the address's old entry
// when it hands the address out.
func (a *Agent) announce(ip string) {
	an, ok := a.sys.(Announcer)
	if !ok {
		return
	}
	err := an.AnnounceIPv4(netIf, ip)
	if errors.Is(err, ErrLinkNotUp) {
		go func() {
			deadline := time.Now().Add(announceWait)
			for errors.Is(err, ErrLinkNotUp) && time.Now().Before(deadline) {
				time.Sleep(announceRetry)
				err = an.AnnounceIPv4(netIf, ip)
			}
			if err != nil {
				a.log.Warn("announcing the new address", "ip", ip, "err", err)
			}
		}()
		return
	}
	if err != nil {
		a.log.Warn("announcing the new address", "ip", ip, "err", err)
	}
}

// sameCIDR compares two address/prefix strings after normalisation.
func sameCIDR(a, b string) bool {
	ia, na, err1 := net.ParseCIDR(a)
	ib, nb, err2 := net.ParseCIDR(b)
	if err1 != nil || err2 != nil {
		return false
	}
	sa, _ := na.Mask.Size()
	sb, _ := nb.Mask.Size()
	return ia.Equal(ib) && sa == sb
}

// hostsMarker tags the /etc/hosts line the agent manages.
const hostsMarker = "# noid"

// hostsWithIdentity returns the hosts file old with the agent's line for
// hostname replaced (or added), mapping it to ip (or 127.0.1.1).
func hostsWithIdentity(old []byte, hostname, ip string) []byte {
	if ip == "" {
		ip = "127.0.1.1"
	}
	var b bytes.Buffer
	if len(bytes.TrimSpace(old)) == 0 {
		b.WriteString("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n")
	}
	for _, line := range strings.SplitAfter(string(old), "\n") {
		if line == "" || strings.HasSuffix(strings.TrimRight(line, "\n"), hostsMarker) {
			continue
		}
		b.WriteString(line)
		if !strings.HasSuffix(line, "\n") {
			b.WriteByte('\n')
		}
	}
	fmt.Fprintf(&b, "%s\t%s %s\n", ip, hostname, hostsMarker)
	return b.Bytes()
}

// writeIfChanged atomically replaces path with data unless it already holds
// exactly that. A symlink at path is replaced by a regular file. A file
// mounted over path (init binds /etc/hostname and /etc/hosts from /run, see
// BindEtcFiles) cannot be renamed over, and is written in place. It reports
// whether it wrote.
func writeIfChanged(path string, data []byte) (bool, error) {
	if old, err := os.ReadFile(path); err == nil && bytes.Equal(old, data) {
		if fi, err := os.Lstat(path); err == nil && fi.Mode().IsRegular() {
			return false, nil
		}
	}
	if mountedFile(path) {
		if err := os.WriteFile(path, data, 0o644); err != nil {
			return false, err
		}
		return true, nil
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return false, err
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return false, err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return false, err
	}
	if err := tmp.Chmod(0o644); err != nil {
		tmp.Close()
		return false, err
	}
	if err := tmp.Close(); err != nil {
		return false, err
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return false, err
	}
	return true, nil
}

// mountedFile reports whether path is a regular file on another filesystem
// than its directory: a file mounted over it.
func mountedFile(path string) bool {
	var f, d syscall.Stat_t
	if syscall.Lstat(path, &f) != nil || f.Mode&syscall.S_IFMT != syscall.S_IFREG {
		return false
	}
	if syscall.Stat(filepath.Dir(path), &d) != nil {
		return false
	}
	return f.Dev != d.Dev
}
