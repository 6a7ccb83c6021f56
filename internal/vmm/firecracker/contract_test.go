package firecracker

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"
)

// recorder is a bare unix-socket HTTP server that records requests and
// answers like Firecracker would on success, with no state machine, so that
// every request the client can build reaches the contract check.
type recorder struct {
	mu   sync.Mutex
	reqs []recorded
	srv  *http.Server
	sock string
}

type recorded struct {
	method, path string
	body         []byte
	contentType  string
}

func newRecorder(t *testing.T) *recorder {
	t.Helper()
	r := &recorder{sock: filepath.Join(t.TempDir(), "api.sock")}
	ln, err := net.Listen("unix", r.sock)
	if err != nil {
		t.Fatal(err)
	}
	r.srv = &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		body, _ := io.ReadAll(req.Body)
		r.mu.Lock()
		r.reqs = append(r.reqs, recorded{req.Method, req.URL.Path, body, req.Header.Get("Content-Type")})
		r.mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		switch {
		case req.Method == "GET" && req.URL.Path == "/":
			w.Write([]byte(`{"app_name":"Firecracker","id":"x","state":"Running","vmm_version":"1.16.1"}`))
		case req.Method == "GET" && req.URL.Path == "/version":
			w.Write([]byte(`{"firecracker_version":"1.16.1"}`))
		case req.Method == "GET" && req.URL.Path == "/machine-config":
			w.Write([]byte(`{"vcpu_count":2,"mem_size_mib":256,"smt":false,"track_dirty_pages":true}`))
		default:
			w.WriteHeader(http.StatusNoContent)
		}
	})}
	go r.srv.Serve(ln)
	t.Cleanup(func() { r.srv.Close() })
	return r
}

func (r *recorder) last() recorded {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.reqs[len(r.reqs)-1]
}

// contractCase is one request the client can send.
type contractCase struct {
	name   string
	method string // the Client method it exercises
	call   func(context.Context, *Client) error
	// wantMethod and wantPath are what must go on the wire.
	wantMethod, wantPath string
}

// limiter is a realistic rate limiter with every field set.
var limiter = &RateLimiter{
	Bandwidth: &TokenBucket{Size: 100 << 20, OneTimeBurst: 10 << 20, RefillTime: 1000},
	Ops:       &TokenBucket{Size: 1000, RefillTime: 1000},
}

