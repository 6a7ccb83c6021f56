// Package config loads noid-server's TOML configuration and fills in the
// documented defaults.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"math/bits"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/pelletier/go-toml/v2"

	"github.com/noid-vm/noid/internal/api"
	"github.com/noid-vm/noid/internal/errdefs"
)

// Config is noid-server's configuration. Every field has a documented default;
// see Default and docs/config.md.
type Config struct {
	// DataDir holds the database, images, VMs and checkpoints. Default ~/.noid.
	DataDir string `toml:"data_dir"`
	// Socket is the local unix socket. Default /run/noid/noid.sock when
	// running as root, else <data_dir>/noid.sock.
	Socket string `toml:"socket"`
	// SocketGroup is the group that may use the unix socket besides root
	// (mode 0660, like Docker's docker group); `noid-server add-user
	// --local USER` creates it and adds USER. Default "noid".
	SocketGroup string `toml:"socket_group"`
	// Listen is an optional TCP address ("127.0.0.1:7070"); empty means off.
	Listen string `toml:"listen"`
	// TLSCert and TLSKey enable HTTPS on Listen when both are set.
	TLSCert string `toml:"tls_cert"`
	TLSKey  string `toml:"tls_key"`
	// TrustProxy trusts X-Forwarded-For from a reverse proxy on Listen.
	TrustProxy bool `toml:"trust_proxy"`
	// Kernel is the guest kernel; empty means the built image's kernel.
	Kernel string `toml:"kernel"`
	// Initrd is the initramfs with the agent; empty means the built image's.
	Initrd string `toml:"initrd"`
	// Rootfs is the base root filesystem image; empty means the built image's.
	Rootfs string `toml:"rootfs"`
	// Image selects the built image when Kernel/Rootfs are unset: "auto"
	// (debian if built, else tiny), "debian" or "tiny".
	Image string `toml:"image"`
	// VMM selects the backend: auto, qemu or firecracker.
	VMM string `toml:"vmm"`
	// Accel selects CPU acceleration for QEMU: auto, kvm or tcg.
	Accel string `toml:"accel"`
	// QEMUBinary is the qemu-system-x86_64 path. Default from $PATH.
	QEMUBinary string `toml:"qemu_binary"`
	// FirecrackerBinary is the firecracker path. Default /usr/local/bin/firecracker.
	FirecrackerBinary string `toml:"firecracker_binary"`
	// AgentBinary is the noid-agent used when building images. Default: next
	// to noid-server, then $PATH.
	AgentBinary string `toml:"agent_binary"`
	// LogLevel is debug, info, warn or error. Default info.
	LogLevel string `toml:"log_level"`
	// LogFormat is text (key=value lines) or json (one object a line, for
	// the journal and log shippers). Default text.
	LogFormat string `toml:"log_format"`
	// Defaults for new VMs.
	DefaultVCPUs     int    `toml:"default_vcpus"`
	DefaultMemoryMiB int    `toml:"default_memory_mib"`
	DefaultDiskSize  string `toml:"default_disk_size"`
	// Network configures VM networking.
	Network Network `toml:"network"`
	// Quota holds per-user limits applied when a user has no own limits.
	Quota Quota `toml:"quota"`
	// Sandbox confines VMM processes.
	Sandbox Sandbox `toml:"sandbox"`
	// Storage configures where VM, checkpoint and golden files live.
	Storage Storage `toml:"storage"`
	// Pool configures the warm pool of VMMs prepared for golden snapshots.
	Pool Pool `toml:"pool"`
	// HTTP configures the API server's connections and shutdown.
	HTTP HTTP `toml:"http"`
	// Exec configures noid exec and noid console.
	Exec Exec `toml:"exec"`
	// Limits bounds what one VM or user can make the server hold.
	Limits Limits `toml:"limits"`
	// Remote is the optional S3-compatible object store that checkpoints
	// and golden snapshots are pushed to and pulled from (remote.go).
	Remote Remote `toml:"remote"`
	// Legacy accepts the Rust noid's server.toml keys (deprecated).
	Legacy
	// Warnings are the deprecation warnings of the file read (one line
	// each), for the server to log at start-up.
	Warnings []string `toml:"-"`
}

