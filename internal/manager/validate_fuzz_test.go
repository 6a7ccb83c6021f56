package manager

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
	"testing"

	"github.com/noid-vm/noid/internal/api"
	"github.com/noid-vm/noid/internal/config"
	"github.com/noid-vm/noid/internal/errdefs"
	"github.com/noid-vm/noid/internal/store"
	"github.com/noid-vm/noid/internal/vmm"
)

// The fuzz targets in this file feed arbitrary bytes through the exact
// decode and validation path of each API request body: api.Decode (which
// the server's handlers call) and the manager's own checks. Every target
// checks that nothing panics, that every rejection is an invalid argument
// (a 400), and the invariants of what is accepted.

// decodeBody decodes data as the server decodes a request body.
func decodeBody(data []byte, v any) error {
	return api.Decode(bytes.NewReader(data), v)
}

// checkDecode decodes data into v and, when that succeeds, checks that v
// survives a JSON round trip through decodeJSON. It reports whether data
// decoded.
func checkDecode[T any](t *testing.T, data []byte, v *T) bool {
	t.Helper()
	if err := decodeBody(data, v); err != nil {
		if !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Fatalf("decode error %v is not invalid-argument", err)
		}
		return false
	}
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatalf("re-encoding: %v", err)
	}
	var back T
	if err := decodeBody(b, &back); err != nil {
		t.Fatalf("re-encoded body %s does not decode: %v", b, err)
	}
	if !reflect.DeepEqual(*v, back) {
		t.Fatalf("round trip differs: %+v vs %+v", *v, back)
	}
	return true
}

// mustBeBadRequest fails unless err is an invalid-argument error.
func mustBeBadRequest(t *testing.T, err error) {
	t.Helper()
	if !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Fatalf("validation error %v is not invalid-argument", err)
	}
}

// FuzzCreateVMRequest: the body of POST /v1/vms through decodeJSON and
// validateCreate.
func FuzzCreateVMRequest(f *testing.F) {
	for _, s := range []string{`{"name":"a"}`, `{"name":"web-1","vcpus":1,"memory_mib":256,"disk_size":"2G","network":"none"}`,
		`{"name":"x","disk_size":"0.999999999T"}`, `{"name":"x","vcpus":-1}`, `{"name":"_provision","cold_boot":true,"no_wait":true,"allow_peers":true}`,
		`{"name":"a","extra":1}`, `{"name":"a"} {"name":"b"}`, ``, `[]`, `{"NAME":"a"}`, `{"name":"a","memory_mib":1e3}`, `{"name":"a","network":"default"}`} {
		f.Add([]byte(s))
	}
	cfg := config.Default()
	s := &Manager{cfg: cfg}
	u := &store.User{ID: 1, Name: "fuzz"}
	maxV, maxM := hostLimits()
	f.Fuzz(func(t *testing.T, data []byte) {
		var req api.CreateVMRequest
		if !checkDecode(t, data, &req) {
			return
		}
		p, err := s.validateCreate(u, req)
		if errors.Is(err, errdefs.ErrQuotaExceeded) {
			// Only a disk above the user's max_disk_size is over quota.
			n, perr := config.ParseSize(req.DiskSize)
			if max := cfg.QuotaLimitsFor(u.IsAdmin).MaxDiskBytes; perr != nil || max == 0 || n <= max {
				t.Fatalf("quota error %v for disk size %q (max %d)", err, req.DiskSize, max)
			}
			return
		}
		if err != nil {
			mustBeBadRequest(t, err)
			return
		}
		if api.ValidateVMName(p.name) != nil || p.name != req.Name {
			t.Fatalf("accepted name %q", p.name)
		}
		if p.vcpus < 1 || p.vcpus > maxV || p.memMiB < 64 || p.memMiB > maxM {
			t.Fatalf("accepted %d vCPUs and %d MiB", p.vcpus, p.memMiB)
		}
		if p.diskBytes != 0 && (p.diskBytes < 64<<20 || p.diskBytes > 16<<40) {
			t.Fatalf("accepted disk size %d", p.diskBytes)
		}
		if p.network != "default" && p.network != "none" {
			t.Fatalf("accepted network %q", p.network)
		}
	})
}

