// Package network is noid-server's host-side networking: the bridge, one
// TAP per VM, NAT out, isolation between VMs, and the DNS server that
// answers "<vm>.noid".
//
// Everything goes through netlink (vishvananda/netlink) and nftables
// (google/nftables); nothing shells out to ip, iptables or nft.
//
// # Lifecycle
//
//	m, err := network.New(ctx, cfg, logger)  // claims the namespace, validates cfg against its routes
//	err = m.Setup(ctx)                        // bridge, gateway, ip_forward, nftables tables
//	err = m.Reconcile(ctx, vmsFromDB)         // at start-up: re-apply wanted VMs, drop orphans
//	dns, err := m.StartDNS(ctx, resolver, network.DNSOptions{})
//	err = m.AddVM(ctx, network.VMNet{ID: id, IP: ip, Owner: user})  // before starting QEMU
//	err = m.RemoveVM(ctx, id)                 // on destroy
//	m.Close()                                 // server shutdown: VMs keep their network
//	m.Teardown(ctx)                           // uninstall: remove everything noid made
//
// The store allocates addresses inside its own transaction with
// Config.NthHost / Config.HostIndex / Config.PoolSize; this package never
// picks an address.
//
// # Isolation
//
// A VM's frames enter the bridge on its TAP. noid's "bridge noid" table
// checks, before anything else, that the frame carries the VM's own MAC and
// (for IPv4 and ARP) its own IP, and drops every other EtherType (IPv6,
// VLAN tags, …). Frames from one VM port to another are dropped unless both
// VMs are in the same peer group (same owner, and AllowPeers or
// Config.AllowSameUser). VMs outside any peer group are also isolated bridge
// ports (IFLA_BRPORT_ISOLATED), so the kernel's bridge refuses to forward
// between them even if noid's nftables tables were flushed.
//
// Traffic that reaches the IP layer is handled by the "inet noid" table: a
// VM may reach the host only on the gateway's DNS port (plus any
// Config.GatewayTCPPorts); VM-to-VM packets routed through the gateway get
// the same peer check as bridged ones; link-local and cloud metadata
// addresses (DefaultBlockedNets, Config.BlockedNets) are dropped; so are
// the private ranges of DefaultPrivateNets (the LAN: RFC 1918 and
// 100.64/10) except what Config.AllowedNets opens;
// everything else is accepted and masqueraded out of any non-bridge
// interface, with TCP MSS clamped to the route's MTU. Nothing may enter a
// VM from outside except replies.
//
// Per-VM state is only set elements (see nft.go), so AddVM and RemoveVM are
// one small atomic nftables batch and the rules themselves never change
// while VMs come and go.
//
// # Address reuse
//
// The store hands out the lowest free address, so a new VM or a clone
// often gets the address of a VM destroyed a moment ago. The host would
// keep that VM's MAC in its neighbour (ARP) table and send to it for
// several seconds, so AddVM and RemoveVM delete the bridge's neighbour
// entry of the address (Reconcile drops every entry no wanted VM has), and
// the guest agent sends gratuitous ARP when it takes a new address or MAC,
// which also updates the VM's peers.
//
// # Ownership
//
// noid owns the bridge named in Config, every interface whose name starts
// with TapPrefix, and the nftables tables named TableName in the inet and
// bridge families. The last two are per network namespace, not per bridge,
// so one Manager at a time owns a namespace: New claims it (see LockDir)
// and refuses while another Manager, of any bridge, holds it. It never reads, changes or deletes anything else, so it
// coexists with other firewalls and VM managers on the host (their drop
// rules still apply to VM traffic: an accept in noid's tables does not
// override another table's drop).
package network
