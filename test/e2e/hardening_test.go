//go:build e2e

package e2e

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/coder/websocket"
	_ "modernc.org/sqlite"

	"github.com/noid-vm/noid/client"
	"github.com/noid-vm/noid/internal/api"
	"github.com/noid-vm/noid/internal/testutil"
)

// TestAuditLogEscaped (issue 18, finding 7): a target made of newlines,
// tabs and terminal escapes is stored escaped, and `noid-server audit`
// prints one line per entry with no control character, also for a row
// written raw (as an older server did).
func TestAuditLogEscaped(t *testing.T) {
	e := NewEnv(t)
	forged := "x\n2030-01-01T00:00:00Z  root  DELETE /v1/vms/{name}  prod\tok\x1b[2J\x1b]0;owned\x07\u202e"
	if _, err := e.Client.DestroyVM(ctx(t), forged); err == nil {
		t.Fatal("destroying a VM that does not exist succeeded")
	}
	db, err := sql.Open("sqlite", "file:"+filepath.Join(e.Dir, "data", "noid.db")+"?_pragma=busy_timeout(10000)")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var stored string
	if err := db.QueryRow(`SELECT target FROM audit ORDER BY id DESC LIMIT 1`).Scan(&stored); err != nil {
		t.Fatal(err)
	}
	want := `x\n2030-01-01T00:00:00Z  root  DELETE /v1/vms/{name}  prod\tok\x1b[2J\x1b]0;owned\a\u202e`
	if stored != want {
		t.Errorf("stored target %q, want %q", stored, want)
	}
	// A row an older server wrote raw.
	if _, err := db.Exec(`INSERT INTO audit(at, user_name, action, target, result, request_id) VALUES ('2026-01-01T00:00:00Z', 'root', 'DELETE /v1/vms/{name}', ?, 'ok', ?)`,
		"legacy\nrow\x1b[31m", "rid\twith\ttabs"); err != nil {
		t.Fatal(err)
	}
	out := e.serverCmd(t, "audit")
	lines := strings.Split(strings.TrimSuffix(out, "\n"), "\n")
	if len(lines) != 3 { // the header, the refused destroy, the legacy row
		t.Errorf("audit printed %d lines, want 3:\n%s", len(lines), out)
	}
	for _, c := range out {
		if c != '\n' && (c < ' ' || c == 0x7f || (c >= 0x80 && c < 0xa0) || c == '\u202e') {
			t.Errorf("audit output holds the control character %U:\n%q", c, out)
			break
		}
	}
	for _, want := range []string{want, `legacy\nrow\x1b[31m`, `rid\twith\ttabs`} {
		if !strings.Contains(out, want) {
			t.Errorf("audit output lacks %q:\n%s", want, out)
		}
	}
}

// TestDataDirModes (issue 18, finding 11): a server makes an existing data
// dir that others can read private, saying so, and the database's -wal and
// -shm files are 0600 like the database.
func TestDataDirModes(t *testing.T) {
	e := NewEnv(t)
	data := filepath.Join(e.Dir, "data")
	e.Stop()
	if err := os.Chmod(data, 0o755); err != nil {
		t.Fatal(err)
	}
	e.Start()
	fi, err := os.Stat(data)
	if err != nil {
		t.Fatal(err)
	}
	if m := fi.Mode().Perm(); m != 0o700 {
		t.Errorf("data dir has mode %04o after a start, want 0700", m)
	}
	if !strings.Contains(e.Log(), "made a data directory private") || !strings.Contains(e.Log(), "old_mode=0755") {
		t.Errorf("the server did not say it changed the data dir's mode:\n%s", e.Log())
	}
	for _, f := range []string{"noid.db", "noid.db-wal", "noid.db-shm"} {
		fi, err := os.Stat(filepath.Join(data, f))
		if err != nil {
			t.Fatal(err)
		}
		if m := fi.Mode().Perm(); m != 0o600 {
			t.Errorf("%s has mode %04o, want 0600", f, m)
		}
	}
}

