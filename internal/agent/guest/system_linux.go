package guest

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"time"
	"unsafe"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// LinuxSystem is the real System: it changes the machine it runs on. Only
// the agent inside a VM should use it. The zero value works; NewLinuxSystem
// gives one that keeps its netlink socket open.
type LinuxSystem struct {
	rtnl *netlink.Handle
}

// NewLinuxSystem returns a LinuxSystem with a route netlink socket opened
// in the calling thread's network namespace and kept open. The package
// level netlink functions open and close a socket per request, which
// under TCG cost the guest several milliseconds each.
func NewLinuxSystem() LinuxSystem {
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return LinuxSystem{} // a socket per request
	}
	return LinuxSystem{rtnl: h}
}

// nl returns the netlink handle requests go through.
func (s LinuxSystem) nl() *netlink.Handle {
	if s.rtnl == nil {
		return &netlink.Handle{}
	}
	return s.rtnl
}

// Now returns the current time.
func (LinuxSystem) Now() time.Time { return time.Now() }

// SetClock sets CLOCK_REALTIME with clock_settime.
func (LinuxSystem) SetClock(t time.Time) error {
	ts := unix.NsecToTimespec(t.UnixNano())
	if err := unix.ClockSettime(unix.CLOCK_REALTIME, &ts); err != nil {
		return fmt.Errorf("clock_settime: %w", err)
	}
	return nil
}

