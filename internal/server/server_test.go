package server

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/noid-vm/noid/client"
	"github.com/noid-vm/noid/internal/config"
	"github.com/noid-vm/noid/internal/manager"
	"github.com/noid-vm/noid/internal/promtext"
	"github.com/noid-vm/noid/internal/testutil"
)

// testServer is a real Server on a manager of its own (a fresh data dir,
// networking off, no VMs), serving its unix socket and, when the config
// has listen, TCP.
type testServer struct {
	t      *testing.T
	srv    *Server
	cfg    *config.Config
	sock   string
	addr   string // the TCP listener's address, if any
	done   chan error
	cancel context.CancelFunc
	logs   *testutil.LogBuffer
}

// newTestServer starts a server with extra TOML appended to its config;
// tcp adds a listener on a free port of 127.0.0.1.
func newTestServer(t *testing.T, tcp bool, extra string) *testServer {
	t.Helper()
	testutil.RequireRoot(t) // the unix socket's admin is uid 0
	dir := t.TempDir()
	ts := &testServer{t: t, sock: filepath.Join(dir, "noid.sock"), done: make(chan error, 1), logs: &testutil.LogBuffer{}}
	top := ""
	if tcp {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ts.addr = l.Addr().String()
		l.Close()
		top = fmt.Sprintf("listen = %q\n", ts.addr)
	}
	toml := fmt.Sprintf("data_dir = %q\nsocket = %q\n%s%s\n[network]\nenabled = false\n", filepath.Join(dir, "data"), ts.sock, top, extra)
	path := filepath.Join(dir, "config.toml")
	if err := os.WriteFile(path, []byte(toml), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	ts.cfg = cfg
	log := slog.New(slog.NewTextHandler(ts.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	mgr, err := manager.New(context.Background(), manager.Options{Config: cfg, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	ts.srv = New(mgr, log)
	ctx, cancel := context.WithCancel(context.Background())
	ts.cancel = cancel
	go func() { ts.done <- ts.srv.Serve(ctx) }()
	t.Cleanup(func() {
		ts.stop()
		mgr.Close()
		if t.Failed() {
			t.Logf("server log:\n%s", ts.logs.String())
		}
	})
	// Ready once both listeners answer.
	deadline := time.Now().Add(10 * time.Second)
	for _, a := range [][2]string{{"unix", ts.sock}, {"tcp", ts.addr}} {
		for a[1] != "" {
			c, err := net.Dial(a[0], a[1])
			if err == nil {
				c.Close()
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("the server does not listen on %s: %v\n%s", a[1], err, ts.logs.String())
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	return ts
}

// stop ends Serve (as a signal does) and waits for it to return.
func (ts *testServer) stop() {
	ts.cancel()
	select {
	case err := <-ts.done:
		if err != nil {
			ts.t.Errorf("Serve: %v", err)
		}
		ts.done <- nil
	case <-time.After(time.Minute):
		ts.t.Errorf("Serve did not return")
	}
}

// client returns a client on the unix socket: root, the admin, without a
// token; or the token's user.
func (ts *testServer) client(token string) *client.Client {
	ts.t.Helper()
	c, err := client.New("unix://"+ts.sock, token)
	if err != nil {
		ts.t.Fatal(err)
	}
	return c
}

// user adds a token user and returns the token.
func (ts *testServer) user(name string, admin bool) string {
	ts.t.Helper()
	ut, err := ts.client("").CreateUser(context.Background(), name, admin)
	if err != nil {
		ts.t.Fatal(err)
	}
	return ut.Token
}

// TestMetricsForAdminsOnly: /metrics counts every user's VMs, so only
// admins read it (root on the socket, an admin token over TCP); anyone
// else gets 404 like the other admin routes. What it serves parses as
// Prometheus text, with the Go and process collectors, the manager's
// metrics and the server's own, which follow the requests in flight.
func TestMetricsForAdminsOnly(t *testing.T) {
	ts := newTestServer(t, true, "")
	ctx := context.Background()
	alice := ts.user("alice", false)
	ann := ts.user("ann", true)

	if _, err := ts.client(alice).Metrics(ctx); !errors.Is(err, client.ErrNotFound) {
		t.Errorf("metrics for alice on the socket: %v, want not found", err)
	}
	get := func(tok string) (int, string) {
		req, _ := http.NewRequest("GET", "http://"+ts.addr+"/metrics", nil)
		req.Header.Set("Authorization", "Bearer "+tok)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, body := get(alice); code != 404 || strings.Contains(body, "noid_vms") || !strings.Contains(body, `"not_found"`) {
		t.Errorf("metrics for alice over TCP: %d %s", code, body)
	}
	code, body := get(ann)
	if code != 200 {
		t.Fatalf("metrics for an admin token: %d %s", code, body)
	}
	text, err := ts.client("").Metrics(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, exp := range []string{body, text} {
		f, err := promtext.Parse(exp)
		if err != nil {
			t.Fatal(err)
		}
		for name, typ := range map[string]string{
			"go_goroutines": "gauge", "process_open_fds": "gauge", "noid_vms": "gauge", "noid_disk_free_bytes": "gauge",
			"noid_vm_unexpected_exits_total": "counter", "noid_http_requests_in_flight": "gauge", "noid_http_connections_refused_total": "counter",
		} {
			if got := f.Type(name); got != typ {
				t.Errorf("%s is a %q, want %s", name, got, typ)
			}
		}
		// The scrape itself is the one request in flight.
		if v := f.Sum("noid_http_requests_in_flight", nil); v != 1 {
			t.Errorf("requests in flight during a scrape: %v", v)
		}
		if f.Sum("noid_disk_free_bytes", map[string]string{"dir": "data"}) <= 0 {
			t.Errorf("no free space reported for the data dir")
		}
	}
}
