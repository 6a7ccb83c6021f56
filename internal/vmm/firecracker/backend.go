package firecracker

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/noid-vm/noid/internal/errdefs"
	"github.com/noid-vm/noid/internal/vmm"
)

// Defaults of Config.
const (
	// DefaultBinary is where Firecracker's release tarball is usually
	// installed.
	DefaultBinary = "/usr/local/bin/firecracker"
	// DefaultBootArgs is the backend's own kernel command line; Spec.Cmdline
	// is appended to it.
	DefaultBootArgs = "console=ttyS0 reboot=k panic=1 pci=off"
	// AgentPort is the guest vsock port the noid agent listens on
	// (docs/agent-protocol.md).
	AgentPort = 1024
	// DefaultGuestCID is the guest's vsock context id. Every VM can use the
	// same one: the host side is a per-VM unix socket.
	DefaultGuestCID = 3
	// BackendName is the backend's name in configs and snapshot metadata.
	BackendName = "firecracker"
)

// The supported version range: MinVersion ≤ v < 2.0.0.
var (
	// MinVersion is the oldest supported Firecracker release (see the
	// package documentation for why).
	MinVersion = Semver{1, 16, 1}
	// MaxMajor is the newest supported major version.
	MaxMajor = 1
)

// JailerMode says when to run Firecracker under its jailer.
type JailerMode int

// The jailer modes.
const (
	// JailerAuto uses the jailer when its binary exists. Without one it
	// runs Firecracker directly only when the server is not root: as root,
	// Check and every VMM start fail with ErrNoJailer, because Firecracker
	// would run as root without a chroot.
	JailerAuto JailerMode = iota
	// JailerAlways requires the jailer; Check fails without it.
	JailerAlways
	// JailerNever runs Firecracker directly.
	JailerNever
	// JailerIfPresent uses the jailer when its binary exists and runs
	// Firecracker directly otherwise, as root too (JailerAuto before it
	// failed closed).
	JailerIfPresent
)

// ErrNoJailer is wrapped by the errors of Check and of VMM starts under
// JailerAuto when the server runs as root and there is no jailer. It wraps
// errdefs.ErrUnavailable.
var ErrNoJailer = fmt.Errorf("firecracker would run as root without its jailer: %w", errdefs.ErrUnavailable)

// Config configures the Firecracker backend. The zero value works: it uses
// DefaultBinary, the jailer next to it if present, diff snapshots, and the
// defaults documented on each field.
type Config struct {
	// Binary is the firecracker executable (DefaultBinary if empty).
	Binary string
	// Jailer is the jailer executable; empty means "jailer" in Binary's
	// directory.
	Jailer string
	// JailerMode chooses whether to use the jailer (JailerAuto if zero).
	JailerMode JailerMode
	// ChrootBaseDir is the jailer's --chroot-base-dir. Empty means
	// <Spec.Dir>/jail, on the same filesystem as the VM's files.
	ChrootBaseDir string
	// JailUID and JailGID are the jail's uid and gid when Spec.Sandbox is
	// nil (0 keeps root, still chrooted). Give all jails the same GID: the
	// memory files of checkpoints are shared by group.
	JailUID, JailGID int
	// CgroupVersion is the jailer's --cgroup-version; 0 detects it.
	CgroupVersion int
	// JailerCgroups are extra --cgroup <file>=<value> settings for the
	// jailer (used when Spec.Sandbox.CgroupPath is set).
	JailerCgroups []string
	// DisableDiffSnapshots turns dirty page tracking off: every checkpoint
	// then writes all of guest memory while the VM is paused.
	DisableDiffSnapshots bool
	// BootArgs replaces DefaultBootArgs.
	BootArgs string
	// GuestCID replaces DefaultGuestCID.
	GuestCID uint32
	// AgentPort replaces AgentPort.
	AgentPort uint32
	// StartTimeout bounds the wait for a new process's API socket (10 s if
	// zero).
	StartTimeout time.Duration
	// KVMDevice is the KVM device checked by Check (/dev/kvm if empty).
	KVMDevice string
	// LogLevel is Firecracker's log level (Warning if empty).
	LogLevel string
	// ClockRealtime makes restores advance the guest's kvmclock by the wall
	// time elapsed since the snapshot (Firecracker's clock_realtime). The
	// agent sets the guest clock after every restore either way.
	ClockRealtime bool
	// Logger receives the backend's diagnostics (slog.Default() if nil).
	Logger *slog.Logger
}

