// Package client is the Go client for noid-server's API. The noid CLI is
// built on it.
//
// A Client reaches the server over the local unix socket (no set-up; the
// server identifies the caller by uid) or over HTTP(S) with a token:
//
//	c, err := client.New("unix:///root/.noid/noid.sock", "")
//	vm, err := c.CreateVM(ctx, client.CreateVMRequest{Name: "dev"})
//	code, err := c.Exec(ctx, "dev", client.ExecRequest{Argv: []string{"uname", "-r"}}, client.ExecIO{Stdout: os.Stdout})
//
// Files move in both directions as tar streams through the VM's agent
// (PutFiles, GetFiles), or with cp-like semantics (CopyToVM, CopyFromVM).
//
// Every method takes a context first. Errors from the server unwrap to the
// errdefs-style sentinels exposed here (ErrNotFound, ErrAlreadyExists, …), so
// errors.Is works across the wire.
package client

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/noid-vm/noid/internal/api"
	"github.com/noid-vm/noid/internal/errdefs"
)

// Wire types, re-exported so users of this package never import internal ones.
type (
	// VM describes a VM.
	VM = api.VM
	// CreateVMRequest is the input of CreateVM.
	CreateVMRequest = api.CreateVMRequest
	// DestroyResult reports what DestroyVM removed.
	DestroyResult = api.DestroyResult
	// Checkpoint describes a checkpoint.
	Checkpoint = api.Checkpoint
	// CheckpointRequest is the input of Checkpoint.
	CheckpointRequest = api.CheckpointRequest
	// ExecRequest describes a process to run.
	ExecRequest = api.ExecRequest
	// VersionInfo is the server's version.
	VersionInfo = api.VersionInfo
	// WhoAmI tells who the server thinks the caller is.
	WhoAmI = api.WhoAmI
	// Capabilities are the server's defaults, limits and features and the
	// caller's quota (GET /v1/capabilities).
	Capabilities = api.Capabilities
	// CapabilityDefaults, CapabilityLimits, CapabilityQuota and QuotaUsage
	// are the parts of Capabilities.
	CapabilityDefaults = api.CapabilityDefaults
	CapabilityLimits   = api.CapabilityLimits
	CapabilityQuota    = api.CapabilityQuota
	QuotaUsage         = api.QuotaUsage
	// Golden describes a golden snapshot.
	Golden = api.Golden
	// Timings reports where an operation spent its time.
	Timings = api.Timings
	// Error is an error returned by the server.
	Error = errdefs.Error
)

// The names in Capabilities.Features.
const (
	FeatureCheckpoint = api.FeatureCheckpoint
	FeatureGolden     = api.FeatureGolden
	FeatureFiles      = api.FeatureFiles
	FeatureExecUser   = api.FeatureExecUser
	FeatureConsoleEnv = api.FeatureConsoleEnv
	FeatureNetwork    = api.FeatureNetwork
	FeatureUsers      = api.FeatureUsers
	FeatureMetrics    = api.FeatureMetrics
	FeatureRemote     = api.FeatureRemote
)

// Sentinel errors that server errors unwrap to.
var (
	ErrInvalidArgument   = errdefs.ErrInvalidArgument
	ErrUnauthenticated   = errdefs.ErrUnauthenticated
	ErrNotFound          = errdefs.ErrNotFound
	ErrAlreadyExists     = errdefs.ErrAlreadyExists
	ErrConflict          = errdefs.ErrConflict
	ErrNotRunning        = errdefs.ErrNotRunning
	ErrRateLimited       = errdefs.ErrRateLimited
	ErrQuotaExceeded     = errdefs.ErrQuotaExceeded
	ErrUnavailable       = errdefs.ErrUnavailable
	ErrResourceExhausted = errdefs.ErrResourceExhausted
)

// Client talks to one noid-server. It is safe for concurrent use.
type Client struct {
	base   string // http://noid or https://host:port
	token  string
	hc     *http.Client
	dialer func(ctx context.Context) (net.Conn, error) // unix socket, or nil
	target string
}

// CloseIdleConnections closes the client's kept-alive connections that
// carry no request now, for a caller done with the server for a while (the
// server closes them itself after [http] idle_timeout).
func (c *Client) CloseIdleConnections() { c.hc.CloseIdleConnections() }