// TestExecEnvFileAndCallerEnv (issue 18, finding 13): secrets reach an
// exec through --env-file and -e KEY (the value from the caller's
// environment), never through the command line.
func TestExecEnvFileAndCallerEnv(t *testing.T) {
	e := NewEnv(t)
	e.Create("envs")
	file := filepath.Join(t.TempDir(), "secrets.env")
	if err := os.WriteFile(file, []byte("# deploy secrets\nFROM_FILE=file secret=with equals \n  INDENTED=yes\nPASSED\nUNSET_HERE\n\nOVERRIDDEN=file\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	args := []string{"exec", "envs", "--env-file", file, "-e", "FROM_CALLER", "-e", "OVERRIDDEN=flag", "--",
		"sh", "-c", `echo "$FROM_FILE|$INDENTED|$PASSED|${UNSET_HERE-unset}|$FROM_CALLER|$OVERRIDDEN"`}
	cmd := exec.Command(e.Bins.Noid, args...)
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "UNSET_HERE=") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	cmd.Env = append(cmd.Env, "NOID_URL=unix://"+e.Socket, "FROM_CALLER=caller secret", "PASSED=from env")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("noid %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	if want := "file secret=with equals |yes|from env|unset|caller secret|flag\n"; string(out) != want {
		t.Errorf("the command saw %q, want %q", out, want)
	}
	if line := strings.Join(args, " "); strings.Contains(line, "file secret") || strings.Contains(line, "caller secret") {
		t.Fatal("the test put a secret on the command line")
	}
	// A line that is neither KEY=VALUE nor KEY is a usage error naming it.
	bad := filepath.Join(t.TempDir(), "bad.env")
	os.WriteFile(bad, []byte("OK=1\nNOT A KEY\n"), 0o600)
	if r := e.CLI("", "exec", "envs", "--env-file", bad, "--", "true"); r.Code != 2 || !strings.Contains(r.Stderr, "line 2") {
		t.Errorf("a bad env file: exit %d, %s", r.Code, r.Stderr)
	}
}

// restartWith restarts the server with extra as the config's extra TOML.
func (e *Env) restartWith(t *testing.T, extra string) {
	t.Helper()
	e.Stop()
	if err := os.WriteFile(e.Config, []byte(configTOML(filepath.Join(e.Dir, "data"), e.Socket, testutil.TinyImage(t), extra)), 0o600); err != nil {
		t.Fatal(err)
	}
	e.Start()
}