// Exec is the [exec] section.
type Exec struct {
	// DefaultUser is the guest user that exec and console run as when the
	// request names none (noid exec --user): a user name or uid of the
	// guest's /etc/passwd. Default "" (root).
	DefaultUser string `toml:"default_user"`
}

// Limits is the [limits] section: bounds on what one VM or one user can
// make the server hold, beyond the [quota] of VMs, CPUs, memory and disk.
type Limits struct {
	// SerialLogSize bounds each VM's console log (and its VMM's own log)
	// on disk, as a size; the newest part is kept. Default "4M".
	SerialLogSize string `toml:"serial_log_size"`
	// SessionsPerUser bounds the exec and console sessions one user has
	// open at once. Default 32.
	SessionsPerUser int `toml:"sessions_per_user"`
}

// DefaultSessionsPerUser is [limits] sessions_per_user's default.
const DefaultSessionsPerUser = 32

// DefaultSerialLogSize is [limits] serial_log_size's default, in bytes.
const DefaultSerialLogSize = 4 << 20

// SerialLogBytes is [limits] serial_log_size in bytes.
func (c *Config) SerialLogBytes() int64 {
	if c.Limits.SerialLogSize == "" {
		return DefaultSerialLogSize
	}
	n, err := ParseSize(c.Limits.SerialLogSize)
	if err != nil {
		return DefaultSerialLogSize
	}
	return n
}

// Pool is the [pool] section.
type Pool struct {
	// Spares is how many VMMs are kept prepared per golden snapshot in use
	// (running from the golden's state, so a golden create only applies the
	// VM's identity) and per clone shape (vCPUs, memory, disk size, NIC;
	// the 4 used last; waiting for state, so a clone or rewind skips the
	// process start). Default 1; 0 turns the pool off.
	Spares *int `toml:"spares"`
	// MemoryBudget bounds the guest memory of the running spares (those of
	// golden snapshots, whose guests run): a size ("8G") or a percentage
	// of the host's RAM ("50%"). A spare that would go over it is not
	// started, and creates from that golden load its state on the spot.
	// "0" starts no running spare. Default DefaultPoolMemoryBudget.
	MemoryBudget string `toml:"memory_budget"`
}

// DefaultPoolMemoryBudget is [pool] memory_budget's default.
const DefaultPoolMemoryBudget = "50%"

// PoolMemoryBudgetMiB returns [pool] memory_budget in MiB for a host with
// totalMiB of RAM.
func (c *Config) PoolMemoryBudgetMiB(totalMiB int) int {
	v := c.Pool.MemoryBudget
	if v == "" {
		v = DefaultPoolMemoryBudget
	}
	bytes, percent, _ := parseMinFree(v)
	if percent > 0 {
		return int(float64(totalMiB) * percent / 100)
	}
	return int(bytes >> 20)
}

// HostMemoryOvercommit is [quota] host_memory_overcommit with its default.
func (c *Config) HostMemoryOvercommit() float64 {
	if c.Quota.HostMemoryOvercommit <= 0 {
		return 1.5
	}
	return c.Quota.HostMemoryOvercommit
}

// PoolSpares is the number of warm spares per golden snapshot and per clone shape.
func (c *Config) PoolSpares() int {
	if c.Pool.Spares == nil {
		return 1
	}
	return *c.Pool.Spares
}

// Storage is the [storage] section.
type Storage struct {
	// Mode is how files are copied in the storage root: "auto" (reflinks
	// where its filesystem has them, sparse copies otherwise), "copy"
	// (sparse copies, FICLONE never tried) or "reflink" (the filesystem
	// must have reflinks, or the server does not start). Default "auto".
	// The hot paths (checkpoints, rewinds, clones) copy no data either
	// way; copies are made only for a base image's first use and, with
	// QEMU before 8.2, for memory files.
	Mode string `toml:"mode"`
	// ReflinkImageSize, when set (e.g. "100G"), makes noid-server create and
	// mount a sparse loop-backed XFS image (reflink=1) at <data_dir>/reflink
	// and keep VMs, checkpoints and golden snapshots on it, so copies are
	// reflinks even on an ext4 host. Default "" (off: files live in data_dir).
	ReflinkImageSize string `toml:"reflink_image_size"`
	// ReflinkImage is the image file. Default <data_dir>/reflink.img.
	ReflinkImage string `toml:"reflink_image"`
	// MinFree is the free space kept in reserve on the filesystems of the
	// storage root and the database: below it, creates, clones,
	// checkpoints and golden promotions are refused. A size ("2G") or a
	// percentage of the filesystem ("5%"); "0" turns it off. Default
	// DefaultMinFree.
	MinFree string `toml:"min_free"`
}