// New returns a client for url: "unix:///path/to/noid.sock",
// "http://host:port" or "https://host:port". token may be empty on the unix
// socket.
func New(rawURL, token string) (*Client, error) {
	u, err := url.Parse(rawURL)
	if err != nil {
		return nil, fmt.Errorf("%w: bad server url %q: %v", ErrInvalidArgument, rawURL, err)
	}
	c := &Client{token: token, target: rawURL}
	switch u.Scheme {
	case "unix":
		path := u.Path
		if path == "" {
			path = u.Opaque
		}
		if path == "" {
			return nil, fmt.Errorf("%w: unix url %q has no socket path", ErrInvalidArgument, rawURL)
		}
		c.dialer = func(ctx context.Context) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		}
		c.base = "http://noid"
		c.hc = &http.Client{Transport: &http.Transport{
			DialContext:         func(ctx context.Context, _, _ string) (net.Conn, error) { return c.dialer(ctx) },
			MaxIdleConnsPerHost: 16,
			IdleConnTimeout:     30 * time.Second,
		}}
	case "http", "https":
		if u.Host == "" {
			return nil, fmt.Errorf("%w: url %q has no host", ErrInvalidArgument, rawURL)
		}
		c.base = u.Scheme + "://" + u.Host
		c.hc = &http.Client{Transport: &http.Transport{Proxy: http.ProxyFromEnvironment, MaxIdleConnsPerHost: 16, IdleConnTimeout: 30 * time.Second}}
	default:
		return nil, fmt.Errorf("%w: server url %q must start with unix://, http:// or https://", ErrInvalidArgument, rawURL)
	}
	return c, nil
}

// Target returns the URL the client was created with.
func (c *Client) Target() string { return c.target }

// do sends a JSON request and decodes a JSON response into out.
func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	resp, err := c.raw(ctx, method, path, body, "application/json")
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if out == nil {
		io.Copy(io.Discard, resp.Body)
		return nil
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return fmt.Errorf("decoding response of %s %s: %w", method, path, err)
	}
	return nil
}

// raw sends a request and returns the response if its status is 2xx;
// otherwise the error body becomes an *Error.
func (c *Client) raw(ctx context.Context, method, path string, body io.Reader, ctype string) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, body)
	if err != nil {
		return nil, err
	}
	if body != nil && ctype != "" {
		req.Header.Set("Content-Type", ctype)
	}
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return nil, fmt.Errorf("%w: cannot reach noid-server at %s: %v", ErrUnavailable, c.target, err)
	}
	if resp.StatusCode/100 != 2 {
		defer resp.Body.Close()
		return nil, decodeError(resp)
	}
	return resp, nil
}

func decodeError(resp *http.Response) error {
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	var eb api.ErrorBody
	if json.Unmarshal(b, &eb) == nil && eb.Error.Code != "" {
		return &errdefs.Error{Code: errdefs.Code(eb.Error.Code), Message: eb.Error.Message, Hint: eb.Error.Hint, RequestID: eb.Error.RequestID}
	}
	code := errdefs.CodeInternal
	switch resp.StatusCode {
	case 400:
		code = errdefs.CodeInvalidArgument
	case 401:
		code = errdefs.CodeUnauthenticated
	case 404:
		code = errdefs.CodeNotFound
	case 409:
		code = errdefs.CodeConflict
	case 429:
		code = errdefs.CodeRateLimited
	case 503:
		code = errdefs.CodeUnavailable
	}
	return &errdefs.Error{Code: code, Message: fmt.Sprintf("server answered %s: %s", resp.Status, strings.TrimSpace(string(b)))}
}

// Health checks that the server answers.
func (c *Client) Health(ctx context.Context) error {
	return c.do(ctx, "GET", "/healthz", nil, nil)
}

// Version returns the server's version.
func (c *Client) Version(ctx context.Context) (*VersionInfo, error) {
	var v VersionInfo
	return &v, c.do(ctx, "GET", "/version", nil, &v)
}

// WhoAmI returns the caller's identity as the server sees it.
func (c *Client) WhoAmI(ctx context.Context) (*WhoAmI, error) {
	var w WhoAmI
	return &w, c.do(ctx, "GET", "/v1/whoami", nil, &w)
}

// Capabilities returns the server's defaults for a new VM, the limits of
// one request, the caller's quota and usage, and the server's features
// (see the Feature* constants).
func (c *Client) Capabilities(ctx context.Context) (*Capabilities, error) {
	var v Capabilities
	return &v, c.do(ctx, "GET", "/v1/capabilities", nil, &v)
}

// CreateVM creates a VM and, unless req.NoWait, returns once its agent answers.
func (c *Client) CreateVM(ctx context.Context, req CreateVMRequest) (*VM, error) {
	var v VM
	return &v, c.do(ctx, "POST", "/v1/vms", req, &v)
}

// ListVMs lists the caller's VMs.
func (c *Client) ListVMs(ctx context.Context) ([]*VM, error) {
	var vs []*VM
	return vs, c.do(ctx, "GET", "/v1/vms", nil, &vs)
}

// ListAllVMs lists every user's VMs, each with its Owner (admins only;
// others get ErrNotFound).
func (c *Client) ListAllVMs(ctx context.Context) ([]*VM, error) {
	var vs []*VM
	return vs, c.do(ctx, "GET", "/v1/vms?all=true", nil, &vs)
}

// vmPath is the API path of a VM: vm is a VM's name, or "user/vm" for
// another user's VM, which only admins may address (for others it does not
// exist). suffix follows the name ("/logs"); q, if not nil, is the query,
// to which "user" is added.
func vmPath(vm, suffix string, q url.Values) string {
	if user, name, ok := strings.Cut(vm, "/"); ok {
		if q == nil {
			q = url.Values{}
		}
		q.Set("user", user)
		vm = name
	}
	p := "/v1/vms/" + url.PathEscape(vm) + suffix
	if len(q) > 0 {
		p += "?" + q.Encode()
	}
	return p
}

