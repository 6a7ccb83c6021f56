package cli

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"
	"golang.org/x/sys/unix"

	agentclient "github.com/noid-vm/noid/internal/agent/client"
	"github.com/noid-vm/noid/internal/agent/guest"
	"github.com/noid-vm/noid/internal/api"
)

// fakeServer is a small stand-in for noid-server: enough of the API for
// the CLI's own logic (VM resolution, argument rules, output formats, exit
// codes), with file copies served by a real guest agent whose "guest" file
// system is a temporary directory.
type fakeServer struct {
	t          *testing.T
	URL        string
	GuestRoot  string
	apiVersion string

	mu          sync.Mutex
	vms         map[string]*api.VM
	calls       []string // "METHOD vm detail" of recorded calls
	getOverride []byte   // when set, GET …/files?path= serves this tar
	// hold, when set, makes checkpoint wait until it is closed.
	hold  chan struct{}
	agent *agentclient.Client
}

func newFakeServer(t *testing.T, vms ...string) *fakeServer {
	t.Helper()
	f := &fakeServer{t: t, GuestRoot: t.TempDir(), apiVersion: api.Version, vms: map[string]*api.VM{}}
	for _, n := range vms {
		f.vms[n] = &api.VM{Name: n, ID: "id-" + n, State: "running", VCPUs: 1, MemoryMiB: 256, Network: "none", VMM: "qemu",
			Accel: "tcg", BootPath: "cold", CreatedAt: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)}
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /version", func(w http.ResponseWriter, r *http.Request) {
		writeJSONTest(w, 200, api.VersionInfo{Server: "9.9.9-fake", API: f.apiVersion, GoVersion: "go", VMM: "qemu", Accel: "tcg"})
	})
	mux.HandleFunc("GET /v1/whoami", func(w http.ResponseWriter, r *http.Request) {
		// A token named "as-USER" is USER: enough to see which token came.
		user := "tester"
		if u, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer as-"); ok {
			user = u
		}
		writeJSONTest(w, 200, api.WhoAmI{User: user, Via: "token"})
	})
	mux.HandleFunc("GET /v1/vms", func(w http.ResponseWriter, r *http.Request) {
		f.mu.Lock()
		defer f.mu.Unlock()
		out := []*api.VM{}
		for _, v := range f.vms {
			out = append(out, v)
		}
		writeJSONTest(w, 200, out)
	})
	mux.HandleFunc("GET /v1/vms/{name}", func(w http.ResponseWriter, r *http.Request) {
		if v := f.vm(w, r); v != nil {
			writeJSONTest(w, 200, v)
		}
	})
	mux.HandleFunc("GET /v1/vms/{name}/checkpoints", func(w http.ResponseWriter, r *http.Request) {
		if f.vm(w, r) != nil {
			writeJSONTest(w, 200, []*api.Checkpoint{})
		}
	})
	mux.HandleFunc("POST /v1/vms/{name}/checkpoints", func(w http.ResponseWriter, r *http.Request) {
		var req api.CheckpointRequest
		json.NewDecoder(r.Body).Decode(&req)
		if v := f.vm(w, r); v != nil {
			if f.hold != nil {
				<-f.hold
			}
			f.record("checkpoint", v.Name, req.Name)
			writeJSONTest(w, 201, api.Checkpoint{ID: "cp1", Name: req.Name, VM: v.Name})
		}
	})
	mux.HandleFunc("DELETE /v1/vms/{name}/checkpoints/{checkpoint}", func(w http.ResponseWriter, r *http.Request) {
		if v := f.vm(w, r); v != nil {
			f.record("checkpoint-rm", v.Name, r.PathValue("checkpoint"))
			w.WriteHeader(204)
		}
	})
	mux.HandleFunc("POST /v1/vms/{name}/restore", func(w http.ResponseWriter, r *http.Request) {
		var req api.RestoreRequest
		json.NewDecoder(r.Body).Decode(&req)
		if v := f.vm(w, r); v != nil {
			f.record("restore", v.Name, req.Checkpoint+" as="+req.As)
			writeJSONTest(w, 200, v)
		}
	})
	mux.HandleFunc("GET /v1/vms/{name}/exec", f.exec)
	mux.HandleFunc("GET /v1/vms/{name}/console", f.exec)
	mux.HandleFunc("PUT /v1/vms/{name}/files", f.putFiles)
	mux.HandleFunc("GET /v1/vms/{name}/files", f.getFiles)
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	f.URL = srv.URL
	return f
}