// AddEntropy writes seed to the kernel pool with the RNDADDENTROPY ioctl,
// crediting 8 bits per byte.
func (LinuxSystem) AddEntropy(seed []byte) error {
	f, err := os.OpenFile("/dev/urandom", os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	// struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
	buf := make([]byte, 8+len(seed)+3)
	*(*int32)(unsafe.Pointer(&buf[0])) = int32(len(seed) * 8)
	*(*int32)(unsafe.Pointer(&buf[4])) = int32(len(seed))
	copy(buf[8:], seed)
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var ioErr error
	if err := rc.Control(func(fd uintptr) {
		_, _, e := unix.Syscall(unix.SYS_IOCTL, fd, unix.RNDADDENTROPY, uintptr(unsafe.Pointer(&buf[0])))
		if e != 0 {
			ioErr = fmt.Errorf("RNDADDENTROPY: %w", e)
		}
	}); err != nil {
		return err
	}
	return ioErr
}

// ReseedCRNG forces a CRNG reseed with the RNDRESEEDCRNG ioctl.
func (LinuxSystem) ReseedCRNG() error {
	f, err := os.OpenFile("/dev/urandom", os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var ioErr error
	if err := rc.Control(func(fd uintptr) {
		if err := unix.IoctlSetInt(int(fd), unix.RNDRESEEDCRNG, 0); err != nil {
			ioErr = fmt.Errorf("RNDRESEEDCRNG: %w", err)
		}
	}); err != nil {
		return err
	}
	return ioErr
}

// Hostname returns the kernel hostname.
func (LinuxSystem) Hostname() (string, error) {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "", err
	}
	return unix.ByteSliceToString(u.Nodename[:]), nil
}

// SetHostname sets the kernel hostname.
func (LinuxSystem) SetHostname(name string) error {
	if err := unix.Sethostname([]byte(name)); err != nil {
		return fmt.Errorf("sethostname: %w", err)
	}
	return nil
}

// NetState reads ifname's MAC, IPv4 addresses and default gateway.
func (s LinuxSystem) NetState(ifname string) (NetState, error) {
	var st NetState
	link, err := s.nl().LinkByName(ifname)
	if err != nil {
		return st, fmt.Errorf("finding link %s: %w", ifname, err)
	}
	st.MAC = strings.ToLower(link.Attrs().HardwareAddr.String())
	addrs, err := s.nl().AddrList(link, netlink.FAMILY_V4)
	if err != nil {
		return st, fmt.Errorf("listing addresses of %s: %w", ifname, err)
	}
	for _, a := range addrs {
		st.IPv4 = append(st.IPv4, a.IPNet.String())
	}
	routes, err := s.nl().RouteList(link, netlink.FAMILY_V4)
	if err != nil {
		return st, fmt.Errorf("listing routes of %s: %w", ifname, err)
	}
	for _, r := range routes {
		if (r.Dst == nil || r.Dst.IP.IsUnspecified() && isZeroMask(r.Dst.Mask)) && r.Gw != nil {
			st.Gateway = r.Gw.String()
		}
	}
	return st, nil
}

func isZeroMask(m net.IPMask) bool {
	ones, _ := m.Size()
	return ones == 0
}

// SetMAC sets ifname's hardware address, taking the link down and up again.
func (s LinuxSystem) SetMAC(ifname, mac string) error {
	hw, err := net.ParseMAC(mac)
	if err != nil {
		return err
	}
	link, err := s.nl().LinkByName(ifname)
	if err != nil {
		return fmt.Errorf("finding link %s: %w", ifname, err)
	}
	up := link.Attrs().Flags&net.FlagUp != 0
	// virtio-net without the MAC control feature needs the link down.
	if err := s.nl().LinkSetHardwareAddr(link, hw); err != nil {
		if err := s.nl().LinkSetDown(link); err != nil {
			return fmt.Errorf("taking %s down: %w", ifname, err)
		}
		err = s.nl().LinkSetHardwareAddr(link, hw)
		if up {
			if uerr := s.nl().LinkSetUp(link); uerr != nil && err == nil {
				err = uerr
			}
		}
		if err != nil {
			return fmt.Errorf("setting mac of %s: %w", ifname, err)
		}
	}
	return nil
}

// SetIPv4 makes cidr the only IPv4 address of ifname and brings it up.
func (s LinuxSystem) SetIPv4(ifname, cidr string) error {
	link, err := s.nl().LinkByName(ifname)
	if err != nil {
		return fmt.Errorf("finding link %s: %w", ifname, err)
	}
	want, err := netlink.ParseAddr(cidr)
	if err != nil {
		return err
	}
	addrs, err := s.nl().AddrList(link, netlink.FAMILY_V4)
	if err != nil {
		return fmt.Errorf("listing addresses of %s: %w", ifname, err)
	}
	have := false
	for _, a := range addrs {
		if a.IPNet.String() == want.IPNet.String() {
			have = true
			continue
		}
		if err := s.nl().AddrDel(link, &a); err != nil {
			return fmt.Errorf("removing %s from %s: %w", a.IPNet, ifname, err)
		}
	}
	if !have {
		if err := s.nl().AddrAdd(link, want); err != nil && !errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("adding %s to %s: %w", cidr, ifname, err)
		}
	}
	if link.Attrs().Flags&net.FlagUp == 0 {
		if err := s.nl().LinkSetUp(link); err != nil {
			return fmt.Errorf("bringing %s up: %w", ifname, err)
		}
	}
	return nil
}

// SetGateway replaces the IPv4 default route with one via gw on ifname.
func (s LinuxSystem) SetGateway(ifname, gw string) error {
	link, err := s.nl().LinkByName(ifname)
	if err != nil {
		return fmt.Errorf("finding link %s: %w", ifname, err)
	}
	ip := net.ParseIP(gw)
	if ip == nil {
		return fmt.Errorf("bad gateway %q", gw)
	}
	r := &netlink.Route{LinkIndex: link.Attrs().Index, Gw: ip,
		Dst: &net.IPNet{IP: net.IPv4zero, Mask: net.CIDRMask(0, 32)}}
	if err := s.nl().RouteReplace(r); err != nil {
		return fmt.Errorf("setting default route via %s: %w", gw, err)
	}
	return nil
}

