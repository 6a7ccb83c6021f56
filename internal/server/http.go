package server

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os/user"
	"runtime"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/noid-vm/noid/internal/api"
	"github.com/noid-vm/noid/internal/errdefs"
	"github.com/noid-vm/noid/internal/store"
	"github.com/noid-vm/noid/internal/unixgroup"
)

type ctxKey int

const (
	keyConn ctxKey = iota
	keyIdentity
	keyRequestID
)

// identity is the authenticated caller of a request.
type identity struct {
	user *store.User
	via  string // "unix" or "token"
}

func connContext(ctx context.Context, c net.Conn) context.Context {
	return context.WithValue(ctx, keyConn, c)
}

// peerUID returns the uid of the process on the other end of a unix socket.
func peerUID(c net.Conn) (int64, bool) {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return 0, false
	}
	rc, err := uc.SyscallConn()
	if err != nil {
		return 0, false
	}
	var cred *unix.Ucred
	var cerr error
	rc.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	})
	if cerr != nil || cred == nil {
		return 0, false
	}
	return int64(cred.Uid), true
}

func userOf(ctx context.Context) *store.User {
	id, _ := ctx.Value(keyIdentity).(*identity)
	if id == nil {
		return nil
	}
	return id.user
}

func requestID(ctx context.Context) string {
	s, _ := ctx.Value(keyRequestID).(string)
	return s
}

// route is one registered API route; the list feeds both the mux and the
// OpenAPI parity test.
type route struct {
	method, pattern string
	auth            bool
	mutating        bool
	h               func(w http.ResponseWriter, r *http.Request) error
}

func (s *Server) routes() []route {
	return []route{
		{"GET", "/healthz", false, false, s.hHealth},
		{"GET", "/version", false, false, s.hVersion},
		{"GET", "/v1/openapi.json", false, false, s.hOpenAPI},
		{"GET", "/metrics", true, false, s.hMetrics},
		{"GET", "/v1/whoami", true, false, s.hWhoAmI},
		{"GET", "/v1/capabilities", true, false, s.hCapabilities},
		{"GET", "/v1/vms", true, false, s.hListVMs},
		{"POST", "/v1/vms", true, true, s.hCreateVM},
		{"GET", "/v1/vms/{name}", true, false, s.hGetVM},
		{"DELETE", "/v1/vms/{name}", true, true, s.hDestroyVM},
		{"GET", "/v1/vms/{name}/logs", true, false, s.hLogs},
		{"GET", "/v1/vms/{name}/exec", true, true, s.hExec},
		{"GET", "/v1/vms/{name}/console", true, true, s.hConsole},
		{"GET", "/v1/vms/{name}/checkpoints", true, false, s.hListCheckpoints},
		{"POST", "/v1/vms/{name}/checkpoints", true, true, s.hCheckpoint},
		{"DELETE", "/v1/vms/{name}/checkpoints/{checkpoint}", true, true, s.hDeleteCheckpoint},
		{"POST", "/v1/vms/{name}/restore", true, true, s.hRestore},
		{"PUT", "/v1/vms/{name}/files", true, true, s.hPutFiles},
		{"GET", "/v1/vms/{name}/files", true, false, s.hGetFiles},
		{"GET", "/v1/golden", true, false, s.hListGolden},
		{"POST", "/v1/golden", true, true, s.hPromoteGolden},
		{"DELETE", "/v1/golden", true, true, s.hRemoveGolden},
		{"POST", "/v1/vms/{name}/checkpoints/{checkpoint}/push", true, true, s.hPushCheckpoint},
		{"POST", "/v1/remote/clone", true, true, s.hCloneRemote},
		{"GET", "/v1/remote", true, false, s.hListRemote},
		{"POST", "/v1/golden/push", true, true, s.hPushGolden},
		{"POST", "/v1/golden/pull", true, true, s.hPullGolden},
		{"DELETE", "/v1/users/{user}", true, true, s.hRemoveUser},
		{"GET", "/v1/users", true, false, s.hListUsers},
		{"POST", "/v1/users", true, true, s.hCreateUser},
		{"POST", "/v1/users/local", true, true, s.hAddLocalUser},
		{"POST", "/v1/users/{user}/token", true, true, s.hRotateToken},
		{"PUT", "/v1/users/{user}/quota", true, true, s.hSetQuota},
	}
}