// contractCases builds every request the client can send, with realistic
// values: each body once with every optional field set and once as noid
// sends it.
func contractCases() []contractCase {
	return []contractCase{
		{"machine-config/full", "PutMachineConfig", func(ctx context.Context, c *Client) error {
			return c.PutMachineConfig(ctx, MachineConfig{VCPUCount: 2, MemSizeMiB: 512, SMT: true, TrackDirtyPages: true, HugePages: "2M"})
		}, "PUT", "/machine-config"},
		{"machine-config/noid", "PutMachineConfig", func(ctx context.Context, c *Client) error {
			return c.PutMachineConfig(ctx, MachineConfig{VCPUCount: 1, MemSizeMiB: 256, TrackDirtyPages: true})
		}, "PUT", "/machine-config"},
		{"machine-config/get", "GetMachineConfig", func(ctx context.Context, c *Client) error {
			mc, err := c.GetMachineConfig(ctx)
			if err == nil && mc.MemSizeMiB != 256 {
				return errors.New("machine config not decoded")
			}
			return err
		}, "GET", "/machine-config"},
		{"boot-source/full", "PutBootSource", func(ctx context.Context, c *Client) error {
			return c.PutBootSource(ctx, BootSource{KernelImagePath: "/var/lib/noid/images/vmlinux-6.1", InitrdPath: "/var/lib/noid/images/agent.cpio", BootArgs: DefaultBootArgs + " quiet"})
		}, "PUT", "/boot-source"},
		{"boot-source/minimal", "PutBootSource", func(ctx context.Context, c *Client) error {
			return c.PutBootSource(ctx, BootSource{KernelImagePath: "vmlinux"})
		}, "PUT", "/boot-source"},
		{"drive/full", "PutDrive", func(ctx context.Context, c *Client) error {
			return c.PutDrive(ctx, Drive{DriveID: "data", PathOnHost: "/srv/data.ext4", IsRootDevice: true, IsReadOnly: true,
				PartUUID: "0eaa91a0-01", CacheType: "Writeback", IOEngine: "Async", RateLimiter: limiter})
		}, "PUT", "/drives/data"},
		{"drive/noid", "PutDrive", func(ctx context.Context, c *Client) error {
			return c.PutDrive(ctx, Drive{DriveID: driveID, PathOnHost: fcDisk})
		}, "PUT", "/drives/rootfs"},
		{"network-interface/full", "PutNetworkInterface", func(ctx context.Context, c *Client) error {
			return c.PutNetworkInterface(ctx, NetworkInterface{IfaceID: "eth0", HostDevName: "noid-tap7", GuestMAC: "06:00:ac:10:00:07",
				MTU: 1500, RxRateLimiter: limiter, TxRateLimiter: limiter})
		}, "PUT", "/network-interfaces/eth0"},
		{"network-interface/noid", "PutNetworkInterface", func(ctx context.Context, c *Client) error {
			return c.PutNetworkInterface(ctx, NetworkInterface{IfaceID: ifaceID, HostDevName: "tap0"})
		}, "PUT", "/network-interfaces/eth0"},
		{"vsock", "PutVsock", func(ctx context.Context, c *Client) error {
			return c.PutVsock(ctx, Vsock{GuestCID: DefaultGuestCID, UDSPath: fcVsock})
		}, "PUT", "/vsock"},
		{"entropy/empty", "PutEntropy", func(ctx context.Context, c *Client) error {
			return c.PutEntropy(ctx, EntropyDevice{})
		}, "PUT", "/entropy"},
		{"entropy/limited", "PutEntropy", func(ctx context.Context, c *Client) error {
			return c.PutEntropy(ctx, EntropyDevice{RateLimiter: limiter})
		}, "PUT", "/entropy"},
		{"logger/full", "PutLogger", func(ctx context.Context, c *Client) error {
			return c.PutLogger(ctx, Logger{LogPath: fcLog, Level: "Debug", ShowLevel: true, ShowLogOrigin: true, Module: "api_server::request"})
		}, "PUT", "/logger"},
		{"logger/noid", "PutLogger", func(ctx context.Context, c *Client) error {
			return c.PutLogger(ctx, New(Config{}).logger())
		}, "PUT", "/logger"},
		{"actions/start", "InstanceStart", func(ctx context.Context, c *Client) error {
			return c.InstanceStart(ctx)
		}, "PUT", "/actions"},
		{"actions/ctrl-alt-del", "Action", func(ctx context.Context, c *Client) error {
			return c.Action(ctx, ActionSendCtrlAltDel)
		}, "PUT", "/actions"},
		{"actions/flush-metrics", "Action", func(ctx context.Context, c *Client) error {
			return c.Action(ctx, ActionFlushMetrics)
		}, "PUT", "/actions"},
		{"vm/pause", "Pause", func(ctx context.Context, c *Client) error { return c.Pause(ctx) }, "PATCH", "/vm"},
		{"vm/resume", "Resume", func(ctx context.Context, c *Client) error { return c.Resume(ctx) }, "PATCH", "/vm"},
		{"snapshot-create/full", "CreateSnapshot", func(ctx context.Context, c *Client) error {
			return c.CreateSnapshot(ctx, SnapshotCreateParams{SnapshotType: SnapshotFull, SnapshotPath: "/var/lib/noid/ckpt/vmstate.snap", MemFilePath: "/var/lib/noid/ckpt/memory.snap"})
		}, "PUT", "/snapshot/create"},
		{"snapshot-create/diff-jailed", "CreateSnapshot", func(ctx context.Context, c *Client) error {
			return c.CreateSnapshot(ctx, SnapshotCreateParams{SnapshotType: SnapshotDiff, SnapshotPath: "snapshot/vmstate.snap", MemFilePath: "snapshot/memory.diff"})
		}, "PUT", "/snapshot/create"},
		{"snapshot-create/default-type", "CreateSnapshot", func(ctx context.Context, c *Client) error {
			return c.CreateSnapshot(ctx, SnapshotCreateParams{SnapshotPath: "s", MemFilePath: "m"})
		}, "PUT", "/snapshot/create"},
		{"snapshot-load/full", "LoadSnapshot", func(ctx context.Context, c *Client) error {
			return c.LoadSnapshot(ctx, SnapshotLoadParams{
				SnapshotPath:     "/var/lib/noid/ckpt/vmstate.snap",
				MemBackend:       &MemoryBackend{BackendType: MemBackendFile, BackendPath: "/var/lib/noid/vms/b/memory.snap"},
				TrackDirtyPages:  true,
				ResumeVM:         true,
				NetworkOverrides: []NetworkOverride{{IfaceID: ifaceID, HostDevName: "noid-tap9"}},
				VsockOverride:    &VsockOverride{UDSPath: fcVsock},
				ClockRealtime:    true,
			})
		}, "PUT", "/snapshot/load"},
		{"snapshot-load/uffd", "LoadSnapshot", func(ctx context.Context, c *Client) error {
			return c.LoadSnapshot(ctx, SnapshotLoadParams{SnapshotPath: fcState,
				MemBackend: &MemoryBackend{BackendType: MemBackendUffd, BackendPath: "uffd.sock"}})
		}, "PUT", "/snapshot/load"},
		{"version", "Version", func(ctx context.Context, c *Client) error {
			v, err := c.Version(ctx)
			if err == nil && v != "1.16.1" {
				return errors.New("version not decoded")
			}
			return err
		}, "GET", "/version"},
		{"describe", "DescribeInstance", func(ctx context.Context, c *Client) error {
			info, err := c.DescribeInstance(ctx)
			if err == nil && info.State != InstanceRunning {
				return errors.New("instance info not decoded")
			}
			return err
		}, "GET", "/"},
	}
}

