package manager

import (
	"context"
	"fmt"

	"github.com/noid-vm/noid/internal/api"
	"github.com/noid-vm/noid/internal/store"
)

// Capabilities returns the defaults, limits and features of this server
// and u's quota (their own limits, else the config's) and usage. The
// version fields (Server) are the caller's to fill in.
func (m *Manager) Capabilities(ctx context.Context, u *store.User) (*api.Capabilities, error) {
	use, err := m.store.UserUsage(ctx, u.ID)
	if err != nil {
		return nil, fmt.Errorf("reading the usage of user %s: %w", u.Name, err)
	}
	cfg := m.cfg
	maxV, maxM := hostLimits()
	network := "default"
	if !cfg.NetworkEnabled() {
		network = "none"
	}
	q := cfg.QuotaLimitsFor(u.IsAdmin)
	own := func(p *int64, def int64) int64 {
		if p != nil {
			return *p
		}
		return def
	}
	features := []string{api.FeatureCheckpoint, api.FeatureGolden, api.FeatureFiles, api.FeatureExecUser,
		api.FeatureConsoleEnv, api.FeatureUsers, api.FeatureMetrics}
	if cfg.NetworkEnabled() {
		features = append(features, api.FeatureNetwork)
	}
	if m.remote != nil {
		features = append(features, api.FeatureRemote)
	}
	c := &api.Capabilities{
		API: api.Version, VMM: m.BackendName(), Accel: string(m.Accel()),
		Defaults: api.CapabilityDefaults{VCPUs: cfg.DefaultVCPUs, MemoryMiB: cfg.DefaultMemoryMiB, DiskSize: cfg.DefaultDiskSize,
			Network: network, ExecUser: cfg.Exec.DefaultUser},
		Limits: api.CapabilityLimits{MaxVCPUs: maxV, MinMemoryMiB: 64, MaxMemoryMiB: maxM, MaxNameLength: api.MaxNameLen,
			SessionsPerUser: cfg.Limits.SessionsPerUser, SerialLogBytes: cfg.SerialLogBytes()},
		Quota: api.CapabilityQuota{
			MaxVMs: own(u.MaxVMs, int64(q.MaxVMs)), MaxVCPUs: own(u.MaxVCPUs, int64(q.MaxVCPUs)),
			MaxMemoryMiB: own(u.MaxMemoryMiB, int64(q.MaxMemoryMiB)), MaxCheckpointBytes: own(u.MaxCheckpointBytes, q.MaxCheckpointBytes),
			MaxDiskBytes: q.MaxDiskBytes,
			Used:         api.QuotaUsage{VMs: use.VMs, VCPUs: use.VCPUs, MemoryMiB: use.MemoryMiB, CheckpointBytes: use.CheckpointBytes},
		},
		Features:   features,
		APIVersion: apiMajor(), DefaultCPUs: cfg.DefaultVCPUs, DefaultMemMiB: cfg.DefaultMemoryMiB, MaxVMNameLength: api.MaxNameLen,
	}
	return c, nil
}

// apiMajor is api.Version's major number.
func apiMajor() int {
	var major, minor int
	fmt.Sscanf(api.Version, "%d.%d", &major, &minor)
	return major
}