// Routes returns "METHOD /pattern" for every registered route (OpenAPI parity).
func (s *Server) Routes() []string {
	var out []string
	for _, r := range s.routes() {
		out = append(out, r.method+" "+r.pattern)
	}
	return out
}

// Handler returns the API handler; local marks the unix socket.
func (s *Server) Handler(local bool) http.Handler {
	mux := http.NewServeMux()
	for _, rt := range s.routes() {
		rt := rt
		mux.HandleFunc(rt.method+" "+rt.pattern, func(w http.ResponseWriter, r *http.Request) {
			s.serveRoute(w, r, rt, local)
		})
	}
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		s.writeError(w, r, errdefs.WithHint(fmt.Errorf("%w: no route %s %s", errdefs.ErrNotFound, r.Method, r.URL.Path), "see /v1/openapi.json"))
	})
	return mux
}

func (s *Server) serveRoute(rw http.ResponseWriter, r *http.Request, rt route, local bool) {
	s.reqs.add()
	defer s.reqs.done()
	w := newDeadlineWriter(rw, s.cfg.HTTP.Write())
	rid := r.Header.Get("X-Request-Id")
	if rid == "" || len(rid) > 64 {
		rid = newRequestID()
	}
	w.Header().Set("X-Request-Id", rid)
	ctx := context.WithValue(r.Context(), keyRequestID, rid)
	r = r.WithContext(ctx)
	start := time.Now()
	if rt.auth {
		id, err := s.authenticate(r, local)
		if err != nil {
			s.writeError(w, r, err)
			return
		}
		r = r.WithContext(context.WithValue(r.Context(), keyIdentity, id))
	}
	s.metrics.inFlight.Inc()
	err := rt.h(w, r)
	s.metrics.inFlight.Dec()
	u := userOf(r.Context())
	uname := ""
	if u != nil {
		uname = u.Name
	}
	if err != nil {
		s.writeError(w, r, err)
	}
	if rt.mutating && u != nil {
		result := "ok"
		if err != nil {
			code, _ := errdefs.Classify(err)
			result = "error: " + string(code)
		}
		target := vmRef(r)
		if target == "" {
			target = r.URL.Path
		}
		actx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		s.store.Audit(actx, store.AuditEntry{User: uname, Action: rt.method + " " + rt.pattern, Target: target, Result: result, RequestID: rid})
		cancel()
	}
	lvl := slog.LevelDebug
	if rt.mutating || err != nil {
		lvl = slog.LevelInfo
	}
	s.log.Log(r.Context(), lvl, "request", "method", r.Method, "path", r.URL.Path, "user", uname, "vm", vmRef(r),
		"request_id", rid, "ms", ms(time.Since(start)), "err", errString(err))
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

func (s *Server) authenticate(r *http.Request, local bool) (*identity, error) {
	ctx := r.Context()
	client := clientAddr(r, s.cfg.TrustProxy && !local)
	if tok, ok := bearer(r); ok {
		if err := s.limiter.allow(client, tok); err != nil {
			return nil, err
		}
		u, err := s.store.UserByToken(ctx, tok)
		if err != nil {
			s.limiter.fail(client, tok)
			return nil, errdefs.WithHint(err, "check NOID_TOKEN or run `noid auth setup --url URL --token TOKEN`")
		}
		return &identity{user: u, via: "token"}, nil
	}
	if local {
		c, _ := ctx.Value(keyConn).(net.Conn)
		uid, ok := peerUID(c)
		if !ok {
			return nil, fmt.Errorf("%w: cannot read peer credentials on the unix socket", errdefs.ErrUnauthenticated)
		}
		if s.mgr.IsSandboxUID(uid) {
			return nil, fmt.Errorf("%w: uid %d belongs to the VMM sandbox and may not use the API", errdefs.ErrUnauthenticated, uid)
		}
		name := "uid" + strconv.FormatInt(uid, 10)
		if uid == 0 {
			name = "root"
		} else if uu, err := user.LookupId(strconv.FormatInt(uid, 10)); err == nil {
			name = uu.Username
		}
		// The socket's mode lets only root and socket_group in; the
		// account database decides too, so that removing an account from
		// the group (remove-user) takes effect before its next login.
		if uid != 0 && !unixgroup.IsMember(name, s.cfg.SocketGroup) {
			return nil, errdefs.WithHint(fmt.Errorf("%w: local user %s (uid %d) is not in group %s, which may use this socket", errdefs.ErrUnauthenticated, name, uid, s.cfg.SocketGroup),
				"ask the admin to run `noid-server add-user --local "+name+"`, then log in again")
		}
		u, err := s.store.EnsureUnixUser(ctx, uid, name)
		if err != nil {
			return nil, err
		}
		return &identity{user: u, via: "unix"}, nil
	}
	if err := s.limiter.allow(client, ""); err != nil {
		return nil, err
	}
	return nil, errdefs.WithHint(fmt.Errorf("%w: missing bearer token", errdefs.ErrUnauthenticated),
		"set NOID_TOKEN or run `noid auth setup --url URL --token TOKEN`")
}

// shutdownErr is err, or, when ctx was cancelled because the server is
// shutting down, an ErrUnavailable that says so.
func shutdownErr(ctx context.Context, err error) error {
	if !errors.Is(context.Cause(ctx), errShuttingDown) {
		return err
	}
	return errdefs.WithHint(fmt.Errorf("%w: %v, which cancelled the request (%v); VMs keep running", errdefs.ErrUnavailable, errShuttingDown, err),
		"run it again once noid-server is back (`systemctl status noid-server`)")
}

func bearer(r *http.Request) (string, bool) {
	h := r.Header.Get("Authorization")
	if t, ok := strings.CutPrefix(h, "Bearer "); ok && t != "" {
		return strings.TrimSpace(t), true
	}
	return "", false
}

// clientAddr is the caller's address; X-Forwarded-For only when trusted.
func clientAddr(r *http.Request, trustProxy bool) string {
	if trustProxy {
		// The trusted proxy appends the address it saw; earlier entries
		// come from the client and prove nothing.
		if xff := r.Header.Values("X-Forwarded-For"); len(xff) > 0 {
			parts := strings.Split(xff[len(xff)-1], ",")
			if last := strings.TrimSpace(parts[len(parts)-1]); last != "" {
				return last
			}
		}
	}
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		return r.RemoteAddr
	}
	return host
}