// FuzzCheckpointRequest: POST /v1/vms/{name}/checkpoints.
func FuzzCheckpointRequest(f *testing.F) {
	for _, s := range []string{`{}`, `{"name":"c1","label":"before upgrade"}`, `{"name":"Bad"}`, `{"name":"a.b_c-1"}`,
		`{"label":"` + strings.Repeat("x", 1025) + `"}`, `{"name":".x"}`, `null`, `{"name":null}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		var req api.CheckpointRequest
		if !checkDecode(t, data, &req) {
			return
		}
		name, err := checkpointName(req, "0a1b2c3d")
		if err != nil {
			mustBeBadRequest(t, err)
			return
		}
		if len(req.Label) > 1024 {
			t.Fatalf("accepted a %d-byte label", len(req.Label))
		}
		if req.Name == "" && name != "0a1b2c3d" || req.Name != "" && (name != req.Name || api.ValidateCheckpointName(name) != nil) {
			t.Fatalf("name %q for request %+v", name, req)
		}
	})
}

// FuzzRestoreRequest: POST /v1/vms/{name}/restore.
func FuzzRestoreRequest(f *testing.F) {
	for _, s := range []string{`{"checkpoint":"c1"}`, `{"checkpoint":"c1","as":"clone-1"}`, `{"checkpoint":""}`, `{"as":"x"}`,
		`{"checkpoint":"c1","as":"../etc"}`, `{"checkpoint":"\u0000"}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		var req api.RestoreRequest
		if !checkDecode(t, data, &req) {
			return
		}
		if err := checkRestoreRequest(req); err != nil {
			mustBeBadRequest(t, err)
			return
		}
		if req.Checkpoint == "" || req.As != "" && api.ValidateVMName(req.As) != nil {
			t.Fatalf("accepted %+v", req)
		}
	})
}

// FuzzGoldenPromoteRequest: POST /v1/golden.
func FuzzGoldenPromoteRequest(f *testing.F) {
	for _, s := range []string{`{"vm":"a","checkpoint":"c1"}`, `{"checkpoint":"0a1b2c3d"}`, `{}`, `{"vm":"a"}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		var req api.GoldenPromoteRequest
		if !checkDecode(t, data, &req) {
			return
		}
		if err := checkPromoteRequest(req); err != nil {
			mustBeBadRequest(t, err)
			return
		}
		if req.VM == "" && req.Checkpoint == "" {
			t.Fatalf("accepted %+v", req)
		}
	})
}

// FuzzExecRequest: the first message of the exec and console WebSockets,
// decoded as the server does and checked by execParams (for both).
func FuzzExecRequest(f *testing.F) {
	for _, s := range []string{`{"argv":["uname","-a"]}`, `{"argv":["sh"],"env":{"A":"1","B":"x=y"},"cwd":"/root","tty":true,"rows":24,"cols":80,"timeout_ms":1000,"stdin":true}`,
		`{}`, `{"argv":[]}`, `{"argv":["x"],"env":{"":"1"}}`, `{"argv":["x"],"env":{"A=B":"1"}}`, `{"argv":["x"],"env":{"A":"\u0000"}}`,
		`{"argv":["x"],"rows":70000}`, `{"argv":["x"],"timeout_ms":-1}`, `{"argv":"x"}`, `{"argv":["x"],"unknown":true}`,
		`{"argv":["id"],"user":"noid"}`, `{"argv":["id"],"user":"a:b"}`, `{"argv":["id"],"user":"-x"}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		var req api.ExecRequest
		if json.Unmarshal(data, &req) != nil {
			return // the server refuses it before the manager sees it
		}
		for _, console := range []bool{false, true} {
			p, err := execParams(req, console)
			if err != nil {
				mustBeBadRequest(t, err)
				continue
			}
			if len(p.Argv) == 0 && !console || p.TimeoutMS < 0 || console && (!p.TTY || !p.Stdin) {
				t.Fatalf("accepted %+v (console %v)", p, console)
			}
			if !sort.StringsAreSorted(p.Env) {
				t.Fatalf("env not sorted: %q", p.Env)
			}
			if p.User != req.User || p.User != "" && api.ValidateGuestUser(p.User) != nil {
				t.Fatalf("user %q accepted as %q", req.User, p.User)
			}
			for _, kv := range p.Env {
				k, v, ok := strings.Cut(kv, "=")
				if !ok || k == "" || strings.ContainsRune(k, 0) || strings.ContainsRune(v, 0) {
					t.Fatalf("accepted env entry %q", kv)
				}
			}
		}
	})
}

// FuzzGoldenConfig: a golden snapshot's config.json through
// readGoldenConfig. What it accepts must be usable: a backend, vCPUs and
// memory.
func FuzzGoldenConfig(f *testing.F) {
	good, _ := json.Marshal(goldenConfig{SnapshotMeta: vmm.SnapshotMeta{Backend: "qemu", VMMVersion: "7.2.22", VCPUs: 1, MemoryMiB: 256, Accel: vmm.AccelTCG, HasNet: true},
		RootfsFingerprint: "meta:00", Source: "checkpoint c of vm a"})
	for _, s := range []string{string(good), `{}`, `{"backend":"qemu","vcpus":0,"memory_mib":256}`, `{"backend":"qemu","vcpus":1,"memory_mib":-1}`,
		`{"backend":"qemu","vcpus":1,"memory_mib":1,"created_at":"not a time"}`, `[`, ``} {
		f.Add([]byte(s))
	}
	dir := f.TempDir()
	f.Fuzz(func(t *testing.T, data []byte) {
		if err := os.WriteFile(filepath.Join(dir, vmm.GoldenConfig), data, 0o600); err != nil {
			t.Fatal(err)
		}
		c, err := readGoldenConfig(dir)
		if err != nil {
			return
		}
		if c.Backend == "" || c.VCPUs <= 0 || c.MemoryMiB <= 0 {
			t.Fatalf("accepted an unusable golden config %+v", c)
		}
	})
}
