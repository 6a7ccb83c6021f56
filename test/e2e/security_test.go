//go:build e2e

package e2e

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/noid-vm/noid/client"
)

func freePort(t *testing.T) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// addUser runs `noid-server add-user` and returns the token.
func (e *Env) addUser(t *testing.T, name string) string {
	t.Helper()
	out, err := exec.Command(e.Bins.Server, "add-user", name, "--config", e.Config).CombinedOutput()
	if err != nil {
		t.Fatalf("add-user %s: %v: %s", name, err, out)
	}
	tok := strings.TrimSpace(string(out))
	if !strings.HasPrefix(tok, "noid_tok_") || len(tok) != 9+64 {
		t.Fatalf("token %q", tok)
	}
	return tok
}

func (e *Env) serverCmd(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command(e.Bins.Server, append(args, "--config", e.Config)...).CombinedOutput()
	if err != nil {
		t.Fatalf("noid-server %v: %v: %s", args, err, out)
	}
	return string(out)
}

func tokenClient(t *testing.T, url, tok string) *client.Client {
	c, err := client.New(url, tok)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestTenancy: users never see or reach each other's VMs, checkpoints or
// golden snapshots (404, not 403), and remove-user tears a user down.
func TestTenancy(t *testing.T) {
	addr := freePort(t)
	e := NewEnv(t, WithConfig(fmt.Sprintf("listen = %q", addr)))
	url := "http://" + addr
	aliceTok, bobTok := e.addUser(t, "alice"), e.addUser(t, "bob")
	alice, bob := tokenClient(t, url, aliceTok), tokenClient(t, url, bobTok)
	if w, err := alice.WhoAmI(ctx(t)); err != nil || w.User != "alice" || w.Via != "token" || w.Admin {
		t.Fatalf("whoami alice: %+v %v", w, err)
	}
	if _, err := alice.CreateVM(ctx(t), client.CreateVMRequest{Name: "a1"}); err != nil {
		t.Fatal(err)
	}
	if _, err := alice.Checkpoint(ctx(t), "a1", client.CheckpointRequest{Name: "cp"}); err != nil {
		t.Fatal(err)
	}
	if _, err := alice.PromoteGolden(ctx(t), "a1", "cp"); err != nil {
		t.Fatal(err)
	}
	notFound := func(what string, err error) {
		t.Helper()
		if !errors.Is(err, client.ErrNotFound) {
			t.Errorf("bob %s: %v, want not found", what, err)
		}
	}
	_, err := bob.GetVM(ctx(t), "a1")
	notFound("info", err)
	_, err = bob.Exec(ctx(t), "a1", client.ExecRequest{Argv: []string{"true"}}, client.ExecIO{})
	notFound("exec", err)
	_, err = bob.ListCheckpoints(ctx(t), "a1")
	notFound("checkpoints", err)
	_, err = bob.Clone(ctx(t), "a1", "cp", "stolen")
	notFound("clone", err)
	_, err = bob.DestroyVM(ctx(t), "a1")
	notFound("destroy", err)
	_, err = bob.Logs(ctx(t), "a1", 0)
	notFound("logs", err)
	if vms, _ := bob.ListVMs(ctx(t)); len(vms) != 0 {
		t.Errorf("bob lists %+v", vms)
	}
	if gs, _ := bob.ListGolden(ctx(t)); len(gs) != 0 {
		t.Errorf("bob sees golden snapshots %+v", gs)
	}
	if gs, _ := alice.ListGolden(ctx(t)); len(gs) != 1 || gs[0].Owner != "alice" {
		t.Errorf("alice's golden: %+v", gs)
	}
	// Root, the admin, does not see alice's VMs in its own namespace either.
	if vms, _ := e.Client.ListVMs(ctx(t)); len(vms) != 0 {
		t.Errorf("root lists %+v", vms)
	}
	// Names are per user: bob may have his own a1, created from alice's golden? No: from his own cold boot.
	bv, err := bob.CreateVM(ctx(t), client.CreateVMRequest{Name: "a1"})
	if err != nil {
		t.Fatal(err)
	}
	if bv.BootPath != "cold" {
		t.Errorf("bob's create used %s (%s): another user's golden must not be used", bv.BootPath, bv.BootReason)
	}
	// remove-user tears alice down: VMs, checkpoints, goldens, token.
	av, _ := alice.GetVM(ctx(t), "a1")
	out := e.serverCmd(t, "remove-user", "alice")
	if !strings.Contains(out, "1 VMs destroyed") {
		t.Errorf("remove-user: %s", out)
	}
	if processAlive(av.PID) {
		t.Errorf("alice's qemu still runs")
	}
	if _, err := alice.ListVMs(ctx(t)); !errors.Is(err, client.ErrUnauthenticated) {
		t.Errorf("alice's token after removal: %v", err)
	}
	if left, _ := filepath.Glob(filepath.Join(e.Dir, "data", "users", "*", "golden", "*")); len(left) != 0 {
		t.Errorf("alice's golden left: %v", left)
	}
	if _, err := bob.GetVM(ctx(t), "a1"); err != nil {
		t.Errorf("bob's vm after alice's removal: %v", err)
	}
	e.serverCmd(t, "remove-user", "bob")
}

// TestAuth: tokens, rotation, rate limiting, unauthenticated endpoints,
// request ids in errors, audit log and metrics.
func TestAuth(t *testing.T) {
	addr := freePort(t)
	e := NewEnv(t, WithConfig(fmt.Sprintf("listen = %q", addr)))
	url := "http://" + addr
	tok := e.addUser(t, "carol")
	for _, p := range []string{"/healthz", "/version"} {
		resp, err := http.Get(url + p)
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("%s without auth: %v %v", p, resp, err)
		}
		resp.Body.Close()
	}
	resp, err := http.Get(url + "/v1/vms")
	if err != nil {
		t.Fatal(err)
	}
	var eb struct {
		Error struct {
			Code, Message, Hint string
			RequestID           string `json:"request_id"`
		} `json:"error"`
	}
	json.NewDecoder(resp.Body).Decode(&eb)
	resp.Body.Close()
	if resp.StatusCode != 401 || eb.Error.Code != "unauthenticated" || eb.Error.Hint == "" {
		t.Errorf("no token: %d %+v", resp.StatusCode, eb)
	}
	if rid := resp.Header.Get("X-Request-Id"); rid == "" {
		t.Errorf("no request id header on an error")
	}
	// Every error carries the request id, in the header and the body.
	req, _ := http.NewRequest("GET", url+"/v1/vms/nope", nil)
	req.Header.Set("Authorization", "Bearer "+tok)
	resp, _ = http.DefaultClient.Do(req)
	raw, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	json.Unmarshal(raw, &eb)
	if resp.StatusCode != 404 || eb.Error.RequestID == "" || eb.Error.RequestID != resp.Header.Get("X-Request-Id") {
		t.Errorf("request id: %d %s header %q", resp.StatusCode, raw, resp.Header.Get("X-Request-Id"))
	}
	c := tokenClient(t, url, tok)
	if _, err := c.WhoAmI(ctx(t)); err != nil {
		t.Fatal(err)
	}
	// Rotation invalidates the old token at once.
	newTok := strings.TrimSpace(e.serverCmd(t, "rotate-token", "carol"))
	if _, err := c.WhoAmI(ctx(t)); !errors.Is(err, client.ErrUnauthenticated) {
		t.Errorf("old token after rotation: %v", err)
	}
	if _, err := tokenClient(t, url, newTok).WhoAmI(ctx(t)); err != nil {
		t.Errorf("new token: %v", err)
	}
	// A flood of bad tokens is answered 429 with Retry-After.
	limited := false
	for i := 0; i < 50 && !limited; i++ {
		req, _ := http.NewRequest("GET", url+"/v1/vms", nil)
		req.Header.Set("Authorization", fmt.Sprintf("Bearer noid_tok_%064x", i))
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode == 429 {
			limited = resp.Header.Get("Retry-After") != ""
		} else if resp.StatusCode != 401 {
			t.Fatalf("bad token answered %d", resp.StatusCode)
		}
	}
	if !limited {
		t.Error("50 bad tokens from one address were never rate limited")
	}
	// The unix socket still works for local users meanwhile.
	if _, err := e.Client.WhoAmI(ctx(t)); err != nil {
		t.Errorf("unix socket while TCP is limited: %v", err)
	}
	// Audit log: mutating actions, who and the result, never a secret.
	e.Create("audited")
	secret := "hunter2-" + fmt.Sprint(time.Now().UnixNano())
	e.CLI("", "exec", "audited", "-e", "PASSWORD="+secret, "--", "true")
	e.MustCLI("destroy", "audited")
	e.CLI("", "destroy", "missing")
	audit := e.serverCmd(t, "audit")
	for _, want := range []string{"root  POST /v1/vms", "DELETE /v1/vms/{name}  audited  ok", "missing  error: not_found", "GET /v1/vms/{name}/exec"} {
		if !strings.Contains(regexpSpaces(audit), want) {
			t.Errorf("audit log lacks %q:\n%s", want, audit)
		}
	}
	if strings.Contains(audit, secret) || strings.Contains(audit, newTok) {
		t.Error("a secret is in the audit log")
	}
	// Metrics count every user's VMs: admins only, 404 for carol as for
	// the other admin routes.
	getMetrics := func(tok string) (int, string) {
		mreq, _ := http.NewRequest("GET", url+"/metrics", nil)
		mreq.Header.Set("Authorization", "Bearer "+tok)
		resp, err := http.DefaultClient.Do(mreq)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		m, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(m)
	}
	if code, m := getMetrics(newTok); code != 404 || strings.Contains(m, "noid_vms") {
		t.Errorf("metrics for a user who is not an admin: %d\n%s", code, m)
	}
	admin, err := e.Client.CreateUser(ctx(t), "dave", true)
	if err != nil {
		t.Fatal(err)
	}
	code, m := getMetrics(admin.Token)
	if code != 200 {
		t.Errorf("metrics for an admin token: %d\n%s", code, m)
	}
	for _, want := range []string{`noid_vms{state="running"} 0`, `noid_operation_seconds_count{op="create",result="ok"} 1`, `noid_operation_seconds_count{op="destroy",result="ok"} 1`, "noid_checkpoint_bytes"} {
		if !strings.Contains(m, want) || !strings.Contains(e.Metrics(), want) {
			t.Errorf("metrics lack %q", want)
		}
	}
}