// TestContractRequestsMatchFirecrackerSchema is the contract test: every
// request body the client can send, built from realistic values, must
// validate against Firecracker v1.16.1's own API schema (required fields,
// types, enums, ranges, no unknown properties since Firecracker rejects
// them), and every method and path the client uses must exist in it. It
// SKIPS, saying so, where ../shared/firecracker/firecracker-v1.16.1.yaml is
// absent.
func TestContractRequestsMatchFirecrackerSchema(t *testing.T) {
	schema, path := loadSchema(t)
	t.Logf("contract: %s (Firecracker API %s, %d operations)", path, schema.Version, len(schema.Operations))
	rec := newRecorder(t)
	c := NewClient(rec.sock)
	covered := map[string]bool{}
	for _, tc := range contractCases() {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			if err := tc.call(ctx, c); err != nil {
				t.Fatalf("%s: %v", tc.method, err)
			}
			covered[tc.method] = true
			got := rec.last()
			if got.method != tc.wantMethod || got.path != tc.wantPath {
				t.Fatalf("sent %s %s, want %s %s", got.method, got.path, tc.wantMethod, tc.wantPath)
			}
			if _, ok := schema.Lookup(got.method, got.path); !ok {
				t.Fatalf("%s %s does not exist in the Firecracker API", got.method, got.path)
			}
			if err := schema.ValidateRequest(got.method, got.path, got.body); err != nil {
				t.Fatalf("body %s: %v", got.body, err)
			}
			if len(got.body) > 0 && got.contentType != "application/json" {
				t.Fatalf("Content-Type %q", got.contentType)
			}
			t.Logf("%s %s %s", got.method, got.path, got.body)
		})
	}

	// Every request-sending method of Client is in the table, so a method
	// added later cannot escape the contract.
	notRequests := map[string]bool{"SocketPath": true, "CloseIdleConnections": true, "WaitReady": true}
	typ := reflect.TypeOf(c)
	for i := 0; i < typ.NumMethod(); i++ {
		m := typ.Method(i).Name
		if !notRequests[m] && !covered[m] {
			t.Errorf("Client.%s sends a request but has no contract case", m)
		}
	}
}