// writeError sends the JSON error envelope with the status mapped by errdefs.
func (s *Server) writeError(w http.ResponseWriter, r *http.Request, err error) {
	err = shutdownErr(r.Context(), err)
	code, status := errdefs.Classify(err)
	msg := err.Error()
	if status == http.StatusInternalServerError {
		s.log.Error("internal error", "path", r.URL.Path, "request_id", requestID(r.Context()), "err", err)
	}
	body := api.ErrorBody{Error: api.ErrorDetail{Code: string(code), Message: msg, Hint: errdefs.HintOf(err), RequestID: requestID(r.Context())}}
	if status == http.StatusTooManyRequests {
		w.Header().Set("Retry-After", "1")
	}
	writeJSON(w, status, body)
}

func writeJSON(w http.ResponseWriter, status int, v any) error {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// decodeJSON reads a bounded JSON body into v (see api.Decode).
func decodeJSON(r *http.Request, v any) error {
	return api.Decode(http.MaxBytesReader(nil, r.Body, api.MaxRequestBody), v)
}

func (s *Server) hHealth(w http.ResponseWriter, r *http.Request) error {
	return writeJSON(w, 200, map[string]string{"status": "ok"})
}

func (s *Server) versionInfo(ctx context.Context) api.VersionInfo {
	return api.VersionInfo{Server: Version, API: api.Version, GoVersion: runtime.Version(), VMM: s.mgr.BackendName(),
		Accel: string(s.mgr.Accel()), VMMVersion: s.mgr.VMMVersion(ctx)}
}

func (s *Server) hVersion(w http.ResponseWriter, r *http.Request) error {
	return writeJSON(w, 200, s.versionInfo(r.Context()))
}

func (s *Server) hWhoAmI(w http.ResponseWriter, r *http.Request) error {
	id := r.Context().Value(keyIdentity).(*identity)
	return writeJSON(w, 200, api.WhoAmI{User: id.user.Name, Admin: id.user.IsAdmin, Via: id.via, Version: Version})
}

func (s *Server) hCapabilities(w http.ResponseWriter, r *http.Request) error {
	c, err := s.mgr.Capabilities(r.Context(), userOf(r.Context()))
	if err != nil {
		return err
	}
	c.Server = Version
	return writeJSON(w, 200, c)
}

// vmRef is the VM a request names: {name}, or with ?user=U (admins only;
// see manager.Owner) "U/{name}". It is "" for routes without a VM.
func vmRef(r *http.Request) string {
	name := r.PathValue("name")
	if u := r.URL.Query().Get("user"); u != "" && name != "" {
		return u + "/" + name
	}
	return name
}

func (s *Server) hListVMs(w http.ResponseWriter, r *http.Request) error {
	list := s.mgr.ListVMs
	switch r.URL.Query().Get("all") {
	case "", "0", "false":
	case "1", "true":
		list = s.mgr.ListAllVMs
	default:
		return fmt.Errorf("%w: all must be true or false", errdefs.ErrInvalidArgument)
	}
	vms, err := list(r.Context(), userOf(r.Context()))
	if err != nil {
		return err
	}
	return writeJSON(w, 200, vms)
}

func (s *Server) hCreateVM(w http.ResponseWriter, r *http.Request) error {
	var req api.CreateVMRequest
	if err := decodeJSON(r, &req); err != nil {
		return err
	}
	vm, err := s.mgr.CreateVM(r.Context(), userOf(r.Context()), req)
	if err != nil {
		return err
	}
	return writeJSON(w, http.StatusCreated, vm)
}

func (s *Server) hGetVM(w http.ResponseWriter, r *http.Request) error {
	vm, err := s.mgr.GetVM(r.Context(), userOf(r.Context()), vmRef(r))
	if err != nil {
		return err
	}
	return writeJSON(w, 200, vm)
}

func (s *Server) hDestroyVM(w http.ResponseWriter, r *http.Request) error {
	res, err := s.mgr.DestroyVM(r.Context(), userOf(r.Context()), vmRef(r))
	if err != nil {
		return err
	}
	return writeJSON(w, 200, res)
}

func (s *Server) hLogs(w http.ResponseWriter, r *http.Request) error {
	tail := int64(1 << 20)
	if t := r.URL.Query().Get("tail"); t != "" {
		n, err := strconv.ParseInt(t, 10, 64)
		if err != nil || n < 0 {
			return fmt.Errorf("%w: tail must be a byte count", errdefs.ErrInvalidArgument)
		}
		tail = n
	}
	rd, err := s.mgr.Logs(r.Context(), userOf(r.Context()), vmRef(r), tail)
	if err != nil {
		return err
	}
	defer rd.Close()
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	// Streamed: at most [limits] serial_log_size, never all in memory.
	_, err = io.Copy(w, rd)
	return err
}

// newRequestID makes an id for a request that came without one.
func newRequestID() string {
	b := make([]byte, 8)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// ms is a duration in milliseconds, for logs.
func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