// GetVM returns one VM. Every method that takes a VM name also takes
// "user/vm", with which an admin addresses another user's VM.
func (c *Client) GetVM(ctx context.Context, name string) (*VM, error) {
	var v VM
	return &v, c.do(ctx, "GET", vmPath(name, "", nil), nil, &v)
}

// DestroyVM stops and removes a VM and its checkpoints.
func (c *Client) DestroyVM(ctx context.Context, name string) (*DestroyResult, error) {
	var r DestroyResult
	return &r, c.do(ctx, "DELETE", vmPath(name, "", nil), nil, &r)
}

// Logs returns up to tail bytes of the VM's serial console log (0: the server's default).
func (c *Client) Logs(ctx context.Context, name string, tail int64) ([]byte, error) {
	q := url.Values{}
	if tail > 0 {
		q.Set("tail", strconv.FormatInt(tail, 10))
	}
	resp, err := c.raw(ctx, "GET", vmPath(name, "/logs", q), nil, "")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	return io.ReadAll(resp.Body)
}

// Metrics returns the server's Prometheus metrics text (admins only;
// others get ErrNotFound).
func (c *Client) Metrics(ctx context.Context) (string, error) {
	resp, err := c.raw(ctx, "GET", "/metrics", nil, "")
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err
}

// Checkpoint captures a running VM.
func (c *Client) Checkpoint(ctx context.Context, vm string, req CheckpointRequest) (*Checkpoint, error) {
	var cp Checkpoint
	return &cp, c.do(ctx, "POST", vmPath(vm, "/checkpoints", nil), req, &cp)
}

// ListCheckpoints lists a VM's checkpoints, oldest first.
func (c *Client) ListCheckpoints(ctx context.Context, vm string) ([]*Checkpoint, error) {
	var cps []*Checkpoint
	return cps, c.do(ctx, "GET", vmPath(vm, "/checkpoints", nil), nil, &cps)
}

// DeleteCheckpoint removes a checkpoint (by name or id).
func (c *Client) DeleteCheckpoint(ctx context.Context, vm, checkpoint string) error {
	return c.do(ctx, "DELETE", vmPath(vm, "/checkpoints/"+url.PathEscape(checkpoint), nil), nil, nil)
}

// Restore rewinds vm in place to checkpoint.
func (c *Client) Restore(ctx context.Context, vm, checkpoint string) (*VM, error) {
	var v VM
	return &v, c.do(ctx, "POST", vmPath(vm, "/restore", nil), api.RestoreRequest{Checkpoint: checkpoint}, &v)
}

// Clone starts a new, independent VM named as from vm's checkpoint.
func (c *Client) Clone(ctx context.Context, vm, checkpoint, as string) (*VM, error) {
	if as == "" {
		return nil, fmt.Errorf("%w: clone needs a new VM name", ErrInvalidArgument)
	}
	var v VM
	return &v, c.do(ctx, "POST", vmPath(vm, "/restore", nil), api.RestoreRequest{Checkpoint: checkpoint, As: as}, &v)
}

// IsNotFound reports whether err means the object does not exist.
func IsNotFound(err error) bool { return errors.Is(err, ErrNotFound) }

// RemoveUser removes a user with all their VMs and checkpoints (admin only).
// It returns the number of VMs destroyed.
func (c *Client) RemoveUser(ctx context.Context, name string) (int, error) {
	var r struct {
		VMs int `json:"vms_destroyed"`
	}
	err := c.do(ctx, "DELETE", "/v1/users/"+url.PathEscape(name), nil, &r)
	return r.VMs, err
}

// ListGolden lists the caller's golden snapshots and the system ones.
func (c *Client) ListGolden(ctx context.Context) ([]*Golden, error) {
	var gs []*Golden
	return gs, c.do(ctx, "GET", "/v1/golden", nil, &gs)
}

// PromoteGolden turns a checkpoint into the golden snapshot for its spec.
// vm may be empty when checkpoint is a checkpoint id; an admin may name
// another user's VM as "user/vm" (the golden is then a system one).
func (c *Client) PromoteGolden(ctx context.Context, vm, checkpoint string) (*Golden, error) {
	var g Golden
	return &g, c.do(ctx, "POST", "/v1/golden", api.GoldenPromoteRequest{VM: vm, Checkpoint: checkpoint}, &g)
}

// RemoveGolden deletes the caller's golden snapshot for a spec (zero values:
// the server's default spec).
func (c *Client) RemoveGolden(ctx context.Context, vcpus, memoryMiB int) error {
	q := url.Values{}
	if vcpus > 0 {
		q.Set("vcpus", strconv.Itoa(vcpus))
	}
	if memoryMiB > 0 {
		q.Set("memory_mib", strconv.Itoa(memoryMiB))
	}
	p := "/v1/golden"
	if len(q) > 0 {
		p += "?" + q.Encode()
	}
	return c.do(ctx, "DELETE", p, nil, nil)
}