// Backend is the Firecracker vmm.Backend. It is safe for concurrent use.
type Backend struct {
	cfg Config

	mu       sync.Mutex
	version  string // cached Version answer
	verStamp string // binary identity the cache belongs to
	hashes   map[string]string
}

var _ vmm.Backend = (*Backend)(nil)

// New returns a Firecracker backend with cfg's defaults filled in.
func New(cfg Config) *Backend {
	if cfg.Binary == "" {
		cfg.Binary = DefaultBinary
	}
	if cfg.Jailer == "" {
		cfg.Jailer = filepath.Join(filepath.Dir(cfg.Binary), "jailer")
	}
	if cfg.BootArgs == "" {
		cfg.BootArgs = DefaultBootArgs
	}
	if cfg.GuestCID == 0 {
		cfg.GuestCID = DefaultGuestCID
	}
	if cfg.AgentPort == 0 {
		cfg.AgentPort = AgentPort
	}
	if cfg.StartTimeout == 0 {
		cfg.StartTimeout = 10 * time.Second
	}
	if cfg.KVMDevice == "" {
		cfg.KVMDevice = "/dev/kvm"
	}
	if cfg.LogLevel == "" {
		cfg.LogLevel = "Warning"
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	return &Backend{cfg: cfg, hashes: map[string]string{}}
}

// Name returns "firecracker".
func (b *Backend) Name() string { return BackendName }

// Semver is a parsed Firecracker version.
type Semver struct {
	// Major, Minor and Patch are the version's numbers.
	Major, Minor, Patch int
}

// String formats the version as "1.16.1".
func (v Semver) String() string { return fmt.Sprintf("%d.%d.%d", v.Major, v.Minor, v.Patch) }

// Less reports whether v is older than o.
func (v Semver) Less(o Semver) bool {
	if v.Major != o.Major {
		return v.Major < o.Major
	}
	if v.Minor != o.Minor {
		return v.Minor < o.Minor
	}
	return v.Patch < o.Patch
}

var versionRE = regexp.MustCompile(`v?(\d+)\.(\d+)\.(\d+)`)

// ParseVersion extracts the first x.y.z version from s, such as
// "Firecracker v1.16.1" or "1.16.1-dev".
func ParseVersion(s string) (Semver, error) {
	m := versionRE.FindStringSubmatch(s)
	if m == nil {
		return Semver{}, fmt.Errorf("no version number in %q", s)
	}
	var v Semver
	v.Major, _ = strconv.Atoi(m[1])
	v.Minor, _ = strconv.Atoi(m[2])
	v.Patch, _ = strconv.Atoi(m[3])
	return v, nil
}

// SupportedVersion reports whether v is in the supported range, and why not.
func SupportedVersion(v Semver) error {
	if v.Less(MinVersion) {
		return fmt.Errorf("firecracker %s is too old: noid needs %s or later 1.x", v, MinVersion)
	}
	if v.Major > MaxMajor {
		return fmt.Errorf("firecracker %s is newer than the supported 1.x series (from %s)", v, MinVersion)
	}
	return nil
}

// Version returns the Firecracker binary's version, such as "1.16.1", from
// `firecracker --version`. The answer is cached until the binary changes.
func (b *Backend) Version(ctx context.Context) (string, error) {
	fi, err := os.Stat(b.cfg.Binary)
	if err != nil {
		return "", fmt.Errorf("firecracker version: %w", err)
	}
	stamp := fmt.Sprintf("%d/%d", fi.Size(), fi.ModTime().UnixNano())
	b.mu.Lock()
	if b.verStamp == stamp {
		v := b.version
		b.mu.Unlock()
		return v, nil
	}
	b.mu.Unlock()
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, b.cfg.Binary, "--version").Output()
	if err != nil {
		return "", fmt.Errorf("running %s --version: %w", b.cfg.Binary, err)
	}
	first, _, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
	v, err := ParseVersion(first)
	if err != nil {
		return "", fmt.Errorf("running %s --version: %w", b.cfg.Binary, err)
	}
	b.mu.Lock()
	b.version, b.verStamp = v.String(), stamp
	b.mu.Unlock()
	return v.String(), nil
}