// The values of [storage] mode.
const (
	// StorageModeAuto makes reflinks where the storage root's filesystem
	// has them and sparse copies elsewhere (the default).
	StorageModeAuto = "auto"
	// StorageModeCopy always makes sparse copies and never tries FICLONE.
	StorageModeCopy = "copy"
	// StorageModeReflink requires reflinks: the server refuses to start
	// where the storage root's filesystem has none.
	StorageModeReflink = "reflink"
)

// DefaultMinFree is [storage] min_free's default.
const DefaultMinFree = "5%"

// MinFree returns [storage] min_free as either bytes or a percentage of
// the filesystem (exactly one is non-zero, or neither when it is off).
func (c *Config) MinFree() (bytes int64, percent float64) {
	v := c.Storage.MinFree
	if v == "" {
		v = DefaultMinFree
	}
	bytes, percent, _ = parseMinFree(v)
	return bytes, percent
}

// parseMinFree parses a size or a percentage (0 < p < 100).
func parseMinFree(v string) (int64, float64, error) {
	if p, ok := strings.CutSuffix(strings.TrimSpace(v), "%"); ok {
		f, err := strconv.ParseFloat(strings.TrimSpace(p), 64)
		if err != nil || f < 0 || f >= 100 {
			return 0, 0, fmt.Errorf("invalid percentage %q (use e.g. 5%%)", v)
		}
		return 0, f, nil
	}
	n, err := ParseSize(v)
	return n, 0, err
}

// StorageDir is where users/ and golden/ live: data_dir, or the reflink
// mount when [storage] reflink_image_size is set.
func (c *Config) StorageDir() string {
	if c.Storage.ReflinkImageSize != "" {
		return filepath.Join(c.DataDir, "reflink")
	}
	return c.DataDir
}

// Network is the [network] section.
type Network struct {
	// Enabled turns VM networking on. Default true.
	Enabled *bool `toml:"enabled"`
	// Bridge is the host bridge name. Default noid0.
	Bridge string `toml:"bridge"`
	// Pool is the VM address pool; the first address is the gateway. Default 172.16.0.0/16.
	Pool string `toml:"pool"`
	// AllowSameUser lets VMs of the same user reach each other. Default false.
	AllowSameUser bool `toml:"allow_same_user"`
	// DNSPort is the port of the VM-facing DNS server on the gateway. Default 53.
	DNSPort int `toml:"dns_port"`
	// GatewayTCPPorts are host TCP ports on the gateway address that VMs may
	// reach (a package cache, a test server). Default none: only DNS.
	GatewayTCPPorts []int `toml:"gateway_tcp_ports"`
	// BlockedNets are extra destination prefixes VMs may never reach, on top
	// of link-local and cloud metadata addresses (for example your LAN).
	BlockedNets []string `toml:"blocked_nets"`
	// AllowedNets opens destinations inside the private ranges VMs may not
	// reach by default (10/8, 172.16/12, 192.168/16, 100.64/10), such as
	// a LAN package mirror. Default none.
	AllowedNets []string `toml:"allowed_nets"`
	// DNSRate is how many queries per second one VM may send to the DNS
	// server (bursts of twice that). Default 100.
	DNSRate float64 `toml:"dns_rate"`
	// DNSConcurrency bounds the DNS queries answered at once, and the TCP
	// connections open, over all VMs; one VM gets a quarter. Default 64.
	DNSConcurrency int `toml:"dns_concurrency"`
}

