package manager

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"

	"github.com/noid-vm/noid/internal/errdefs"
	"github.com/noid-vm/noid/internal/network"
	"github.com/noid-vm/noid/internal/store"
)

// netConfig turns the [network] config section into the network package's.
func (m *Manager) netConfig() (network.Config, error) {
	p, err := netip.ParsePrefix(m.cfg.Network.Pool)
	if err != nil {
		return network.Config{}, fmt.Errorf("%w: network.pool: %v", errdefs.ErrInvalidArgument, err)
	}
	nc := network.Config{Bridge: m.cfg.Network.Bridge, Pool: p, AllowSameUser: m.cfg.Network.AllowSameUser, DNSPort: uint16(m.cfg.Network.DNSPort)}
	for _, port := range m.cfg.Network.GatewayTCPPorts {
		nc.GatewayTCPPorts = append(nc.GatewayTCPPorts, uint16(port))
	}
	for _, b := range m.cfg.Network.BlockedNets {
		bp, err := netip.ParsePrefix(b)
		if err != nil {
			return network.Config{}, fmt.Errorf("%w: network.blocked_nets: %v", errdefs.ErrInvalidArgument, err)
		}
		nc.BlockedNets = append(nc.BlockedNets, bp)
	}
	for _, a := range m.cfg.Network.AllowedNets {
		ap, err := netip.ParsePrefix(a)
		if err != nil {
			return network.Config{}, fmt.Errorf("%w: network.allowed_nets: %v", errdefs.ErrInvalidArgument, err)
		}
		nc.AllowedNets = append(nc.AllowedNets, ap)
	}
	return nc.WithDefaults(), nil
}

// setupNetwork creates the bridge, the nftables tables and the DNS server,
// and re-applies every existing VM's TAP and rules (idempotently), removing
// orphans left by a crash.
func (m *Manager) setupNetwork(ctx context.Context) error {
	if !m.cfg.NetworkEnabled() {
		m.log.Info("networking disabled; VMs get no NIC")
		return nil
	}
	nc, err := m.netConfig()
	if err != nil {
		return err
	}
	nm, err := network.New(ctx, nc, m.log)
	if err != nil {
		return legacyNetHint(err)
	}
	if err := nm.Setup(ctx); err != nil {
		nm.Close()
		return legacyNetHint(fmt.Errorf("setting up networking (set [network] enabled = false to run without): %w", err))
	}
	vms, err := m.store.ListVMs(ctx, -1)
	if err != nil {
		nm.Close()
		return err
	}
	var want []network.VMNet
	for _, v := range vms {
		if v.Tap == "" || v.State == store.StateDestroying {
			continue
		}
		vn, err := m.vmNet(nm, v)
		if err != nil {
			// Its TAP will be removed as an orphan: say why.
			m.log.Warn("vm keeps no network: its address does not fit the configured pool", "vm", v.Name, "vm_id", v.ID, "ip", v.IP, "pool", nc.Pool.String(), "err", err)
			continue
		}
		want = append(want, vn)
	}
	if err := nm.Reconcile(ctx, want); err != nil {
		m.log.Warn("reconciling VM networks", "err", err)
	}
	dns, err := nm.StartDNS(ctx, network.ResolverFunc(m.lookupVM), network.DNSOptions{Domain: "noid",
		Rate: m.cfg.Network.DNSRate, Concurrency: m.cfg.Network.DNSConcurrency})
	if err != nil {
		nm.Close()
		return fmt.Errorf("starting the VM DNS server: %w", err)
	}
	m.net, m.dns = nm, dns
	m.log.Info("networking ready", "bridge", nc.Bridge, "pool", nc.Pool.String(), "gateway", nc.Gateway().String(), "vms", len(want))
	return nil
}