// KVM ioctls used by Check.
const (
	kvmGetAPIVersion = 0xAE00
	kvmCreateVM      = 0xAE01
	kvmAPIVersion    = 12
)

// Check verifies that Firecracker can run here: the binary exists and is a
// supported version, the jailer exists when required, KVM is usable (the
// device opens and a VM can be created), and, under JailerAuto as root,
// there is a jailer (else ErrNoJailer). Its error is one line that
// says what is missing, and wraps errdefs.ErrUnavailable.
func (b *Backend) Check(ctx context.Context) error {
	unavailable := func(format string, args ...any) error {
		return fmt.Errorf("firecracker backend unavailable: %s: %w", fmt.Sprintf(format, args...), errdefs.ErrUnavailable)
	}
	fi, err := os.Stat(b.cfg.Binary)
	if err != nil {
		return unavailable("no firecracker binary at %s (install release v%s or later from "+
			"https://github.com/firecracker-microvm/firecracker/releases, or set its path in the config)",
			b.cfg.Binary, MinVersion)
	}
	if fi.IsDir() || fi.Mode().Perm()&0o111 == 0 {
		return unavailable("%s is not an executable file", b.cfg.Binary)
	}
	ver, err := b.Version(ctx)
	if err != nil {
		return unavailable("%v", err)
	}
	v, _ := ParseVersion(ver)
	if err := SupportedVersion(v); err != nil {
		return unavailable("%v (binary %s)", err, b.cfg.Binary)
	}
	if b.cfg.JailerMode == JailerAlways && !b.haveJailer() {
		return unavailable("the config requires the jailer but there is none at %s", b.cfg.Jailer)
	}
	if err := checkKVM(b.cfg.KVMDevice); err != nil {
		return unavailable("%v", err)
	}
	return b.unjailedRoot(!b.useJailer())
}

// checkKVM opens the KVM device and creates (and drops) a VM.
func checkKVM(dev string) error {
	fd, err := unix.Open(dev, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		if errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("%s does not exist: this host has no KVM (no hardware virtualization, or the kvm module is not loaded); Firecracker cannot run without it", dev)
		}
		return fmt.Errorf("cannot open %s: %v (Firecracker needs read-write access to KVM)", dev, err)
	}
	defer unix.Close(fd)
	ver, err := unix.IoctlRetInt(fd, kvmGetAPIVersion)
	if err != nil {
		return fmt.Errorf("%s does not answer KVM_GET_API_VERSION: %v", dev, err)
	}
	if ver != kvmAPIVersion {
		return fmt.Errorf("%s speaks KVM API %d, want %d", dev, ver, kvmAPIVersion)
	}
	vm, err := unix.IoctlRetInt(fd, kvmCreateVM)
	if err != nil {
		return fmt.Errorf("%s cannot create a VM: %v", dev, err)
	}
	unix.Close(vm)
	return nil
}

// haveJailer reports whether the jailer binary exists.
func (b *Backend) haveJailer() bool {
	fi, err := os.Stat(b.cfg.Jailer)
	return err == nil && !fi.IsDir() && fi.Mode().Perm()&0o111 != 0
}

