package server

import (
	"context"
	"net/netip"

	"github.com/noid-vm/noid/internal/store"
)

// prepareNetwork adds IP allocation to a VM insert when the VM gets a NIC.
func (s *Server) prepareNetwork(v *store.VM, opts *store.CreateOpts) {}

// attachNetwork creates the VM's TAP and rules.
func (s *Server) attachNetwork(ctx context.Context, v *store.VM) error { return nil }

// detachNetwork removes the VM's TAP and rules.
func (s *Server) detachNetwork(ctx context.Context, v *store.VM) {}

func (s *Server) poolPrefix() netip.Prefix {
	p, _ := netip.ParsePrefix(s.cfg.Network.Pool)
	return p.Masked()
}

func (s *Server) poolBits() int { return s.poolPrefix().Bits() }

func (s *Server) gateway() string { return s.poolPrefix().Addr().Next().String() }
