package config

import (
	"errors"
	"strings"
	"testing"

	"github.com/noid-vm/noid/internal/errdefs"
)

func TestDefaults(t *testing.T) {
	c, err := Parse([]byte(`data_dir = "/srv/noid"`))
	if err != nil {
		t.Fatal(err)
	}
	if c.VMM != "auto" || c.Accel != "auto" || c.DefaultVCPUs != 1 || c.DefaultMemoryMiB != 2048 || c.Listen != "" ||
		c.Network.Bridge != "noid0" || c.Network.Pool != "172.16.0.0/16" || !c.NetworkEnabled() || !c.SeccompEnabled() {
		t.Fatalf("defaults: %+v", c)
	}
	if c.StorageDir() != "/srv/noid" {
		t.Fatalf("storage dir %q", c.StorageDir())
	}
	if c.Storage.Mode != "auto" {
		t.Fatalf("[storage] mode defaults to %q, want auto", c.Storage.Mode)
	}
	for _, mode := range []string{"auto", "copy", "reflink"} {
		c, err := Parse([]byte("[storage]\nmode = \"" + mode + "\""))
		if err != nil || c.Storage.Mode != mode {
			t.Fatalf("[storage] mode = %q: %+v, %v", mode, c.Storage, err)
		}
	}
	if c, err := Parse([]byte("[storage]\nmode = \"reflink\"\nreflink_image_size = \"10G\"")); err != nil || c.StorageDir() != c.DataDir+"/reflink" {
		t.Fatalf("mode reflink with a reflink image: %v", err)
	}
	if c.Exec.DefaultUser != "" {
		t.Fatalf("exec.default_user defaults to %q, want root's empty", c.Exec.DefaultUser)
	}
	c, err = Parse([]byte("[exec]\ndefault_user = \"noid\""))
	if err != nil || c.Exec.DefaultUser != "noid" {
		t.Fatalf("[exec] default_user: %+v, %v", c.Exec, err)
	}
}

func TestParseErrors(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{`bogus = 1`, "unknown config key"},
		{`vmm = "xen"`, "vmm must be auto, qemu or firecracker"},
		{`accel = "hvf"`, "accel must be auto, kvm or tcg"},
		{`data_dir = "relative"`, "absolute"},
		{`tls_cert = "/a"`, "set together"},
		{"[network]\npool = \"172.16.0.0\"", "IPv4 prefix"},
		{"[network]\npool = \"10.0.0.0/30\"", "between /8 and /29"},
		{`default_vcpus = 0` + "\n" + `default_memory_mib = 10`, "default_memory_mib"},
		{"[storage]\nreflink_image_size = \"10M\"", "at least 1G"},
		{`data_dir = `, "line 1"},
		{"[exec]\ndefault_user = \"a:b\"", "exec.default_user: invalid argument: invalid user"},
		{"[network]\nallowed_nets = [\"fd00::/8\"]", "allowed_nets"},
		{"[network]\nallowed_nets = [\"lan\"]", "allowed_nets"},
		{"[network]\ndns_rate = -1", "dns_rate"},
		{"[quota]\nmax_vms = -1", "must not be negative"},
		{"[quota]\nmax_disk_size = \"big\"", "max_disk_size"},
		{"[storage]\nmin_free = \"120%\"", "min_free"},
		{"[storage]\nmin_free = \"lots\"", "min_free"},
		{"[storage]\nmode = \"x\"", `storage.mode must be auto, copy or reflink, got "x"`},
		{"[storage]\nmode = \"Reflink\"", `storage.mode must be auto, copy or reflink, got "Reflink"`},
		{"[storage]\nmode = \"copy\"\nreflink_image_size = \"10G\"", "reflink_image_size has no use"},
		{`socket_group = "a b"`, "socket_group"},
		{"[limits]\nserial_log_size = \"1K\"", "serial_log_size"},
		{"[limits]\nsessions_per_user = -1", "sessions_per_user"},
		{"[network]\ndns_concurrency = -5", "dns_concurrency"},
	} {
		_, err := Parse([]byte(tc.in))
		if err == nil || !strings.Contains(err.Error(), tc.want) || !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("Parse(%q) = %v, want an invalid-argument error containing %q", tc.in, err, tc.want)
		}
	}
}