// TestContractNoidLoadBodyRules checks the rule the schema states only in
// prose: exactly one of mem_file_path and mem_backend.
func TestContractNoidLoadBodyRules(t *testing.T) {
	rec := newRecorder(t)
	c := NewClient(rec.sock)
	if err := c.LoadSnapshot(context.Background(), SnapshotLoadParams{SnapshotPath: "s"}); err == nil {
		t.Fatal("LoadSnapshot without mem_backend was sent")
	}
	b, _ := json.Marshal(SnapshotLoadParams{SnapshotPath: "s", MemBackend: &MemoryBackend{MemBackendFile, "m"}})
	if strings.Contains(string(b), "mem_file_path") || strings.Contains(string(b), "enable_diff_snapshots") {
		t.Fatalf("deprecated fields sent: %s", b)
	}
}

// TestClientErrors checks that Firecracker's fault_message reaches the
// caller, wrapped, and transport failures are reported with the socket.
func TestClientErrors(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "api.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/snapshot/create":
			w.WriteHeader(400)
			w.Write([]byte(`{"fault_message":"Cannot create snapshot: No space left on device (os error 28)"}`))
		case "/vm":
			w.WriteHeader(500)
			w.Write([]byte("not json"))
		case "/version":
			w.Write([]byte("{broken"))
		}
	})}
	go srv.Serve(ln)
	defer srv.Close()
	c := NewClient(sock)
	ctx := context.Background()

	err = c.CreateSnapshot(ctx, SnapshotCreateParams{SnapshotPath: "s", MemFilePath: "m"})
	var apiErr *APIError
	if !errors.As(err, &apiErr) || apiErr.StatusCode != 400 || !strings.Contains(apiErr.FaultMessage, "No space left") {
		t.Fatalf("got %v", err)
	}
	if !strings.Contains(err.Error(), "PUT /snapshot/create") {
		t.Fatalf("error does not name the request: %v", err)
	}
	wrapped := errors.Join(errors.New("context"), err)
	if !errors.As(wrapped, &apiErr) {
		t.Fatal("APIError does not survive wrapping")
	}
	if err := c.Pause(ctx); !errors.As(err, &apiErr) || apiErr.FaultMessage != "not json" {
		t.Fatalf("non-JSON error body: %v", err)
	}
	if _, err := c.Version(ctx); err == nil || !strings.Contains(err.Error(), "decoding") {
		t.Fatalf("bad JSON answer: %v", err)
	}

	gone := NewClient(filepath.Join(t.TempDir(), "missing.sock"))
	if err := gone.Resume(ctx); err == nil || !strings.Contains(err.Error(), "missing.sock") {
		t.Fatalf("dial error: %v", err)
	}
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if err := c.Resume(cctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled ctx: %v", err)
	}
	exited := make(chan struct{})
	close(exited)
	if _, err := gone.WaitReady(ctx, exited); err == nil || !strings.Contains(err.Error(), "exited") {
		t.Fatalf("WaitReady on a dead process: %v", err)
	}
	tctx, cancel2 := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel2()
	if _, err := gone.WaitReady(tctx, nil); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("WaitReady timeout: %v", err)
	}
}

// TestLongSocketPath checks that sockets deeper than a sockaddr_un allows
// are reached through /proc/self/fd.
func TestLongSocketPath(t *testing.T) {
	dir := t.TempDir()
	deep := filepath.Join(dir, strings.Repeat("d", 60), strings.Repeat("e", 60))
	if err := mkdirAll(deep); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(deep, "api.sock")
	if len(sock) <= maxSunPath {
		t.Fatalf("path %d bytes is not long enough for the test", len(sock))
	}
	// Bind through a relative path, as Firecracker does from its cwd.
	ln, err := listenUnixIn(deep, "api.sock")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte(`{"firecracker_version":"1.16.1"}`))
	})}
	go srv.Serve(ln)
	defer srv.Close()
	v, err := NewClient(sock).Version(context.Background())
	if err != nil || v != "1.16.1" {
		t.Fatalf("long path: %q %v", v, err)
	}
}
