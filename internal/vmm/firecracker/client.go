package firecracker

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
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Client talks to one Firecracker process over its API unix socket. It is a
// small hand-written client: each method sends one request with a typed
// body and returns Firecracker's fault_message wrapped in an *APIError when
// the request is refused. Every call takes a context that bounds it. A
// Client is safe for concurrent use (Firecracker itself serialises requests).
type Client struct {
	socketPath string
	http       *http.Client
}

// NewClient returns a client for the API socket at socketPath. Paths longer
// than a unix socket address allows (108 bytes) work too.
func NewClient(socketPath string) *Client {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return dialUnix(ctx, socketPath)
		},
		MaxIdleConns:        1,
		MaxIdleConnsPerHost: 1,
		IdleConnTimeout:     30 * time.Second,
		DisableCompression:  true,
	}
	return &Client{socketPath: socketPath, http: &http.Client{Transport: tr}}
}

// SocketPath returns the API socket the client talks to.
func (c *Client) SocketPath() string { return c.socketPath }

// CloseIdleConnections closes the client's idle keep-alive connection.
func (c *Client) CloseIdleConnections() { c.http.CloseIdleConnections() }

// APIError is a request Firecracker answered with an error status.
type APIError struct {
	// Method and Path identify the request.
	Method, Path string
	// StatusCode is the HTTP status (400 for bad input, 500 otherwise).
	StatusCode int
	// FaultMessage is Firecracker's explanation.
	FaultMessage string
}

// Error implements error.
func (e *APIError) Error() string {
	msg := e.FaultMessage
	if msg == "" {
		msg = "(no fault_message)"
	}
	return fmt.Sprintf("firecracker answered %s %s with %d %s: %s",
		e.Method, e.Path, e.StatusCode, http.StatusText(e.StatusCode), msg)
}

// PutMachineConfig sets vCPUs, memory and dirty page tracking (pre-boot).
func (c *Client) PutMachineConfig(ctx context.Context, mc MachineConfig) error {
	return c.do(ctx, http.MethodPut, "/machine-config", mc, nil)
}

// GetMachineConfig returns the machine configuration.
func (c *Client) GetMachineConfig(ctx context.Context) (MachineConfig, error) {
	var mc MachineConfig
	err := c.do(ctx, http.MethodGet, "/machine-config", nil, &mc)
	return mc, err
}

// PutBootSource sets the kernel, initramfs and command line (pre-boot).
func (c *Client) PutBootSource(ctx context.Context, bs BootSource) error {
	return c.do(ctx, http.MethodPut, "/boot-source", bs, nil)
}

// PutDrive adds or replaces a block device (pre-boot).
func (c *Client) PutDrive(ctx context.Context, d Drive) error {
	if d.DriveID == "" {
		return fmt.Errorf("firecracker PUT /drives: empty drive_id")
	}
	return c.do(ctx, http.MethodPut, "/drives/"+url.PathEscape(d.DriveID), d, nil)
}

// PutNetworkInterface adds a network interface backed by a TAP (pre-boot).
func (c *Client) PutNetworkInterface(ctx context.Context, ni NetworkInterface) error {
	if ni.IfaceID == "" {
		return fmt.Errorf("firecracker PUT /network-interfaces: empty iface_id")
	}
	return c.do(ctx, http.MethodPut, "/network-interfaces/"+url.PathEscape(ni.IfaceID), ni, nil)
}

// PutVsock adds the vsock device (pre-boot).
func (c *Client) PutVsock(ctx context.Context, v Vsock) error {
	return c.do(ctx, http.MethodPut, "/vsock", v, nil)
}

// PutEntropy adds the virtio-rng device (pre-boot).
func (c *Client) PutEntropy(ctx context.Context, e EntropyDevice) error {
	return c.do(ctx, http.MethodPut, "/entropy", e, nil)
}

// PutLogger configures Firecracker's own log (allowed before a snapshot
// load too).
func (c *Client) PutLogger(ctx context.Context, l Logger) error {
	return c.do(ctx, http.MethodPut, "/logger", l, nil)
}

// Action sends a synchronous action (PUT /actions).
func (c *Client) Action(ctx context.Context, actionType string) error {
	return c.do(ctx, http.MethodPut, "/actions", InstanceActionInfo{ActionType: actionType}, nil)
}

// InstanceStart boots the configured microVM.
func (c *Client) InstanceStart(ctx context.Context) error {
	return c.Action(ctx, ActionInstanceStart)
}

// Pause stops the vCPUs (PATCH /vm Paused).
func (c *Client) Pause(ctx context.Context) error {
	return c.do(ctx, http.MethodPatch, "/vm", VM{State: VMStatePaused}, nil)
}

// Resume restarts the vCPUs (PATCH /vm Resumed).
func (c *Client) Resume(ctx context.Context) error {
	return c.do(ctx, http.MethodPatch, "/vm", VM{State: VMStateResumed}, nil)
}