func TestParseSize(t *testing.T) {
	for in, want := range map[string]int64{"1024": 1024, "4G": 4 << 30, "512M": 512 << 20, "1.5GiB": 3 << 29, "10k": 10 << 10, "1T": 1 << 40} {
		got, err := ParseSize(in)
		if err != nil || got != want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "G", "-1G", "1.2.3", "lots", "99999999999999999999T"} {
		if n, err := ParseSize(in); err == nil {
			t.Errorf("ParseSize(%q) = %d, want an error", in, n)
		}
	}
}

// TestSharedHostDefaults: the [quota] defaults are finite, a missing key
// means its default and 0 means unlimited; min_free takes a size or a
// percentage; the socket belongs to the noid group.
func TestSharedHostDefaults(t *testing.T) {
	c, err := Parse([]byte(`data_dir = "/srv/noid"`))
	if err != nil {
		t.Fatal(err)
	}
	want := QuotaLimits{MaxVMs: 20, MaxVCPUs: 32, MaxMemoryMiB: 32768, MaxGoldens: 4, MaxCheckpointBytes: 64 << 30, MaxDiskBytes: 32 << 30}
	if got := c.QuotaLimits(); got != want {
		t.Errorf("default quota %+v, want %+v", got, want)
	}
	if got := c.QuotaLimitsFor(true); got != (QuotaLimits{}) {
		t.Errorf("admins' default quota %+v, want none", got)
	}
	if b, p := c.MinFree(); b != 0 || p != 5 {
		t.Errorf("default min_free %d bytes %v%%, want 5%%", b, p)
	}
	if c.SocketGroup != "noid" || c.Limits.SessionsPerUser != 32 || c.SerialLogBytes() != 4<<20 {
		t.Errorf("socket_group %q, sessions_per_user %d, serial log %d", c.SocketGroup, c.Limits.SessionsPerUser, c.SerialLogBytes())
	}
	c, err = Parse([]byte("[quota]\nmax_vms = 0\nmax_checkpoint_bytes = 0\nmax_disk_size = \"0\"\n[storage]\nmin_free = \"10G\"\n"))
	if err != nil {
		t.Fatal(err)
	}
	if q := c.QuotaLimits(); q.MaxVMs != 0 || q.MaxCheckpointBytes != 0 || q.MaxDiskBytes != 0 || q.MaxVCPUs != 32 {
		t.Errorf("explicit 0s: %+v, want unlimited VMs, checkpoints and disk, default vCPUs", q)
	}
	if b, p := c.MinFree(); b != 10<<30 || p != 0 {
		t.Errorf("min_free 10G: %d bytes %v%%", b, p)
	}
	c, _ = Parse([]byte("[quota]\nmax_vms = 3\n"))
	if q := c.QuotaLimitsFor(true); q.MaxVMs != 3 || q.MaxVCPUs != 0 {
		t.Errorf("admins with max_vms = 3 set: %+v, want 3 VMs and nothing else", q)
	}
}

// TestPoolMemoryBudget: [pool] memory_budget is a size or a share of the
// host's RAM, 50% by default; anything else is refused.
func TestPoolMemoryBudget(t *testing.T) {
	for _, tc := range []struct {
		conf string
		want int
	}{
		{"", 8192},
		{"[pool]\nmemory_budget = \"25%\"\n", 4096},
		{"[pool]\nmemory_budget = \"3G\"\n", 3072},
		{"[pool]\nmemory_budget = \"0\"\n", 0},
	} {
		c, err := Parse([]byte("data_dir = \"/srv/noid\"\n" + tc.conf))
		if err != nil {
			t.Fatalf("%q: %v", tc.conf, err)
		}
		if got := c.PoolMemoryBudgetMiB(16384); got != tc.want {
			t.Errorf("%q on 16 GiB: %d MiB, want %d", tc.conf, got, tc.want)
		}
	}
	for _, bad := range []string{"lots", "150%", "-1G"} {
		if _, err := Parse([]byte("data_dir = \"/srv/noid\"\n[pool]\nmemory_budget = \"" + bad + "\"\n")); err == nil || !strings.Contains(err.Error(), "pool.memory_budget") {
			t.Errorf("memory_budget %q: %v, want a pool.memory_budget error", bad, err)
		}
	}
}