// TestSandboxFailsClosed (issue 18, finding 6): when the confinement the
// config asks for cannot be had, the server starts but refuses to start
// VMMs, saying why and which setting allows it; VMs already running can
// still be listed, used and destroyed. [sandbox] require = false restores
// the old behaviour (VMMs run as root).
func TestSandboxFailsClosed(t *testing.T) {
	e := NewEnv(t)
	before := e.Create("before")
	if u := vmmUID(t, before.PID); u < 2_000_000_000 {
		t.Fatalf("control: the first VMM runs as %d, not a sandbox uid", u)
	}

	// A shared VMM user that does not exist.
	e.restartWith(t, "[sandbox]\nuser = \"noid-no-such-user\"")
	_, err := e.Client.CreateVM(ctx(t), client.CreateVMRequest{Name: "after"})
	if err == nil {
		after, _ := e.Client.GetVM(ctx(t), "after")
		t.Fatalf("a VM was created although its VMM cannot be confined; its VMM runs as uid %d", vmmUID(t, after.PID))
	}
	var ce *client.Error
	if !errors.Is(err, client.ErrUnavailable) || !strings.Contains(err.Error(), "noid-no-such-user") || !errors.As(err, &ce) || !strings.Contains(ce.Hint, "require = false") {
		t.Errorf("create without confinement: %v (%+v), want unavailable naming the user, with a hint naming the setting", err, ce)
	}
	if vms, err := e.Client.ListVMs(ctx(t)); err != nil || len(vms) != 1 || vms[0].Name != "before" || vms[0].State != "running" {
		t.Errorf("list while VMMs are refused: %v %v", vms, err)
	}
	if out := e.MustExec("before", "echo", "still here"); out != "still here\n" {
		t.Errorf("exec in the running VM: %q", out)
	}
	if _, err := e.Client.DestroyVM(ctx(t), "before"); err != nil {
		t.Errorf("destroy while VMMs are refused: %v", err)
	}

	// The opt-out.
	e.restartWith(t, "[sandbox]\nuser = \"noid-no-such-user\"\nrequire = false")
	v := e.Create("unconfined")
	if u := vmmUID(t, v.PID); u != 0 {
		t.Errorf("with require = false the VMM runs as %d, want root", u)
	}
	e.MustCLI("destroy", "unconfined")

	// Per-VM uids that cannot be leased: the lease directory is a file.
	e.Stop()
	uids := filepath.Join(e.Dir, "data", "sandbox", "uids")
	if err := os.RemoveAll(uids); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(uids, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	e.restartWith(t, "")
	_, err = e.Client.CreateVM(ctx(t), client.CreateVMRequest{Name: "nouids"})
	if err == nil || !strings.Contains(err.Error(), "per-VM uids") {
		t.Errorf("create without per-VM uids: %v", err)
	}
}

// serialLogUse is how many bytes of the VM's serial.log hold data on disk.
func serialLogUse(t *testing.T, e *Env, id string) int64 {
	t.Helper()
	m, _ := filepath.Glob(filepath.Join(e.Dir, "data", "users", "*", "vms", id, "serial.log"))
	if len(m) != 1 {
		t.Fatalf("serial.log of vm %s: %v", id, m)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(m[0], &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

// TestSerialLogBounded (issue 18, finding 3): a guest that writes far more
// than [limits] serial_log_size to its console gets its log cut to the
// newest part, on disk and in GET /logs, and so after the server restarts
// under the running VM.
func TestSerialLogBounded(t *testing.T) {
	const limit = 64 << 10
	e := NewEnv(t, WithConfig("[limits]\nserial_log_size = \"64K\""))
	v := e.Create("chatty")
	flood := func(marker string) {
		t.Helper()
		// 1 MiB of console output, then a marker line.
		e.MustExec("chatty", "sh", "-c", "i=0; while [ $i -lt 16 ]; do head -c 65536 /dev/zero | tr '\\0' x > /dev/ttyS0; i=$((i+1)); done; echo "+marker+" > /dev/ttyS0")
		logs, err := e.Client.Logs(ctx(t), "chatty", 1<<40)
		if err != nil {
			t.Fatal(err)
		}
		if len(logs) > limit {
			t.Errorf("GET /logs?tail=1TiB returned %d bytes, want at most %d", len(logs), limit)
		}
		if !bytes.Contains(logs, []byte(marker)) {
			t.Errorf("GET /logs lacks the newest output %q", marker)
		}
		// The trim runs every second: wait for it, with a deadline.
		deadline := time.Now().Add(30 * time.Second)
		for use := serialLogUse(t, e, v.ID); use > 2*limit; use = serialLogUse(t, e, v.ID) {
			if time.Now().After(deadline) {
				t.Fatalf("serial.log still holds %d bytes on disk, want at most %d", use, 2*limit)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	flood("first-flood-done")
	// VMs outlive the server: a new one bounds the log of the adopted VM.
	e.Kill9()
	e.Start()
	flood("second-flood-done")
}

// rawExec opens an exec WebSocket on e's socket, sends req and waits for
// the process to start.
func rawExec(t *testing.T, e *Env, vm string, req client.ExecRequest) *websocket.Conn {
	t.Helper()
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", e.Socket)
	}}}
	ws, _, err := websocket.Dial(ctx(t), "ws://noid/v1/vms/"+vm+"/exec", &websocket.DialOptions{HTTPClient: hc})
	if err != nil {
		t.Fatal(err)
	}
	ws.SetReadLimit(1 << 20)
	b, _ := json.Marshal(req)
	if err := ws.Write(ctx(t), websocket.MessageText, b); err != nil {
		t.Fatal(err)
	}
	if _, msg, err := ws.Read(ctx(t)); err != nil || !strings.Contains(string(msg), `"started"`) {
		t.Fatalf("exec did not start: %s %v", msg, err)
	}
	return ws
}

// TestExecStdinBounded (issue 18, finding 10): a client that pushes stdin
// to a process that never reads it makes the server take only a bounded
// amount: the rest waits in the client (or, for messages over the limit,
// the stream ends).
func TestExecStdinBounded(t *testing.T) {
	e := NewEnv(t)
	e.Create("deaf")
	for _, size := range []int{256<<10 - 1, 4<<20 - 1} {
		ws := rawExec(t, e, "deaf", client.ExecRequest{Argv: []string{"sleep", "5"}, Stdin: true})
		var sent atomic.Int64
		go func() {
			msg := make([]byte, size+1)
			msg[0] = api.ChanStdin
			for ws.Write(context.Background(), websocket.MessageBinary, msg) == nil {
				sent.Add(int64(size))
			}
		}()
		// Until the process exits (or the server ends the stream).
		for {
			_, msg, err := ws.Read(ctx(t))
			if err != nil || strings.Contains(string(msg), `"exit"`) || strings.Contains(string(msg), `"error"`) {
				break
			}
		}
		ws.CloseNow()
		// The server's share, the agent's flow-control window (1 MiB), the
		// pipes and socket buffers on the way, and the message in flight.
		t.Logf("messages of %d bytes: the server took %d bytes of stdin for a process that read none", size, sent.Load())
		if n, bound := sent.Load(), int64(4<<20+size); n > bound {
			t.Errorf("messages of %d bytes: the server took %.1f MiB of stdin for a process that reads none, want at most %.1f MiB",
				size, float64(n)/(1<<20), float64(bound)/(1<<20))
		}
	}
}

// TestExecSessionsPerUser (issue 18, finding 10): a user may have at most
// [limits] sessions_per_user exec and console sessions open; one more is
// refused with 429, and a session that ends frees its place.
func TestExecSessionsPerUser(t *testing.T) {
	e := NewEnv(t, WithConfig("[limits]\nsessions_per_user = 2"))
	e.Create("busy")
	c, cancel := context.WithCancel(ctx(t))
	defer cancel()
	var running sync.WaitGroup
	for i := range 2 {
		up := make(chan struct{})
		running.Add(1)
		go func() {
			defer running.Done()
			e.Client.Exec(c, "busy", client.ExecRequest{Argv: []string{"sh", "-c", "echo up; exec sleep 600"}},
				client.ExecIO{Stdout: writerFunc(func(p []byte) (int, error) {
					select {
					case <-up:
					default:
						close(up)
					}
					return len(p), nil
				}), Stderr: io.Discard})
		}()
		select {
		case <-up:
		case <-c.Done():
			t.Fatalf("session %d did not start", i)
		}
	}
	_, err := e.Client.Exec(ctx(t), "busy", client.ExecRequest{Argv: []string{"true"}}, client.ExecIO{Stdout: io.Discard, Stderr: io.Discard})
	if !errors.Is(err, client.ErrRateLimited) || !strings.Contains(err.Error(), "2 exec and console sessions open") {
		t.Fatalf("a third session: %v, want rate limited naming the two open", err)
	}
	if r := e.CLI("", "console", "busy"); r.Code == 0 || !strings.Contains(r.Stderr, "sessions_per_user") {
		t.Errorf("a console as the third session: exit %d, %s", r.Code, r.Stderr)
	}
	cancel()
	running.Wait()
	// The sessions end on the server once their processes got SIGHUP.
	deadline := time.Now().Add(time.Minute)
	for {
		_, err := e.Client.Exec(ctx(t), "busy", client.ExecRequest{Argv: []string{"true"}}, client.ExecIO{Stdout: io.Discard, Stderr: io.Discard})
		if err == nil {
			break
		}
		if !errors.Is(err, client.ErrRateLimited) || time.Now().After(deadline) {
			t.Fatalf("after the sessions ended: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }

// TestSocketOpenToItsGroup (issue 18, finding 4): the unix socket is open
// to root and socket_group only, and `noid-server add-user --local` lets a
// local account in, with the server running or not; remove-user lets it
// out again at once, even for a login that still carries the group.
func TestSocketOpenToItsGroup(t *testing.T) {
	e := NewEnv(t, WithSocketGroup(t))
	// Let other uids reach the socket (the test's dir is 0700).
	if err := os.Chmod(e.Dir, 0o711); err != nil {
		t.Fatal(err)
	}
	socketIs := func(gid uint32) {
		t.Helper()
		var st syscall.Stat_t
		if err := syscall.Stat(e.Socket, &st); err != nil {
			t.Fatal(err)
		}
		if st.Mode&0o777 != 0o660 || st.Uid != 0 || st.Gid != gid {
			t.Errorf("socket mode %o owner %d:%d, want 0660 0:%d", st.Mode&0o777, st.Uid, st.Gid, gid)
		}
	}
	socketIs(0) // the group does not exist yet: root only
	if out, err := e.curlAs(t, 65534, nil, "/v1/whoami"); err == nil {
		t.Fatalf("a local account connected without being let in: %s", out)
	}
	if r := e.ServerCLI("add-user", "--local", "nobody"); r.Code != 0 || !strings.Contains(r.Stdout, "member of group "+e.SocketGroup) {
		t.Fatalf("add-user --local nobody: exit %d\n%s%s", r.Code, r.Stdout, r.Stderr)
	}
	gid := socketGID(t, e)
	socketIs(gid)
	if out, err := e.curlAs(t, 65534, loginGroups(t, "nobody"), "/v1/whoami"); err != nil || !strings.Contains(out, `"user": "nobody"`) {
		t.Errorf("whoami as nobody after add-user --local: %v %s", err, out)
	}
	if r := e.ServerCLI("list-users"); !regexp.MustCompile(`nobody\s+unix uid 65534`).MatchString(r.Stdout) {
		t.Errorf("list-users does not show the local user:\n%s", r.Stdout)
	}
	// remove-user: out of the group, and refused at once although this
	// login still carries the group.
	if r := e.ServerCLI("remove-user", "nobody"); r.Code != 0 {
		t.Fatalf("remove-user nobody: %d %s", r.Code, r.Stderr)
	}
	if out, _ := e.curlAs(t, 65534, []uint32{gid}, "/v1/whoami"); !strings.Contains(out, "unauthenticated") || !strings.Contains(out, "not in group") {
		t.Errorf("whoami as nobody after remove-user: %s", out)
	}
	// Without a server: the next one gives the socket to the group.
	e.Stop()
	if r := e.ServerCLI("add-user", "--local", "nobody"); r.Code != 0 {
		t.Fatalf("add-user --local nobody without a server: %d %s%s", r.Code, r.Stdout, r.Stderr)
	}
	e.Start()
	socketIs(gid)
	if out, err := e.curlAs(t, 65534, loginGroups(t, "nobody"), "/v1/whoami"); err != nil || !strings.Contains(out, `"user": "nobody"`) {
		t.Errorf("whoami as nobody after an offline add-user --local: %v %s", err, out)
	}
	// Root is the admin as before.
	if who, err := e.Client.WhoAmI(ctx(t)); err != nil || !who.Admin {
		t.Errorf("root on the socket: %+v %v", who, err)
	}
}

// TestDefaultQuotas (issue 18, finding 4): a user without limits of their
// own gets finite ones, and a VM's disk is bounded.
func TestDefaultQuotas(t *testing.T) {
	e := NewEnv(t)
	e.addUser(t, "tenant")
	out := e.serverCmd(t, "set-quota", "tenant")
	for _, want := range []string{`max_vms\s+20\s+config`, `max_vcpus\s+32\s+config`, `max_memory_mib\s+32768\s+config`, `max_checkpoint_bytes\s+68719476736\s+config`} {
		if !regexp.MustCompile(want).MatchString(out) {
			t.Errorf("the default quota lacks %s:\n%s", want, out)
		}
	}
	// The built-in defaults do not bind the admin (root here).
	if out := e.serverCmd(t, "set-quota", "root"); !regexp.MustCompile(`max_vms\s+unlimited\s+config`).MatchString(out) {
		t.Errorf("root's default quota:\n%s", out)
	}
	tenant, err := client.New("unix://"+e.Socket, e.addUser(t, "tenant2"))
	if err != nil {
		t.Fatal(err)
	}
	_, err = tenant.CreateVM(ctx(t), client.CreateVMRequest{Name: "huge", DiskSize: "64G"})
	if !errors.Is(err, client.ErrQuotaExceeded) || !strings.Contains(err.Error(), "at most 32G") {
		t.Errorf("a 64G disk: %v, want quota exceeded naming 32G", err)
	}
	if vms, _ := tenant.ListVMs(ctx(t)); len(vms) != 0 {
		t.Errorf("a refused create left %d VMs", len(vms))
	}
}

// TestMinFreeReserve (issue 18, finding 4): below [storage] min_free (5%
// of the filesystem by default) of available space where VMs live, creates
// and checkpoints are refused, saying so; freeing space lets them work.
func TestMinFreeReserve(t *testing.T) {
	// VMs on a 1G loop-mounted XFS image, which the test can fill.
	var mnt string
	t.Cleanup(func() { // after the Env's (cleanups run last first)
		if mnt != "" {
			exec.Command("umount", mnt).Run()
			os.RemoveAll(filepath.Dir(filepath.Dir(mnt)))
		}
	})
	e := NewEnv(t, WithConfig("[storage]\nreflink_image_size = \"1G\""))
	mnt = filepath.Join(e.Dir, "data", "reflink")
	e.Create("a")
	var st syscall.Statfs_t
	if err := syscall.Statfs(mnt, &st); err != nil {
		t.Fatal(err)
	}
	avail, total := int64(st.Bavail)*st.Bsize, int64(st.Blocks)*st.Bsize
	filler := filepath.Join(mnt, "filler")
	f, err := os.Create(filler)
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.Fallocate(int(f.Fd()), 0, 0, avail-total/50); err != nil { // 2% left
		t.Fatal(err)
	}
	f.Close()
	_, err = e.Client.CreateVM(ctx(t), client.CreateVMRequest{Name: "b"})
	if !errors.Is(err, client.ErrResourceExhausted) || !strings.Contains(err.Error(), "min_free") {
		t.Errorf("create with 2%% free: %v, want resource exhausted naming min_free", err)
	}
	_, err = e.Client.Checkpoint(ctx(t), "a", client.CheckpointRequest{Name: "c1"})
	if !errors.Is(err, client.ErrResourceExhausted) || !strings.Contains(err.Error(), "min_free") {
		t.Errorf("checkpoint with 2%% free: %v, want resource exhausted naming min_free", err)
	}
	if vms, _ := e.Client.ListVMs(ctx(t)); len(vms) != 1 {
		t.Errorf("%d VMs after a refused create, want 1", len(vms))
	}
	os.Remove(filler)
	// XFS frees an unlinked file's blocks in the background: wait for
	// them, with a deadline.
	syscall.Sync()
	deadline := time.Now().Add(time.Minute)
	for syscall.Statfs(mnt, &st); int64(st.Bavail)*st.Bsize < total/10; syscall.Statfs(mnt, &st) {
		if time.Now().After(deadline) {
			t.Fatalf("the filler's space did not come back: %d bytes available", int64(st.Bavail)*st.Bsize)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if _, err := e.Client.Checkpoint(ctx(t), "a", client.CheckpointRequest{Name: "c1"}); err != nil {
		t.Errorf("checkpoint after freeing space: %v", err)
	}
	e.Create("b")
}