// AnnounceIPv4 broadcasts gratuitous ARP for ip from ifname (a request and
// a reply, as arping -U and -A do), so that neighbours holding an entry
// for ip update it to ifname's MAC at once. While the link is down or has
// no carrier, an ARP would be dropped: it sends nothing and returns
// ErrLinkNotUp. The carrier is what counts (IFF_LOWER_UP), not the
// operational state: the kernel sets that from a work queue up to a second
// after a link comes up, and sends meanwhile.
func (s LinuxSystem) AnnounceIPv4(ifname, ip string) error {
	l, err := s.nl().LinkByName(ifname)
	if err != nil {
		return fmt.Errorf("finding link %s: %w", ifname, err)
	}
	attrs := l.Attrs()
	if attrs.RawFlags&unix.IFF_UP == 0 || attrs.RawFlags&unix.IFF_LOWER_UP == 0 {
		return fmt.Errorf("%w: %s is %s, flags %#x", ErrLinkNotUp, ifname, attrs.OperState, attrs.RawFlags)
	}
	ip4 := net.ParseIP(ip).To4()
	if ip4 == nil || len(attrs.HardwareAddr) != 6 {
		return fmt.Errorf("cannot announce %q on %s (mac %s)", ip, ifname, attrs.HardwareAddr)
	}
	proto := htons(unix.ETH_P_ARP)
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, int(proto))
	if err != nil {
		return fmt.Errorf("packet socket: %w", err)
	}
	defer unix.Close(fd)
	to := &unix.SockaddrLinklayer{Protocol: proto, Ifindex: attrs.Index, Halen: 6, Addr: [8]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}}
	for _, op := range []uint16{1, 2} { // request, reply
		pkt := make([]byte, 0, 28)
		pkt = append(pkt, 0, 1, 0x08, 0x00, 6, 4, byte(op>>8), byte(op)) // Ethernet, IPv4
		pkt = append(pkt, attrs.HardwareAddr...)                         // sender MAC
		pkt = append(pkt, ip4...)                                        // sender IP
		if op == 1 {
			pkt = append(pkt, 0, 0, 0, 0, 0, 0) // target MAC: unknown
		} else {
			pkt = append(pkt, attrs.HardwareAddr...)
		}
		pkt = append(pkt, ip4...) // target IP = sender IP: gratuitous
		if err := unix.Sendto(fd, pkt, 0, to); err != nil {
			return fmt.Errorf("sending gratuitous ARP on %s: %w", ifname, err)
		}
	}
	return nil
}

// htons converts v to network byte order, as AF_PACKET wants its protocol.
func htons(v uint16) uint16 {
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], v)
	return binary.NativeEndian.Uint16(b[:])
}

// ErrSyncDisabled is returned by DisabledSystem for every change.
var ErrSyncDisabled = errors.New("sync is disabled: the agent is not init (start it with --sync to allow it)")

// DisabledSystem reports the real state but refuses every change. The agent
// uses it when it is not PID 1, so that running it on a workstation for
// development never changes that machine's clock, RNG or network.
type DisabledSystem struct{ LinuxSystem }

// Disabled tells the agent not to write /etc files either.
func (DisabledSystem) Disabled() bool { return true }

// SetClock refuses.
func (DisabledSystem) SetClock(time.Time) error { return ErrSyncDisabled }

// AddEntropy refuses.
func (DisabledSystem) AddEntropy([]byte) error { return ErrSyncDisabled }

// ReseedCRNG refuses.
func (DisabledSystem) ReseedCRNG() error { return ErrSyncDisabled }

// SetHostname refuses.
func (DisabledSystem) SetHostname(string) error { return ErrSyncDisabled }

// SetMAC refuses.
func (DisabledSystem) SetMAC(string, string) error { return ErrSyncDisabled }

// SetIPv4 refuses.
func (DisabledSystem) SetIPv4(string, string) error { return ErrSyncDisabled }

// SetGateway refuses.
func (DisabledSystem) SetGateway(string, string) error { return ErrSyncDisabled }

// AnnounceIPv4 refuses.
func (DisabledSystem) AnnounceIPv4(string, string) error { return ErrSyncDisabled }