// CreateSnapshot writes a Full or Diff snapshot of a paused microVM.
func (c *Client) CreateSnapshot(ctx context.Context, p SnapshotCreateParams) error {
	return c.do(ctx, http.MethodPut, "/snapshot/create", p, nil)
}

// LoadSnapshot loads a snapshot into a fresh Firecracker process. Exactly
// one memory source must be given; noid always uses MemBackend. If the load
// fails, Firecracker exits.
func (c *Client) LoadSnapshot(ctx context.Context, p SnapshotLoadParams) error {
	if p.MemBackend == nil {
		return fmt.Errorf("firecracker PUT /snapshot/load: no mem_backend")
	}
	return c.do(ctx, http.MethodPut, "/snapshot/load", p, nil)
}

// Version returns the running Firecracker's version (GET /version), such
// as "1.16.1".
func (c *Client) Version(ctx context.Context) (string, error) {
	var v FirecrackerVersion
	if err := c.do(ctx, http.MethodGet, "/version", nil, &v); err != nil {
		return "", err
	}
	return v.FirecrackerVersion, nil
}

// DescribeInstance returns the instance's id, state and version (GET /).
func (c *Client) DescribeInstance(ctx context.Context) (InstanceInfo, error) {
	var info InstanceInfo
	err := c.do(ctx, http.MethodGet, "/", nil, &info)
	return info, err
}

// WaitReady polls GET / until Firecracker answers, ctx ends, or exited is
// closed (the process died first), and returns the instance information.
func (c *Client) WaitReady(ctx context.Context, exited <-chan struct{}) (InstanceInfo, error) {
	delay := time.Millisecond
	for {
		actx, cancel := context.WithTimeout(ctx, time.Second)
		info, err := c.DescribeInstance(actx)
		cancel()
		if err == nil {
			return info, nil
		}
		var apiErr *APIError
		if errors.As(err, &apiErr) {
			return info, err // it answered, even if oddly
		}
		select {
		case <-ctx.Done():
			return info, fmt.Errorf("waiting for the firecracker API on %s: %w (last error: %v)", c.socketPath, ctx.Err(), err)
		case <-exited:
			return info, fmt.Errorf("waiting for the firecracker API on %s: the process exited", c.socketPath)
		case <-time.After(delay):
		}
		delay = min(delay*2, 20*time.Millisecond)
	}
}

// do sends one request. body is marshalled to JSON unless nil; a 2xx answer
// with content is unmarshalled into out unless nil.
func (c *Client) do(ctx context.Context, method, path string, body, out any) error {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return fmt.Errorf("firecracker %s %s: encoding request: %w", method, path, err)
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://localhost"+path, rd)
	if err != nil {
		return fmt.Errorf("firecracker %s %s: %w", method, path, err)
	}
	req.Header.Set("Accept", "application/json")
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("firecracker %s %s via %s: %w", method, path, c.socketPath, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return fmt.Errorf("firecracker %s %s: reading answer: %w", method, path, err)
	}
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		var fault apiError
		if json.Unmarshal(data, &fault) != nil || fault.FaultMessage == "" {
			fault.FaultMessage = strings.TrimSpace(string(data))
		}
		return &APIError{Method: method, Path: path, StatusCode: resp.StatusCode, FaultMessage: fault.FaultMessage}
	}
	if out != nil {
		if len(bytes.TrimSpace(data)) == 0 {
			return fmt.Errorf("firecracker %s %s: empty answer", method, path)
		}
		if err := json.Unmarshal(data, out); err != nil {
			return fmt.Errorf("firecracker %s %s: decoding answer: %w", method, path, err)
		}
	}
	return nil
}

// maxSunPath is the longest path a sockaddr_un holds (with its NUL).
const maxSunPath = 107

// dialUnix connects to a unix stream socket. When the path is too long for
// a socket address (a VM directory deep in a jail), it connects through
// /proc/self/fd/N/<name> with N an O_PATH handle on the directory.
func dialUnix(ctx context.Context, path string) (net.Conn, error) {
	var d net.Dialer
	if len(path) <= maxSunPath {
		return d.DialContext(ctx, "unix", path)
	}
	dir, name := filepath.Split(path)
	fd, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("dial unix %s: opening its directory: %w", path, &os.PathError{Op: "open", Path: dir, Err: err})
	}
	defer unix.Close(fd)
	short := fmt.Sprintf("/proc/self/fd/%d/%s", fd, name)
	if len(short) > maxSunPath {
		return nil, fmt.Errorf("dial unix %s: socket name %q is too long", path, name)
	}
	conn, err := d.DialContext(ctx, "unix", short)
	if err != nil {
		return nil, fmt.Errorf("dial unix %s: %w", path, err)
	}
	return conn, nil
}