// Quota is the [quota] section: per-user limits for users without limits
// of their own. A missing key means its finite default (QuotaLimits); 0
// means unlimited.
type Quota struct {
	// HostMemoryOvercommit is how many times the host's available memory
	// one new VM may ask for (guest RAM is allocated lazily). Default 1.5.
	HostMemoryOvercommit float64 `toml:"host_memory_overcommit"`
	// MaxVMs, MaxVCPUs and MaxMemoryMiB bound a user's VMs and their total
	// vCPUs and memory. Defaults DefaultMaxVMs, DefaultMaxVCPUs,
	// DefaultMaxMemoryMiB.
	MaxVMs       *int `toml:"max_vms"`
	MaxVCPUs     *int `toml:"max_vcpus"`
	MaxMemoryMiB *int `toml:"max_memory_mib"`
	// MaxCheckpointBytes bounds the total size of a user's checkpoints
	// and golden snapshots (with their backups). Default
	// DefaultMaxCheckpointBytes.
	MaxCheckpointBytes *int64 `toml:"max_checkpoint_bytes"`
	// MaxGoldens bounds how many golden snapshots (one per vCPUs×memory
	// spec) a user may keep. Default DefaultMaxGoldens.
	MaxGoldens *int `toml:"max_goldens"`
	// MaxDiskSize bounds the root disk of one VM, as a size ("0":
	// unlimited). Default DefaultMaxDiskSize.
	MaxDiskSize string `toml:"max_disk_size"`
}

// The [quota] defaults: finite, so that one local user or token cannot
// take a shared host's memory or disk (see SECURITY.md).
const (
	DefaultMaxVMs             = 20
	DefaultMaxVCPUs           = 32
	DefaultMaxMemoryMiB       = 32 << 10
	DefaultMaxCheckpointBytes = 64 << 30
	DefaultMaxGoldens         = 4
	DefaultMaxDiskSize        = "32G"
)

// QuotaLimits are the [quota] limits with their defaults applied; 0 means
// unlimited.
type QuotaLimits struct {
	MaxVMs, MaxVCPUs, MaxMemoryMiB, MaxGoldens int
	MaxCheckpointBytes, MaxDiskBytes           int64
}

// QuotaLimits returns the [quota] limits that apply to a user who is not
// an admin and has no limits of their own.
func (c *Config) QuotaLimits() QuotaLimits { return c.QuotaLimitsFor(false) }

// QuotaLimitsFor returns the [quota] limits that apply to a user without
// limits of their own. A key set in the config applies to every user; a
// missing one means its finite default for users who are not admins, and
// no limit for admins (root on the socket, --admin tokens), so that the
// operator's own work is not held to the tenants' defaults.
func (c *Config) QuotaLimitsFor(admin bool) QuotaLimits {
	or := func(p *int, def int) int {
		switch {
		case p != nil:
			return *p
		case admin:
			return 0
		}
		return def
	}
	q := QuotaLimits{MaxVMs: or(c.Quota.MaxVMs, DefaultMaxVMs), MaxVCPUs: or(c.Quota.MaxVCPUs, DefaultMaxVCPUs),
		MaxMemoryMiB: or(c.Quota.MaxMemoryMiB, DefaultMaxMemoryMiB), MaxGoldens: or(c.Quota.MaxGoldens, DefaultMaxGoldens)}
	switch {
	case c.Quota.MaxCheckpointBytes != nil:
		q.MaxCheckpointBytes = *c.Quota.MaxCheckpointBytes
	case !admin:
		q.MaxCheckpointBytes = DefaultMaxCheckpointBytes
	}
	disk := c.Quota.MaxDiskSize
	if disk == "" && !admin {
		disk = DefaultMaxDiskSize
	}
	if disk != "" {
		q.MaxDiskBytes, _ = ParseSize(disk)
	}
	return q
}