func regexpSpaces(s string) string {
	// Collapse runs of spaces to two, matching the audit table's padding loosely.
	for strings.Contains(s, "   ") {
		s = strings.ReplaceAll(s, "   ", "  ")
	}
	return s
}

// TestQuotas: going over a quota is a clear 4xx and nothing is half-created.
func TestQuotas(t *testing.T) {
	e := NewEnv(t, WithConfig("[quota]\nmax_vms = 2\nmax_memory_mib = 600\nmax_checkpoint_bytes = 1"))
	e.Create("q1")
	_, err := e.Client.CreateVM(ctx(t), client.CreateVMRequest{Name: "q2", MemoryMiB: 512})
	if !errors.Is(err, client.ErrQuotaExceeded) || !strings.Contains(err.Error(), "at most 600 MiB") {
		t.Errorf("memory quota: %v", err)
	}
	e.Create("q2")
	_, err = e.Client.CreateVM(ctx(t), client.CreateVMRequest{Name: "q3"})
	if !errors.Is(err, client.ErrQuotaExceeded) || !strings.Contains(err.Error(), "at most 2 VMs") {
		t.Errorf("vm quota: %v", err)
	}
	// A user's own limit overrides the config at once, and "default" restores it.
	who, err := e.Client.WhoAmI(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	if out := e.serverCmd(t, "set-quota", who.User, "--max-vms", "1"); !regexp.MustCompile(`max_vms\s+1\s+user`).MatchString(out) {
		t.Errorf("set-quota output:\n%s", out)
	}
	if _, err = e.Client.CreateVM(ctx(t), client.CreateVMRequest{Name: "q3", MemoryMiB: 64}); !errors.Is(err, client.ErrQuotaExceeded) || !strings.Contains(err.Error(), "at most 1 VMs") {
		t.Errorf("per-user vm quota: %v", err)
	}
	if out, err := exec.Command(e.Bins.Server, "set-quota", who.User, "--max-vms", "lots", "--config", e.Config).CombinedOutput(); err == nil || !strings.Contains(string(out), "non-negative number") {
		t.Errorf("set-quota with a bad value: %v %s", err, out)
	}
	if out := e.serverCmd(t, "set-quota", who.User, "--max-vms", "default"); !regexp.MustCompile(`max_vms\s+2\s+config`).MatchString(out) {
		t.Errorf("set-quota back to default:\n%s", out)
	}
	_, err = e.Client.Checkpoint(ctx(t), "q1", client.CheckpointRequest{Name: "big"})
	if !errors.Is(err, client.ErrQuotaExceeded) || !strings.Contains(err.Error(), "checkpoint storage") {
		t.Errorf("checkpoint quota: %v", err)
	}
	if vms, _ := e.Client.ListVMs(ctx(t)); len(vms) != 2 {
		t.Errorf("after refused creates: %d VMs", len(vms))
	}
	if left, _ := filepath.Glob(filepath.Join(e.Dir, "data", "users", "*", "checkpoints", "*")); len(left) != 0 {
		t.Errorf("refused checkpoint left files: %v", left)
	}
	if r := e.CLI("", "create", "q4"); r.Code != 1 || !strings.Contains(r.Stderr, "quota exceeded") {
		t.Errorf("cli: %d %q", r.Code, r.Stderr)
	}
}

// TestTLSAndSignals: the TCP listener serves TLS when configured, and
// SIGTERM stops the server gracefully while VMs keep running.
func TestTLSAndSignals(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	writeSelfSigned(t, certFile, keyFile)
	addr := freePort(t)
	e := NewEnv(t, WithConfig(fmt.Sprintf("listen = %q\ntls_cert = %q\ntls_key = %q", addr, certFile, keyFile)))
	tok := e.addUser(t, "dave")
	c, err := client.NewWithOptions("https://"+addr, tok, client.Options{CACertFile: certFile})
	if err != nil {
		t.Fatal(err)
	}
	if w, err := c.WhoAmI(ctx(t)); err != nil || w.User != "dave" {
		t.Fatalf("whoami over TLS: %+v %v", w, err)
	}
	if _, err := tokenClient(t, "http://"+addr, tok).WhoAmI(ctx(t)); err == nil {
		t.Error("plain HTTP to the TLS listener worked")
	}
	vm := e.Create("keep")
	e.Stop()
	if !processAlive(vm.PID) {
		t.Fatal("SIGTERM to the server stopped the VM")
	}
	e.Start()
	if got := strings.TrimSpace(e.MustExec("keep", "echo", "still")); got != "still" {
		t.Fatalf("after restart: %q", got)
	}
	_ = syscall.SIGTERM
}

func writeSelfSigned(t *testing.T, certFile, keyFile string) {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "noid-test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kb, _ := x509.MarshalECPrivateKey(key)
	os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600)
	os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}), 0o600)
}