func writeJSONTest(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

func writeErrTest(w http.ResponseWriter, status int, code, msg, hint string) {
	writeJSONTest(w, status, api.ErrorBody{Error: api.ErrorDetail{Code: code, Message: msg, Hint: hint}})
}

func (f *fakeServer) record(what, vm, detail string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, strings.TrimSpace(what+" "+vm+" "+detail))
}

// takeCalls returns and clears the recorded calls.
func (f *fakeServer) takeCalls() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	c := f.calls
	f.calls = nil
	return c
}

func (f *fakeServer) vm(w http.ResponseWriter, r *http.Request) *api.VM {
	f.mu.Lock()
	defer f.mu.Unlock()
	name := r.PathValue("name")
	v := f.vms[name]
	if v == nil {
		writeErrTest(w, 404, "not_found", fmt.Sprintf("vm %q: not found", name), "noid list")
	}
	return v
}

// exec echoes the request: stdout gets "vm=NAME argv=A|B|C" (and
// " user=U" when the request names a user) and the exit code is len(argv).
// A command "nosuchcmd" is not found: exit 127 with a reason and message.
func (f *fakeServer) exec(w http.ResponseWriter, r *http.Request) {
	v := f.vm(w, r)
	if v == nil {
		return
	}
	ws, err := websocket.Accept(w, r, nil)
	if err != nil {
		return
	}
	defer ws.CloseNow()
	ctx := r.Context()
	_, first, err := ws.Read(ctx)
	if err != nil {
		return
	}
	var req api.ExecRequest
	json.Unmarshal(first, &req)
	kind := "exec"
	if strings.HasSuffix(r.URL.Path, "/console") {
		kind = "console"
	}
	f.record(kind, v.Name, strings.Join(req.Argv, "|"))
	send := func(m api.StreamMsg) { b, _ := json.Marshal(m); ws.Write(ctx, websocket.MessageText, b) }
	send(api.StreamMsg{Type: api.MsgStarted})
	if len(req.Argv) > 0 && req.Argv[0] == "nosuchcmd" {
		send(api.StreamMsg{Type: api.MsgExit, Code: 127, Reason: api.ExitNotFound, Message: "nosuchcmd: command not found"})
		ws.Close(websocket.StatusNormalClosure, "")
		return
	}
	user := ""
	if req.User != "" {
		user = " user=" + req.User
	}
	ws.Write(ctx, websocket.MessageBinary, append([]byte{api.ChanStdout}, fmt.Sprintf("%s vm=%s argv=%s%s\n", kind, v.Name, strings.Join(req.Argv, "|"), user)...))
	send(api.StreamMsg{Type: api.MsgExit, Code: len(req.Argv)})
	ws.Close(websocket.StatusNormalClosure, "")
}

// agentClient starts (once) a real guest agent over a socketpair.
func (f *fakeServer) agentClient() (*agentclient.Client, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.agent != nil {
		return f.agent, nil
	}
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	conn := func(fd int) net.Conn {
		file := os.NewFile(uintptr(fd), "socketpair")
		c, _ := net.FileConn(file)
		file.Close()
		return c
	}
	host, g := conn(fds[0]), conn(fds[1])
	a := guest.New(guest.Config{EtcDir: f.t.TempDir()})
	ctx, cancel := context.WithCancel(context.Background())
	f.t.Cleanup(cancel)
	go a.ServeConn(ctx, g)
	cctx, ccancel := context.WithTimeout(ctx, 20*time.Second)
	defer ccancel()
	c, err := agentclient.Connect(cctx, host, agentclient.Options{HelloInterval: 200 * time.Millisecond})
	if err != nil {
		return nil, err
	}
	f.t.Cleanup(func() { c.Close() })
	f.agent = c
	return c, nil
}

func (f *fakeServer) guestPath(p string) string {
	return filepath.Join(f.GuestRoot, filepath.Clean("/"+p))
}