// Sandbox is the [sandbox] section. See SECURITY.md.
type Sandbox struct {
	// Require refuses to start VMMs when the confinement configured here
	// cannot be had (per-VM or shared uid, cgroups), and Firecracker
	// without its jailer, instead of running them unconfined as root.
	// The server still starts, so VMs can be listed and destroyed.
	// Default true.
	Require *bool `toml:"require"`
	// Seccomp runs QEMU with -sandbox on. Default true.
	Seccomp *bool `toml:"seccomp"`
	// User is who VMM processes run as: "auto" (or empty, the default)
	// gives each VMM a uid of its own from uid_base/uid_count when
	// noid-server runs as root; "root" keeps them root; any other value is
	// a user name or numeric uid that every VMM shares (weaker: VMMs of
	// one uid can ptrace each other).
	User string `toml:"user"`
	// UIDBase and UIDCount are the per-VM uid range (gid = uid). Default
	// 2000000000 and 65536. Nothing else on the host may use these uids.
	UIDBase  int64 `toml:"uid_base"`
	UIDCount int64 `toml:"uid_count"`
	// Cgroups places each VMM in its own cgroup with limits. Default true.
	Cgroups *bool `toml:"cgroups"`
	// CgroupParent is the parent cgroup of the VMM cgroups, relative to
	// each hierarchy's root. Default "noid".
	CgroupParent string `toml:"cgroup_parent"`
	// MemoryOverhead is added to guest RAM to give a VMM's cgroup memory
	// limit, as a size ("384M"). Default: the backend's (384M for QEMU).
	MemoryOverhead string `toml:"memory_overhead"`
	// PidsMax is a VMM cgroup's pids.max. Default: the backend's (QEMU:
	// 128 plus the vCPUs).
	PidsMax int64 `toml:"pids_max"`
}

// Default per-VM uid range ([sandbox] uid_base, uid_count).
const (
	DefaultUIDBase  = 2_000_000_000
	DefaultUIDCount = 65536
)

// SandboxUser returns the [sandbox] user setting with the default applied:
// "auto", "root", or a user name or uid.
func (c *Config) SandboxUser() string {
	if c.Sandbox.User == "" {
		return "auto"
	}
	return c.Sandbox.User
}

// NetworkEnabled reports whether VM networking is on.
func (c *Config) NetworkEnabled() bool { return c.Network.Enabled == nil || *c.Network.Enabled }

// SeccompEnabled reports whether QEMU runs with its seccomp sandbox.
func (c *Config) SeccompEnabled() bool { return c.Sandbox.Seccomp == nil || *c.Sandbox.Seccomp }

// SandboxRequired reports whether VMMs may only start fully confined
// ([sandbox] require).
func (c *Config) SandboxRequired() bool { return c.Sandbox.Require == nil || *c.Sandbox.Require }

// CgroupsEnabled reports whether VMMs get their own cgroups.
func (c *Config) CgroupsEnabled() bool { return c.Sandbox.Cgroups == nil || *c.Sandbox.Cgroups }

// SystemSocket is the default socket of a noid-server running as root; it is
// outside root's home so that the members of socket_group can reach it.
const SystemSocket = "/run/noid/noid.sock"

// DefaultDataDir is ~/.noid for the current user.
func DefaultDataDir() string {
	if h, err := os.UserHomeDir(); err == nil && h != "" {
		return filepath.Join(h, ".noid")
	}
	return "/var/lib/noid"
}

// Default returns a configuration with every default filled in.
func Default() *Config {
	c := &Config{}
	c.applyDefaults()
	return c
}

func (c *Config) applyDefaults() {
	if c.DataDir == "" {
		c.DataDir = DefaultDataDir()
	}
	if c.Socket == "" {
		if os.Geteuid() == 0 {
			c.Socket = SystemSocket
		} else {
			c.Socket = filepath.Join(c.DataDir, "noid.sock")
		}
	}
	if c.SocketGroup == "" {
		c.SocketGroup = "noid"
	}
	if c.Image == "" {
		c.Image = "auto"
	}
	if c.VMM == "" {
		c.VMM = "auto"
	}
	if c.Accel == "" {
		c.Accel = "auto"
	}
	if c.FirecrackerBinary == "" {
		c.FirecrackerBinary = "/usr/local/bin/firecracker"
	}
	if c.LogLevel == "" {
		c.LogLevel = "info"
	}
	if c.LogFormat == "" {
		c.LogFormat = "text"
	}
	if c.DefaultVCPUs == 0 {
		c.DefaultVCPUs = 1
	}
	if c.DefaultMemoryMiB == 0 {
		c.DefaultMemoryMiB = 2048
	}
	if c.Limits.SessionsPerUser == 0 {
		c.Limits.SessionsPerUser = DefaultSessionsPerUser
	}
	if c.Storage.ReflinkImage == "" {
		c.Storage.ReflinkImage = filepath.Join(c.DataDir, "reflink.img")
	}
	if c.Storage.Mode == "" {
		c.Storage.Mode = StorageModeAuto
	}
	if c.Network.Bridge == "" {
		c.Network.Bridge = "noid0"
	}
	if c.Network.Pool == "" {
		c.Network.Pool = "172.16.0.0/16"
	}
	if c.Network.DNSPort == 0 {
		c.Network.DNSPort = 53
	}
	if c.Network.DNSRate == 0 {
		c.Network.DNSRate = 100
	}
	if c.Network.DNSConcurrency == 0 {
		c.Network.DNSConcurrency = 64
	}
	if c.Sandbox.UIDBase == 0 {
		c.Sandbox.UIDBase = DefaultUIDBase
	}
	if c.Sandbox.UIDCount == 0 {
		c.Sandbox.UIDCount = DefaultUIDCount
	}
	c.HTTP.applyDefaults()
}