// useJailer decides whether a new VM runs under the jailer.
func (b *Backend) useJailer() bool {
	switch b.cfg.JailerMode {
	case JailerNever:
		return false
	case JailerAlways:
		return true
	default:
		return b.haveJailer()
	}
}

// unjailedRoot refuses, under JailerAuto, to start a Firecracker that is
// not jailed while the server runs as root.
func (b *Backend) unjailedRoot(unjailed bool) error {
	if !unjailed || b.cfg.JailerMode != JailerAuto || os.Geteuid() != 0 {
		return nil
	}
	return fmt.Errorf("%w (no jailer at %s, so it would get no chroot and no uid of its own): install the jailer next to firecracker, "+
		"or let Firecracker run without it", ErrNoJailer, b.cfg.Jailer)
}

// bootArgs is the kernel command line for spec.
// The agent finds its vsock port from the command line.
func (b *Backend) bootArgs(spec vmm.Spec) string {
	return strings.TrimSpace(fmt.Sprintf("%s noid.transport=vsock noid.vsock_port=%d %s", b.cfg.BootArgs, b.cfg.AgentPort, spec.Cmdline))
}

// fileHash returns the sha256 of a file, cached by path, size and mtime
// (boot files are immutable in practice, and hashing them at every
// checkpoint would cost tens of milliseconds).
func (b *Backend) fileHash(path string) (string, error) {
	if path == "" {
		return "", nil
	}
	fi, err := os.Stat(path)
	if err != nil {
		return "", err
	}
	key := fmt.Sprintf("%s\x00%d\x00%d", path, fi.Size(), fi.ModTime().UnixNano())
	b.mu.Lock()
	h, ok := b.hashes[key]
	b.mu.Unlock()
	if ok {
		return h, nil
	}
	h, err = sha256File(path)
	if err != nil {
		return "", err
	}
	b.mu.Lock()
	b.hashes[key] = h
	b.mu.Unlock()
	return h, nil
}

// validateSpec checks what Firecracker needs from a spec.
func validateSpec(spec vmm.Spec) error {
	var problems []string
	if spec.ID == "" {
		problems = append(problems, "no id")
	}
	if spec.Dir == "" || !filepath.IsAbs(spec.Dir) {
		problems = append(problems, fmt.Sprintf("dir %q is not an absolute path", spec.Dir))
	}
	if spec.Disk == "" || !filepath.IsAbs(spec.Disk) {
		problems = append(problems, fmt.Sprintf("disk %q is not an absolute path", spec.Disk))
	}
	if spec.VCPUs < 1 || spec.VCPUs > 32 {
		problems = append(problems, fmt.Sprintf("%d vCPUs (Firecracker takes 1 to 32)", spec.VCPUs))
	}
	if spec.MemoryMiB < 1 {
		problems = append(problems, fmt.Sprintf("%d MiB of memory", spec.MemoryMiB))
	}
	if spec.Accel == vmm.AccelTCG {
		problems = append(problems, "accel tcg (Firecracker runs only on KVM)")
	}
	if spec.Net != nil && spec.Net.Tap == "" {
		problems = append(problems, "a NIC without a TAP device")
	}
	if len(problems) > 0 {
		return fmt.Errorf("invalid spec for firecracker: %s: %w", strings.Join(problems, ", "), errdefs.ErrInvalidArgument)
	}
	return nil
}

// fcID turns a VM id into one Firecracker and the jailer accept: letters,
// digits and hyphens, at most 64 characters.
func fcID(id string) string {
	var b strings.Builder
	for _, r := range id {
		if r < 128 && (r == '-' || r >= '0' && r <= '9' || r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z') {
			b.WriteRune(r)
		} else {
			b.WriteByte('-')
		}
		if b.Len() == 64 {
			break
		}
	}
	return b.String()
}

// tail returns the last n bytes of a file, for error messages.
func tail(path string, n int64) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return ""
	}
	off := max(fi.Size()-n, 0)
	buf := make([]byte, fi.Size()-off)
	f.ReadAt(buf, off)
	return string(bytes.TrimSpace(buf))
}