func (m *Manager) vmNet(nm *network.Manager, v *store.VM) (network.VMNet, error) {
	ip, err := netip.ParseAddr(v.IP)
	if err != nil {
		return network.VMNet{}, fmt.Errorf("vm %s has no valid ip %q", v.Name, v.IP)
	}
	vn := network.VMNet{ID: v.ID, TapName: v.Tap, IP: ip, Owner: strconv.FormatInt(v.UserID, 10), AllowPeers: v.AllowPeers}
	if v.MAC != "" {
		if vn.MAC, err = net.ParseMAC(v.MAC); err != nil {
			return network.VMNet{}, fmt.Errorf("vm %s has no valid mac %q", v.Name, v.MAC)
		}
	}
	return nm.Config().NormalizeVM(vn)
}

// lookupVM answers "<vm>.noid" for the VM at asker's address, scoped to
// its owner.
func (m *Manager) lookupVM(ctx context.Context, asker netip.Addr, name string) (netip.Addr, bool) {
	from, err := m.store.GetVMByIP(ctx, asker.String())
	if err != nil {
		return netip.Addr{}, false
	}
	v, err := m.store.GetVM(ctx, from.UserID, strings.ToLower(name))
	if err != nil || v.IP == "" || v.State == store.StateDestroying {
		return netip.Addr{}, false
	}
	a, err := netip.ParseAddr(v.IP)
	return a, err == nil
}

// prepareNetwork adds IP allocation to a VM insert when the VM gets a NIC.
func (m *Manager) prepareNetwork(v *store.VM, opts *store.CreateOpts) {
	if v.Network == "none" || m.net == nil {
		v.Network = "none"
		return
	}
	nc := m.net.Config()
	opts.AllocIP = func(used map[string]bool) (string, error) {
		for n := 0; n < nc.PoolSize(); n++ {
			a, _ := nc.NthHost(n)
			if !used[a.String()] {
				return a.String(), nil
			}
		}
		return "", errdefs.WithHint(fmt.Errorf("%w: the address pool %s is exhausted (%d VMs)", errdefs.ErrResourceExhausted, nc.Pool, nc.PoolSize()),
			"destroy VMs, or configure a larger [network] pool")
	}
}

// attachNetwork creates the VM's TAP and rules and records its TAP and MAC.
func (m *Manager) attachNetwork(ctx context.Context, v *store.VM) error {
	if v.Network == "none" || m.net == nil || v.IP == "" {
		return nil
	}
	vn, err := m.vmNet(m.net, v)
	if err != nil {
		return err
	}
	if err := m.net.AddVM(ctx, vn); err != nil {
		return fmt.Errorf("creating network for vm %s: %w", v.Name, err)
	}
	v.Tap, v.MAC = vn.TapName, vn.MAC.String()
	return nil
}

// detachNetwork removes the VM's TAP and rules.
func (m *Manager) detachNetwork(ctx context.Context, v *store.VM) {
	if m.net == nil || v.IP == "" {
		return
	}
	if err := m.net.RemoveVM(ctx, v.ID); err != nil {
		m.log.Warn("removing vm network", "vm", v.Name, "err", err)
	}
	// A VM rewound into a warm spare uses the spare's TAP; if the manager
	// did not know the VM, RemoveVM only looked for TapName(v.ID).
	if rid := v.Runtime(); rid != v.ID {
		if err := m.net.RemoveVM(ctx, rid); err != nil {
			m.log.Warn("removing vm network", "vm", v.Name, "err", err)
		}
	}
}

func (m *Manager) poolPrefix() netip.Prefix {
	p, _ := netip.ParsePrefix(m.cfg.Network.Pool)
	return p.Masked()
}

func (m *Manager) poolBits() int { return m.poolPrefix().Bits() }

func (m *Manager) gateway() string { return m.poolPrefix().Addr().Next().String() }

// legacyNetHint adds to a network set-up error what to do about the
// leftovers of the original noid's noid-netd, when there are any: its
// noid<N> TAPs hold routes in the default pool and the bridge's default
// name. They are never removed here; the hint says how.
func legacyNetHint(err error) error {
	taps, lerr := network.LegacyTaps()
	if lerr != nil || len(taps) == 0 {
		return err
	}
	return errdefs.WithHint(err, network.LegacyHint(taps))
}