func (f *fakeServer) putFiles(w http.ResponseWriter, r *http.Request) {
	v := f.vm(w, r)
	if v == nil {
		return
	}
	dir := r.URL.Query().Get("dir")
	f.record("put", v.Name, dir)
	ac, err := f.agentClient()
	if err != nil {
		writeErrTest(w, 503, "unavailable", err.Error(), "")
		return
	}
	res, err := ac.Put(r.Context(), f.guestPath(dir), r.Body)
	if err != nil {
		io.Copy(io.Discard, r.Body)
		writeErrTest(w, 400, "invalid_argument", err.Error(), "")
		return
	}
	writeJSONTest(w, 200, api.PutFilesResult{Entries: res.Entries, Bytes: res.Bytes})
}

func (f *fakeServer) getFiles(w http.ResponseWriter, r *http.Request) {
	v := f.vm(w, r)
	if v == nil {
		return
	}
	p := r.URL.Query().Get("path")
	stat := r.URL.Query().Get("stat") == "true"
	f.record("get", v.Name, p)
	f.mu.Lock()
	override := f.getOverride
	f.mu.Unlock()
	var rc io.ReadCloser
	if override != nil {
		rc = io.NopCloser(bytes.NewReader(override))
	} else {
		ac, err := f.agentClient()
		if err != nil {
			writeErrTest(w, 503, "unavailable", err.Error(), "")
			return
		}
		rc, err = ac.Get(r.Context(), f.guestPath(p))
		if err != nil {
			if strings.Contains(err.Error(), "no such file") {
				writeErrTest(w, 404, "not_found", p+": no such file or directory", "")
			} else {
				writeErrTest(w, 400, "invalid_argument", err.Error(), "")
			}
			return
		}
	}
	defer rc.Close()
	if stat {
		hdr, err := tar.NewReader(rc).Next()
		if err != nil {
			writeErrTest(w, 400, "invalid_argument", err.Error(), "")
			return
		}
		fi := api.FileInfo{Path: p, Mode: uint32(hdr.Mode & 0o7777), ModTime: hdr.ModTime, Size: hdr.Size, Type: api.FileTypeFile}
		switch hdr.Typeflag {
		case tar.TypeDir:
			fi.Type, fi.Size = api.FileTypeDir, 0
		case tar.TypeSymlink:
			fi.Type, fi.LinkTarget = api.FileTypeSymlink, hdr.Linkname
		}
		writeJSONTest(w, 200, fi)
		return
	}
	w.Header().Set("Content-Type", "application/x-tar")
	w.Header().Set("Trailer", api.FilesErrorTrailer)
	if _, err := io.Copy(w, rc); err != nil && !errors.Is(err, io.EOF) {
		w.Header().Set(api.FilesErrorTrailer, err.Error())
	}
}

// cliResult is one CLI run.
type cliResult struct {
	stdout, stderr string
	code           int
}

// cliRun runs the CLI in-process against url with cwd as its working
// directory and extra environment variables.
type cliRunner struct {
	t     *testing.T
	url   string
	env   map[string]string
	cwd   string
	tty   bool
	stdin io.Reader
	// stderr, when set, receives stderr instead of the result (a pty).
	stderr io.Writer
}

func (f *fakeServer) runner(t *testing.T) *cliRunner {
	return &cliRunner{t: t, url: f.URL, env: map[string]string{"HOME": t.TempDir()}, cwd: t.TempDir()}
}

func (c *cliRunner) run(args ...string) cliResult {
	c.t.Helper()
	var out, errb bytes.Buffer
	var stderr io.Writer = &errb
	if c.stderr != nil {
		stderr = c.stderr
	}
	stdin := c.stdin
	if stdin == nil {
		stdin = strings.NewReader("")
	}
	e := newEnv(stdin, &out, stderr, func(k string) string {
		if k == "NOID_URL" {
			return c.url
		}
		return c.env[k]
	})
	e.getwd = func() (string, error) { return c.cwd, nil }
	e.progressDelay = 0
	code := run(e, args)
	return cliResult{stdout: out.String(), stderr: errb.String(), code: code}
}

// in returns a copy of the runner working in dir.
func (c *cliRunner) in(dir string) *cliRunner {
	cp := *c
	cp.cwd = dir
	return &cp
}
