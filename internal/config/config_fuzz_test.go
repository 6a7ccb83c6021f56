package config

import (
	"bytes"
	"errors"
	"strconv"
	"strings"
	"testing"

	"github.com/pelletier/go-toml/v2"

	"github.com/noid-vm/noid/internal/errdefs"
)

// FuzzParseSize: ParseSize never panics and never returns a negative size;
// a size it accepts prints back as a plain number that parses to the same
// value; a plain decimal number parses to itself; a unit multiplies.
func FuzzParseSize(f *testing.F) {
	for _, s := range []string{"4G", "512M", "1.5GiB", "1073741824", "0", "0.999999999T", "8E", ".5k", "1.", "9223372036854775807",
		"4611686018427387904", " 12 kb ", "-1", "1e9", "G", "", "1..2", "4gib"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		n, err := ParseSize(s)
		if err != nil {
			return
		}
		if n < 0 {
			t.Fatalf("ParseSize(%q) = %d", s, n)
		}
		back, err := ParseSize(strconv.FormatInt(n, 10))
		if err != nil || back != n {
			t.Fatalf("ParseSize(%q) = %d, which parses back as %d, %v", s, n, back, err)
		}
		t2 := strings.TrimSpace(s)
		if v, err := strconv.ParseInt(t2, 10, 64); err == nil && v >= 0 && v != n {
			t.Fatalf("ParseSize(%q) = %d, want %d", s, n, v)
		}
		if k, err := ParseSize(t2 + "K"); err == nil && !strings.ContainsAny(strings.ToUpper(t2), "KMGTIB.") && k != n*1024 {
			t.Fatalf("ParseSize(%qK) = %d, want %d", t2, k, n*1024)
		}
	})
}

// FuzzParse: Parse never panics; it either fails with an invalid-argument
// error or returns a config that passes Validate, and that config written
// back as TOML parses to the same config.
func FuzzParse(f *testing.F) {
	f.Add([]byte(""))
	f.Add([]byte("data_dir = \"/var/lib/noid\"\nlisten = \"127.0.0.1:7070\"\n[network]\npool = \"10.9.0.0/16\"\ngateway_tcp_ports = [3128]\n[quota]\nmax_vms = 3\n[sandbox]\nuser = \"auto\"\nuid_base = 3000000000\nmemory_overhead = \"1G\"\n"))
	f.Add([]byte("vmm = \"qemu\"\naccel = \"tcg\"\ndefault_memory_mib = 256\ndefault_disk_size = \"2G\"\n[storage]\nreflink_image_size = \"100G\"\n"))
	f.Add([]byte("unknown_key = 1\n"))
	f.Add([]byte("trust_forwarded_for = true\nmax_ws_sessions = 64\nexec_timeout_secs = 30\nconsole_timeout_secs = 3600\n"))
	f.Add([]byte("[network]\nenabled = false\nblocked_nets = [\"192.168.0.0/16\"]\n[sandbox]\nseccomp = false\ncgroups = false\ncgroup_parent = \"a/b\"\npids_max = 10\n"))
	f.Add([]byte("data_dir = \"relative\"\n"))
	f.Add([]byte("tls_cert = \"/c\"\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := Parse(data)
		if err != nil {
			if !errors.Is(err, errdefs.ErrInvalidArgument) {
				t.Fatalf("Parse error %v is not invalid-argument", err)
			}
			return
		}
		if err := c.Validate(); err != nil {
			t.Fatalf("Parse returned a config that fails Validate: %v", err)
		}
		out, err := toml.Marshal(c)
		if err != nil {
			t.Fatalf("marshal: %v", err)
		}
		c2, err := Parse(out)
		if err != nil {
			t.Fatalf("a parsed config does not parse again: %v\n%s", err, out)
		}
		// Compared as TOML: an empty list comes back as an empty, not a nil, slice.
		out2, _ := toml.Marshal(c2)
		if !bytes.Equal(out, out2) || c.NetworkEnabled() != c2.NetworkEnabled() || c.SeccompEnabled() != c2.SeccompEnabled() || c.CgroupsEnabled() != c2.CgroupsEnabled() {
			t.Fatalf("round trip differs:\n%s\n%s", out, out2)
		}
	})
}