// Parse decodes TOML text, rejects unknown keys and fills in defaults. The
// Rust noid's keys (Legacy) are accepted, mapped and named in c.Warnings.
func Parse(data []byte) (*Config, error) {
	c := &Config{}
	dec := toml.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(c); err != nil {
		var sm *toml.StrictMissingError
		if errors.As(err, &sm) {
			return nil, fmt.Errorf("%w: unknown config key: %s", errdefs.ErrInvalidArgument, strings.TrimSpace(sm.String()))
		}
		var de *toml.DecodeError
		if errors.As(err, &de) {
			row, col := de.Position()
			return nil, fmt.Errorf("%w: config line %d column %d: %s", errdefs.ErrInvalidArgument, row, col, de.Error())
		}
		return nil, fmt.Errorf("%w: parsing config: %v", errdefs.ErrInvalidArgument, err)
	}
	c.applyLegacy()
	c.applyDefaults()
	if err := c.Validate(); err != nil {
		return nil, err
	}
	return c, nil
}

// Load reads the config file at path. An empty path gives the defaults.
func Load(path string) (*Config, error) {
	if path == "" {
		c := Default()
		return c, c.Validate()
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading config %s: %w", path, err)
	}
	c, err := Parse(data)
	if err != nil {
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	return c, nil
}

// Validate checks value ranges and enumerations.
func (c *Config) Validate() error {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%w: %s", errdefs.ErrInvalidArgument, fmt.Sprintf(format, a...))
	}
	if !filepath.IsAbs(c.DataDir) {
		return bad("data_dir must be an absolute path, got %q", c.DataDir)
	}
	switch c.VMM {
	case "auto", "qemu", "firecracker":
	default:
		return bad("vmm must be auto, qemu or firecracker, got %q", c.VMM)
	}
	switch c.Accel {
	case "auto", "kvm", "tcg":
	default:
		return bad("accel must be auto, kvm or tcg, got %q", c.Accel)
	}
	switch c.Image {
	case "auto", "debian", "tiny":
	default:
		return bad("image must be auto, debian or tiny, got %q", c.Image)
	}
	switch c.LogLevel {
	case "debug", "info", "warn", "error":
	default:
		return bad("log_level must be debug, info, warn or error, got %q", c.LogLevel)
	}
	switch c.LogFormat {
	case "text", "json":
	default:
		return bad("log_format must be text or json, got %q", c.LogFormat)
	}
	if strings.ContainsAny(c.SocketGroup, " \t\n:/,") || len(c.SocketGroup) > 32 || strings.HasPrefix(c.SocketGroup, "-") {
		return bad("socket_group must be a group name, got %q", c.SocketGroup)
	}
	if (c.TLSCert == "") != (c.TLSKey == "") {
		return bad("tls_cert and tls_key must be set together")
	}
	if c.DefaultVCPUs < 1 || c.DefaultVCPUs > 64 {
		return bad("default_vcpus must be 1..64, got %d", c.DefaultVCPUs)
	}
	if c.DefaultMemoryMiB < 64 {
		return bad("default_memory_mib must be at least 64, got %d", c.DefaultMemoryMiB)
	}
	if c.DefaultDiskSize != "" {
		if _, err := ParseSize(c.DefaultDiskSize); err != nil {
			return bad("default_disk_size: %v", err)
		}
	}
	if c.Exec.DefaultUser != "" {
		if err := api.ValidateGuestUser(c.Exec.DefaultUser); err != nil {
			return fmt.Errorf("exec.default_user: %w", err)
		}
	}
	if c.Limits.SerialLogSize != "" {
		n, err := ParseSize(c.Limits.SerialLogSize)
		if err != nil {
			return bad("limits.serial_log_size: %v", err)
		}
		if n < 64<<10 || n > 1<<30 {
			return bad("limits.serial_log_size must be between 64K and 1G, got %s", c.Limits.SerialLogSize)
		}
	}
	if c.Limits.SessionsPerUser < 0 || c.Limits.SessionsPerUser > 100000 {
		return bad("limits.sessions_per_user must be 1..100000 (0: the default, %d), got %d", DefaultSessionsPerUser, c.Limits.SessionsPerUser)
	}
	if c.Pool.Spares != nil && (*c.Pool.Spares < 0 || *c.Pool.Spares > 64) {
		return bad("pool.spares must be 0..64, got %d", *c.Pool.Spares)
	}
	if c.Pool.MemoryBudget != "" {
		if _, _, err := parseMinFree(c.Pool.MemoryBudget); err != nil {
			return bad("pool.memory_budget: %v", err)
		}
	}
	if c.Storage.MinFree != "" {
		if _, _, err := parseMinFree(c.Storage.MinFree); err != nil {
			return bad("storage.min_free: %v", err)
		}
	}
	switch c.Storage.Mode {
	case StorageModeAuto, StorageModeCopy, StorageModeReflink:
	default:
		return bad("storage.mode must be auto, copy or reflink, got %q", c.Storage.Mode)
	}
	if c.Storage.Mode == StorageModeCopy && c.Storage.ReflinkImageSize != "" {
		return bad("storage.mode = \"copy\" never makes reflinks, so storage.reflink_image_size has no use: unset one of them")
	}
	if c.Storage.ReflinkImageSize != "" {
		n, err := ParseSize(c.Storage.ReflinkImageSize)
		if err != nil {
			return bad("storage.reflink_image_size: %v", err)
		}
		if n < 1<<30 {
			return bad("storage.reflink_image_size must be at least 1G, got %s", c.Storage.ReflinkImageSize)
		}
	}
	p, err := netip.ParsePrefix(c.Network.Pool)
	if err != nil || !p.Addr().Is4() {
		return bad("network.pool must be an IPv4 prefix like 172.16.0.0/16, got %q", c.Network.Pool)
	}
	if p.Bits() > 29 || p.Bits() < 8 {
		return bad("network.pool prefix length must be between /8 and /29, got /%d", p.Bits())
	}
	if len(c.Network.Bridge) == 0 || len(c.Network.Bridge) > 15 {
		return bad("network.bridge must be 1..15 characters, got %q", c.Network.Bridge)
	}
	if c.Network.DNSPort < 1 || c.Network.DNSPort > 65535 {
		return bad("network.dns_port must be 1..65535")
	}
	for _, p := range c.Network.GatewayTCPPorts {
		if p < 1 || p > 65535 {
			return bad("network.gateway_tcp_ports: %d is not a port", p)
		}
	}
	for _, b := range c.Network.BlockedNets {
		if _, err := netip.ParsePrefix(b); err != nil {
			return bad("network.blocked_nets: %q is not a prefix", b)
		}
	}
	if c.Network.DNSRate < 1 || c.Network.DNSRate > 1e6 {
		return bad("network.dns_rate must be 1..1000000 queries per second, got %v", c.Network.DNSRate)
	}
	if c.Network.DNSConcurrency < 1 || c.Network.DNSConcurrency > 65536 {
		return bad("network.dns_concurrency must be 1..65536, got %d", c.Network.DNSConcurrency)
	}
	for _, a := range c.Network.AllowedNets {
		if p, err := netip.ParsePrefix(a); err != nil || !p.Addr().Is4() {
			return bad("network.allowed_nets: %q is not an IPv4 prefix", a)
		}
	}
	if c.Quota.HostMemoryOvercommit < 0 || c.Quota.HostMemoryOvercommit > 100 {
		return bad("quota.host_memory_overcommit must be between 0 and 100")
	}
	if c.Quota.MaxDiskSize != "" {
		if _, err := ParseSize(c.Quota.MaxDiskSize); err != nil {
			return bad("quota.max_disk_size: %v", err)
		}
	}
	if q := c.QuotaLimits(); q.MaxVMs < 0 || q.MaxVCPUs < 0 || q.MaxMemoryMiB < 0 || q.MaxCheckpointBytes < 0 || q.MaxGoldens < 0 {
		return bad("quota values must not be negative")
	}
	if err := c.validateSandbox(); err != nil {
		return bad("%v", err)
	}
	if err := c.HTTP.validate(); err != nil {
		return bad("%v", err)
	}
	if err := c.Remote.validate(); err != nil {
		return bad("%v", err)
	}
	return nil
}

