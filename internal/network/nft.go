package network

import (
	"encoding/binary"
	"net"
	"net/netip"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// The nftables objects noid owns. There are two tables, both named
// TableName:
//
//	table bridge noid  — layer 2, sees every frame a VM port sends:
//	  chain prerouting  anti-spoofing: a VM port may only send its own MAC,
//	                    its own IPv4 source and ARP for itself; nothing but
//	                    IPv4 and ARP (no IPv6, no VLAN tags)
//	  chain forward     VM port → VM port: accepted only for peers, else drop
//
//	table inet noid   — layer 3, sees what is routed or delivered to the host
//	  chain input       VM → host: only DNS to the gateway (and replies);
//	                    outsiders → gateway address: dropped
//	  chain forward     MSS clamping; VM → VM routed through the gateway
//	                    (or bridged, when br_netfilter hands bridged IPv4 to
//	                    the IP hooks): peers only; VM → blocked ranges: drop;
//	                    VM → allowed nets: accept; VM → private ranges
//	                    (RFC 1918, 100.64/10): drop; VM → elsewhere:
//	                    accept; to VMs: replies only
//	  chain output      no ICMP redirects to VMs
//	  chain postrouting masquerade of the pool out of any non-bridge interface
//
// Per-VM state lives only in set elements, so adding or removing a VM is one
// atomic batch of a few elements and the rules never change:
//
//	bridge vm_mac        ifname . ether_addr    the port's only source MAC
//	bridge vm_ip         ifname . ipv4_addr     the port's only source IP
//	bridge peer_group    ifname : mark          port → peer group (owner)
//	bridge peer_member   mark . ifname          group members
//	inet   peer_group    ipv4_addr : mark       address → peer group
//	inet   peer_member   mark . ipv4_addr       group members
//
// A VM takes part in a peer group only if it allows peers; the peer rules
// look up the sender's group and then whether the receiver is a member of
// that same group, so the rule set stays O(1) per packet and O(1) elements
// per VM however many VMs an owner has.
const (
	setVMMAC      = "vm_mac"
	setVMIP       = "vm_ip"
	setPeerGroup  = "peer_group"
	setPeerMember = "peer_member"

	chainPrerouting  = "prerouting"
	chainForward     = "forward"
	chainInput       = "input"
	chainOutput      = "output"
	chainPostrouting = "postrouting"
)

// 32-bit registers (NFT_REG32_00 …). A 16-byte interface name loaded into
// reg00 occupies reg00-reg03.
const (
	reg00 = 8
	reg01 = 9
	reg04 = 12
)

func (m *Manager) bridgeTable() *nftables.Table {
	return &nftables.Table{Name: TableName, Family: nftables.TableFamilyBridge}
}

func (m *Manager) inetTable() *nftables.Table {
	return &nftables.Table{Name: TableName, Family: nftables.TableFamilyINet}
}

// sets returns the named sets of both tables (fresh structs every call).
func (m *Manager) sets() (brMAC, brIP, brGroup, brMember, inGroup, inMember *nftables.Set) {
	bt, it := m.bridgeTable(), m.inetTable()
	brMAC = &nftables.Set{Table: bt, Name: setVMMAC, Concatenation: true,
		KeyType: nftables.MustConcatSetType(nftables.TypeIFName, nftables.TypeEtherAddr)}
	brIP = &nftables.Set{Table: bt, Name: setVMIP, Concatenation: true,
		KeyType: nftables.MustConcatSetType(nftables.TypeIFName, nftables.TypeIPAddr)}
	brGroup = &nftables.Set{Table: bt, Name: setPeerGroup, IsMap: true,
		KeyType: nftables.TypeIFName, DataType: nftables.TypeMark}
	brMember = &nftables.Set{Table: bt, Name: setPeerMember, Concatenation: true,
		KeyType: nftables.MustConcatSetType(nftables.TypeMark, nftables.TypeIFName)}
	inGroup = &nftables.Set{Table: it, Name: setPeerGroup, IsMap: true,
		KeyType: nftables.TypeIPAddr, DataType: nftables.TypeMark}
	inMember = &nftables.Set{Table: it, Name: setPeerMember, Concatenation: true,
		KeyType: nftables.MustConcatSetType(nftables.TypeMark, nftables.TypeIPAddr)}
	return
}

func (m *Manager) allSets() []*nftables.Set {
	a, b, c, d, e, f := m.sets()
	return []*nftables.Set{a, b, c, d, e, f}
}

// Element encodings. Concatenated keys pad every field to 4 bytes.

func keyIfname(name string) []byte {
	b := make([]byte, unix.IFNAMSIZ)
	copy(b, name)
	return b
}

func keyMAC(mac net.HardwareAddr) []byte {
	b := make([]byte, 8)
	copy(b, mac)
	return b
}

func keyIP(a netip.Addr) []byte {
	b := a.As4()
	return b[:]
}

func keyMark(g uint32) []byte {
	b := make([]byte, 4)
	binary.NativeEndian.PutUint32(b, g)
	return b
}

func cat(parts ...[]byte) []byte {
	var out []byte
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

// vmElements are the set elements of one VM; group is 0 when the VM is in
// no peer group.
type vmElements struct {
	brMAC, brIP, brGroup, brMember, inGroup, inMember []nftables.SetElement
}

func elementsFor(v VMNet, group uint32) vmElements {
	var e vmElements
	ifn := keyIfname(v.TapName)
	e.brMAC = []nftables.SetElement{{Key: cat(ifn, keyMAC(v.MAC))}}
	e.brIP = []nftables.SetElement{{Key: cat(ifn, keyIP(v.IP))}}
	if group != 0 {
		e.brGroup = []nftables.SetElement{{Key: ifn, Val: keyMark(group)}}
		e.brMember = []nftables.SetElement{{Key: cat(keyMark(group), ifn)}}
		e.inGroup = []nftables.SetElement{{Key: keyIP(v.IP), Val: keyMark(group)}}
		e.inMember = []nftables.SetElement{{Key: cat(keyMark(group), keyIP(v.IP))}}
	}
	return e
}

// elementChunk is how many elements go into one netlink message at most.
// A message carries its elements as one attribute, whose length field has
// 16 bits, so it holds less than 64 KiB of them (about 1300 of noid's).
const elementChunk = 256

// queueElements queues the addition (add=true) or deletion of e: one
// message per set and elementChunk elements, so a batch for many VMs stays
// a few messages (and acknowledgements) per set, not one per set and VM.
func (m *Manager) queueElements(c *nftables.Conn, e vmElements, add bool) error {
	brMAC, brIP, brGroup, brMember, inGroup, inMember := m.sets()
	for _, x := range []struct {
		s  *nftables.Set
		el []nftables.SetElement
	}{{brMAC, e.brMAC}, {brIP, e.brIP}, {brGroup, e.brGroup}, {brMember, e.brMember}, {inGroup, e.inGroup}, {inMember, e.inMember}} {
		for len(x.el) > 0 {
			chunk := x.el[:min(len(x.el), elementChunk)]
			x.el = x.el[len(chunk):]
			var err error
			if add {
				err = c.SetAddElements(x.s, chunk)
			} else {
				err = c.SetDeleteElements(x.s, chunk)
			}
			if err != nil {
				return err
			}
		}
	}
	return nil
}

// queueVMs queues the addition of the elements of every VM in states.
func (m *Manager) queueVMs(c *nftables.Conn, states []vmState) error {
	var all vmElements
	for _, st := range states {
		e := elementsFor(st.v, st.group)
		all.brMAC = append(all.brMAC, e.brMAC...)
		all.brIP = append(all.brIP, e.brIP...)
		all.brGroup = append(all.brGroup, e.brGroup...)
		all.brMember = append(all.brMember, e.brMember...)
		all.inGroup = append(all.inGroup, e.inGroup...)
		all.inMember = append(all.inMember, e.inMember...)
	}
	return m.queueElements(c, all, true)
}

// ---- expression helpers ----

func loadMeta(key expr.MetaKey, reg uint32) expr.Any {
	return &expr.Meta{Key: key, Register: reg}
}

// ifnameIs matches an exact interface name.
func ifnameIs(key expr.MetaKey, name string) []expr.Any {
	return []expr.Any{loadMeta(key, reg00), &expr.Cmp{Op: expr.CmpOpEq, Register: reg00, Data: keyIfname(name)}}
}

// ifnameNot matches any interface but name.
func ifnameNot(key expr.MetaKey, name string) []expr.Any {
	return []expr.Any{loadMeta(key, reg00), &expr.Cmp{Op: expr.CmpOpNeq, Register: reg00, Data: keyIfname(name)}}
}

// ifnamePrefix matches interface names starting with prefix (nft's "noid-*").
func ifnamePrefix(key expr.MetaKey, prefix string) []expr.Any {
	return []expr.Any{loadMeta(key, reg00), &expr.Cmp{Op: expr.CmpOpEq, Register: reg00, Data: []byte(prefix)}}
}

func payload(base expr.PayloadBase, off, n, reg uint32) expr.Any {
	return &expr.Payload{OperationType: expr.PayloadLoad, DestRegister: reg, Base: base, Offset: off, Len: n}
}

func be16(v uint16) []byte { b := make([]byte, 2); binary.BigEndian.PutUint16(b, v); return b }

// etherType matches the frame's EtherType (bridge family).
func etherType(t uint16) []expr.Any {
	return []expr.Any{payload(expr.PayloadBaseLLHeader, 12, 2, reg00), &expr.Cmp{Op: expr.CmpOpEq, Register: reg00, Data: be16(t)}}
}

func isIPv4() []expr.Any {
	return []expr.Any{loadMeta(expr.MetaKeyNFPROTO, reg00), &expr.Cmp{Op: expr.CmpOpEq, Register: reg00, Data: []byte{unix.NFPROTO_IPV4}}}
}

func l4proto(p byte) []expr.Any {
	return []expr.Any{loadMeta(expr.MetaKeyL4PROTO, reg00), &expr.Cmp{Op: expr.CmpOpEq, Register: reg00, Data: []byte{p}}}
}

// ipIn matches an IPv4 address field (offset 12 = saddr, 16 = daddr) inside p.
func ipIn(off uint32, p netip.Prefix) []expr.Any {
	mask := net.CIDRMask(p.Bits(), 32)
	return []expr.Any{
		payload(expr.PayloadBaseNetworkHeader, off, 4, reg00),
		&expr.Bitwise{SourceRegister: reg00, DestRegister: reg00, Len: 4, Mask: mask, Xor: []byte{0, 0, 0, 0}},
		&expr.Cmp{Op: expr.CmpOpEq, Register: reg00, Data: keyIP(p.Masked().Addr())},
	}
}

func ctStateIn(bits uint32) []expr.Any {
	return []expr.Any{
		&expr.Ct{Register: reg00, Key: expr.CtKeySTATE},
		&expr.Bitwise{SourceRegister: reg00, DestRegister: reg00, Len: 4, Mask: binaryNative(bits), Xor: binaryNative(0)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: reg00, Data: binaryNative(0)},
	}
}

func ctStateNotIn(bits uint32) []expr.Any {
	return []expr.Any{
		&expr.Ct{Register: reg00, Key: expr.CtKeySTATE},
		&expr.Bitwise{SourceRegister: reg00, DestRegister: reg00, Len: 4, Mask: binaryNative(bits), Xor: binaryNative(0)},
		&expr.Cmp{Op: expr.CmpOpEq, Register: reg00, Data: binaryNative(0)},
	}
}

func binaryNative(v uint32) []byte {
	b := make([]byte, 4)
	binary.NativeEndian.PutUint32(b, v)
	return b
}

var (
	verdictAccept = &expr.Verdict{Kind: expr.VerdictAccept}
	verdictDrop   = &expr.Verdict{Kind: expr.VerdictDrop}
)

func join(parts ...[]expr.Any) []expr.Any {
	var out []expr.Any
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

func one(e ...expr.Any) []expr.Any { return e }

// ruleTag is stored as each rule's user data so a listing shows who owns it.
var ruleTag = []byte("noid")

// queueRuleset queues, into c, the creation of noid's tables, sets and
// chains (each a no-op if it already exists), a flush of every chain, and
// all rules. When fresh is true it first deletes both tables (add-then-
// delete, so a missing table is no error): used when the existing objects
// cannot be updated in place.
func (m *Manager) queueRuleset(c *nftables.Conn, fresh bool) error {
	cfg := m.cfg
	bt, it := m.bridgeTable(), m.inetTable()
	if fresh {
		c.AddTable(bt)
		c.DelTable(bt)
		c.AddTable(it)
		c.DelTable(it)
	}
	c.AddTable(bt)
	c.AddTable(it)
	for _, s := range m.allSets() {
		if err := c.AddSet(s, nil); err != nil {
			return err
		}
	}
	accept := nftables.ChainPolicyAccept
	chain := func(t *nftables.Table, name string, typ nftables.ChainType, hook *nftables.ChainHook, prio *nftables.ChainPriority) *nftables.Chain {
		ch := c.AddChain(&nftables.Chain{Name: name, Table: t, Type: typ, Hooknum: hook, Priority: prio, Policy: &accept})
		c.FlushChain(ch)
		return ch
	}
	add := func(ch *nftables.Chain, exprs []expr.Any) {
		c.AddRule(&nftables.Rule{Table: ch.Table, Chain: ch, Exprs: exprs, UserData: ruleTag})
	}

	// ---- bridge: anti-spoofing and VM↔VM at layer 2 ----
	brPre := chain(bt, chainPrerouting, nftables.ChainTypeFilter, nftables.ChainHookPrerouting, nftables.ChainPriorityRef(-300))
	fromVM := ifnamePrefix(expr.MetaKeyIIFNAME, TapPrefix)
	// Only the VM's own source MAC.
	add(brPre, join(fromVM,
		one(loadMeta(expr.MetaKeyIIFNAME, reg00), payload(expr.PayloadBaseLLHeader, 6, 6, reg04),
			&expr.Lookup{SourceRegister: reg00, SetName: setVMMAC, Invert: true}, verdictDrop)))
	// Only IPv4 and ARP (this also drops IPv6 and 802.1Q-tagged frames).
	add(brPre, join(fromVM,
		one(payload(expr.PayloadBaseLLHeader, 12, 2, reg00),
			&expr.Cmp{Op: expr.CmpOpNeq, Register: reg00, Data: be16(unix.ETH_P_IP)},
			&expr.Cmp{Op: expr.CmpOpNeq, Register: reg00, Data: be16(unix.ETH_P_ARP)}, verdictDrop)))
	// IPv4: only the VM's own source address.
	add(brPre, join(fromVM, etherType(unix.ETH_P_IP),
		one(loadMeta(expr.MetaKeyIIFNAME, reg00), payload(expr.PayloadBaseNetworkHeader, 12, 4, reg04),
			&expr.Lookup{SourceRegister: reg00, SetName: setVMIP, Invert: true}, verdictDrop)))
	// ARP: sender protocol address and sender hardware address are the VM's.
	add(brPre, join(fromVM, etherType(unix.ETH_P_ARP),
		one(loadMeta(expr.MetaKeyIIFNAME, reg00), payload(expr.PayloadBaseNetworkHeader, 14, 4, reg04),
			&expr.Lookup{SourceRegister: reg00, SetName: setVMIP, Invert: true}, verdictDrop)))
	add(brPre, join(fromVM, etherType(unix.ETH_P_ARP),
		one(loadMeta(expr.MetaKeyIIFNAME, reg00), payload(expr.PayloadBaseNetworkHeader, 8, 6, reg04),
			&expr.Lookup{SourceRegister: reg00, SetName: setVMMAC, Invert: true}, verdictDrop)))

	brFwd := chain(bt, chainForward, nftables.ChainTypeFilter, nftables.ChainHookForward, nftables.ChainPriorityFilter)
	vmToVM := join(fromVM, ifnamePrefix(expr.MetaKeyOIFNAME, TapPrefix))
	// Peers: the receiving port is in the sending port's group.
	add(brFwd, join(vmToVM, one(
		loadMeta(expr.MetaKeyIIFNAME, reg00),
		&expr.Lookup{SourceRegister: reg00, SetName: setPeerGroup, DestRegister: reg00, IsDestRegSet: true},
		loadMeta(expr.MetaKeyOIFNAME, reg01),
		&expr.Lookup{SourceRegister: reg00, SetName: setPeerMember},
		verdictAccept)))
	add(brFwd, join(vmToVM, one(verdictDrop)))

	// ---- inet: what reaches the IP stack ----
	inInput := chain(it, chainInput, nftables.ChainTypeFilter, nftables.ChainHookInput, nftables.ChainPriorityFilter)
	fromBr := ifnameIs(expr.MetaKeyIIFNAME, cfg.Bridge)
	toBr := ifnameIs(expr.MetaKeyOIFNAME, cfg.Bridge)
	established := ctStateIn(expr.CtStateBitESTABLISHED | expr.CtStateBitRELATED)
	add(inInput, join(fromBr, established, one(verdictAccept)))
	toGateway := func(proto byte, port uint16) []expr.Any {
		return join(fromBr, isIPv4(),
			one(payload(expr.PayloadBaseNetworkHeader, 16, 4, reg00), &expr.Cmp{Op: expr.CmpOpEq, Register: reg00, Data: keyIP(cfg.Gateway())}),
			l4proto(proto),
			one(payload(expr.PayloadBaseTransportHeader, 2, 2, reg00), &expr.Cmp{Op: expr.CmpOpEq, Register: reg00, Data: be16(port)}),
			one(verdictAccept))
	}
	add(inInput, toGateway(unix.IPPROTO_UDP, cfg.DNSPort))
	add(inInput, toGateway(unix.IPPROTO_TCP, cfg.DNSPort))
	for _, p := range cfg.GatewayTCPPorts {
		add(inInput, toGateway(unix.IPPROTO_TCP, p))
	}
	add(inInput, join(fromBr, one(verdictDrop)))
	// The gateway address (and the DNS forwarder on it) is for VMs and the
	// host only: nobody routing to it from another interface may open a
	// connection to it (no open resolver for the LAN).
	add(inInput, join(ifnameNot(expr.MetaKeyIIFNAME, cfg.Bridge), ifnameNot(expr.MetaKeyIIFNAME, "lo"), isIPv4(),
		one(payload(expr.PayloadBaseNetworkHeader, 16, 4, reg00), &expr.Cmp{Op: expr.CmpOpEq, Register: reg00, Data: keyIP(cfg.Gateway())}),
		ctStateNotIn(expr.CtStateBitESTABLISHED|expr.CtStateBitRELATED),
		one(verdictDrop)))

	inFwd := chain(it, chainForward, nftables.ChainTypeFilter, nftables.ChainHookForward, nftables.ChainPriorityFilter)
	// TCP MSS clamping to the route's MTU on SYNs to and from VMs.
	syn := one(payload(expr.PayloadBaseTransportHeader, 13, 1, reg00),
		&expr.Bitwise{SourceRegister: reg00, DestRegister: reg00, Len: 1, Mask: []byte{0x02 | 0x04}, Xor: []byte{0}},
		&expr.Cmp{Op: expr.CmpOpEq, Register: reg00, Data: []byte{0x02}})
	clamp := one(&expr.Rt{Register: reg00, Key: expr.RtTCPMSS},
		// rt stores the MSS in host order; the option is big-endian.
		&expr.Byteorder{SourceRegister: reg00, DestRegister: reg00, Op: expr.ByteorderHton, Len: 2, Size: 2},
		&expr.Exthdr{SourceRegister: reg00, Type: 2, Offset: 2, Len: 2, Op: expr.ExthdrOpTcpopt})
	add(inFwd, join(fromBr, isIPv4(), l4proto(unix.IPPROTO_TCP), syn, clamp))
	add(inFwd, join(toBr, isIPv4(), l4proto(unix.IPPROTO_TCP), syn, clamp))
	// VM → VM through the IP layer (routed via the gateway, or bridged and
	// handed to the IP hooks by br_netfilter): peers only.
	add(inFwd, join(fromBr, toBr, isIPv4(), one(
		payload(expr.PayloadBaseNetworkHeader, 12, 4, reg00),
		&expr.Lookup{SourceRegister: reg00, SetName: setPeerGroup, DestRegister: reg00, IsDestRegSet: true},
		payload(expr.PayloadBaseNetworkHeader, 16, 4, reg01),
		&expr.Lookup{SourceRegister: reg00, SetName: setPeerMember},
		verdictAccept)))
	add(inFwd, join(fromBr, toBr, one(verdictDrop)))
	for _, b := range cfg.blockedNets() {
		add(inFwd, join(fromBr, isIPv4(), ipIn(16, b), one(verdictDrop)))
	}
	// Private ranges (the LAN) are closed but for what AllowedNets opens.
	for _, a := range cfg.allowedNets() {
		add(inFwd, join(fromBr, isIPv4(), ipIn(16, a), one(verdictAccept)))
	}
	for _, p := range DefaultPrivateNets {
		add(inFwd, join(fromBr, isIPv4(), ipIn(16, p), one(verdictDrop)))
	}
	add(inFwd, join(fromBr, one(verdictAccept)))
	add(inFwd, join(toBr, established, one(verdictAccept)))
	add(inFwd, join(toBr, one(verdictDrop)))

	// The host routes VM → VM packets sent via the gateway back out of the
	// bridge, and the kernel would answer with an ICMP redirect ("go direct")
	// before any filter runs. Guests act on redirects, so never send them.
	inOut := chain(it, chainOutput, nftables.ChainTypeFilter, nftables.ChainHookOutput, nftables.ChainPriorityFilter)
	add(inOut, join(toBr, isIPv4(), l4proto(unix.IPPROTO_ICMP),
		one(payload(expr.PayloadBaseTransportHeader, 0, 1, reg00), &expr.Cmp{Op: expr.CmpOpEq, Register: reg00, Data: []byte{5}}),
		one(verdictDrop)))

	inPost := chain(it, chainPostrouting, nftables.ChainTypeNAT, nftables.ChainHookPostrouting, nftables.ChainPriorityNATSource)
	add(inPost, join(isIPv4(), ipIn(12, cfg.Pool), ifnameNot(expr.MetaKeyOIFNAME, cfg.Bridge), one(&expr.Masq{})))
	return nil
}