// validateSandbox checks the [sandbox] section.
func (c *Config) validateSandbox() error {
	sb := c.Sandbox
	if sb.UIDBase <= 0 || sb.UIDCount <= 0 || sb.UIDBase > 1<<32 || sb.UIDCount > 1<<32 || sb.UIDBase+sb.UIDCount >= 1<<32-1 {
		return fmt.Errorf("sandbox.uid_base and uid_count must give a range of uids above 0 and below 4294967295")
	}
	if strings.ContainsAny(sb.User, " \t\n:/") {
		return fmt.Errorf("sandbox.user must be auto, root, a user name or a uid, got %q", sb.User)
	}
	if p := strings.Trim(sb.CgroupParent, "/"); sb.CgroupParent != "" {
		for _, el := range strings.Split(p, "/") {
			if el == "" || el == "." || el == ".." || strings.HasPrefix(el, "cgroup.") || strings.Trim(el, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-") != "" {
				return fmt.Errorf("sandbox.cgroup_parent must be a relative cgroup path like \"noid\", got %q", sb.CgroupParent)
			}
		}
	}
	if sb.MemoryOverhead != "" {
		if _, err := ParseSize(sb.MemoryOverhead); err != nil {
			return fmt.Errorf("sandbox.memory_overhead: %v", err)
		}
	}
	if sb.PidsMax < 0 {
		return fmt.Errorf("sandbox.pids_max must not be negative")
	}
	return nil
}

// ParseSize parses a byte size such as "4G", "512M", "1.5GiB" or "1073741824".
func ParseSize(s string) (int64, error) {
	t := strings.TrimSpace(strings.ToUpper(s))
	if t == "" {
		return 0, fmt.Errorf("empty size")
	}
	t = strings.TrimSuffix(strings.TrimSuffix(t, "B"), "I")
	mult := int64(1)
	switch {
	case strings.HasSuffix(t, "K"):
		mult = 1 << 10
	case strings.HasSuffix(t, "M"):
		mult = 1 << 20
	case strings.HasSuffix(t, "G"):
		mult = 1 << 30
	case strings.HasSuffix(t, "T"):
		mult = 1 << 40
	}
	if mult > 1 {
		t = t[:len(t)-1]
	}
	var whole, frac int64
	var fracDigits int64 = 1
	seenDot := false
	if t == "" {
		return 0, fmt.Errorf("invalid size %q", s)
	}
	for _, r := range t {
		switch {
		case r == '.' && !seenDot:
			seenDot = true
		case r >= '0' && r <= '9':
			if seenDot {
				if fracDigits < 1e9 {
					frac = frac*10 + int64(r-'0')
					fracDigits *= 10
				}
			} else {
				if whole > (1<<62)/10 {
					return 0, fmt.Errorf("size %q is too large", s)
				}
				whole = whole*10 + int64(r-'0')
			}
		default:
			return 0, fmt.Errorf("invalid size %q (use e.g. 4G, 512M)", s)
		}
	}
	if whole > (1<<62)/mult {
		return 0, fmt.Errorf("size %q is too large", s)
	}
	// frac*mult can exceed 64 bits ("0.999999999T"): multiply and divide
	// in 128 bits. frac < fracDigits, so the quotient is below mult.
	hi, lo := bits.Mul64(uint64(frac), uint64(mult))
	part, _ := bits.Div64(hi, lo, uint64(fracDigits))
	return whole*mult + int64(part), nil
}
