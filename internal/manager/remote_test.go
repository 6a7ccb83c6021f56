package manager

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/noid-vm/noid/internal/api"
	"github.com/noid-vm/noid/internal/errdefs"
	"github.com/noid-vm/noid/internal/remote"
	"github.com/noid-vm/noid/internal/remote/remotetest"
)

// remoteSection is a [remote] section for the test store srv.
func remoteSection(t *testing.T, srv *remotetest.Server) string {
	return srv.TOML(t, srv.Addr, "fleet")
}

// cutStore fails every chunk read after the first n, as a store that went
// away in the middle of a pull.
type cutStore struct {
	remote.Store
	n    int32
	gets atomic.Int32
}

func (c *cutStore) Get(ctx context.Context, key string) ([]byte, error) {
	if strings.Contains(key, "/chunks/") && c.gets.Add(1) > c.n {
		return nil, fmt.Errorf("%w: remote store: the connection was cut (test)", errdefs.ErrUnavailable)
	}
	return c.Store.Get(ctx, key)
}

// remoteEntries lists what the pull cache holds.
func remoteEntries(e *env) []string {
	ents, _ := os.ReadDir(filepath.Join(e.cfg.StorageDir(), "remote"))
	var out []string
	for _, en := range ents {
		out = append(out, en.Name())
	}
	return out
}

// TestRemoteTwoHosts: two managers, each on its own data dir, share one
// real S3 server. A pushes a checkpoint of a VM with a file and a running
// counter; B clones it (the file, the counter going on, its own entropy),
// a second clone downloads nothing; another user cannot see it; a pull
// cut in the middle leaves nothing behind and a retry works; B pulls A's
// golden and creates from it; a manifest of another backend is refused.
func TestRemoteTwoHosts(t *testing.T) {
	srv := remotetest.Start(t)
	sec := remoteSection(t, srv)
	a := newEnv(t, sec)
	b := newEnv(t, sec)
	ctx := tctx(t)

	a.create("src")
	a.mustExec("src", "sh", "-c", "echo from-a > /root/mark; sync")
	a.mustExec("src", "sh", "-c", "setsid sh -c 'i=0; while true; do i=$((i+1)); echo $i > /tmp/c.new; mv /tmp/c.new /tmp/counter; sleep 0.2; done' </dev/null >/dev/null 2>&1 &")
	// counterAt reads the guest's counter, -1 before it has written one.
	counterAt := func(e *env, vm string) int {
		out, _, _, _ := e.exec(vm, "cat", "/tmp/counter")
		n, err := strconv.Atoi(strings.TrimSpace(out))
		if err != nil {
			return -1
		}
		return n
	}
	for deadline := time.Now().Add(time.Minute); counterAt(a, "src") < 3; {
		if time.Now().After(deadline) {
			t.Fatal("the counter does not count")
		}
		a.mustExec("src", "sleep", "0.2")
	}
	if _, err := a.mgr.Checkpoint(ctx, a.user, "src", api.CheckpointRequest{Name: "one"}); err != nil {
		t.Fatal(err)
	}
	c0 := counterAt(a, "src")
	pushed, err := a.mgr.PushCheckpoint(ctx, a.user, "src", "one", api.RemotePushRequest{})
	if err != nil {
		t.Fatalf("push: %v", err)
	}
	t.Logf("push: %+v %+v", *pushed, *pushed.Pushed)
	if pushed.Key != "src/one" || pushed.Owner != "root" || pushed.Pushed.BytesMoved <= 0 || pushed.Pushed.BytesMoved > pushed.SizeBytes/2 {
		t.Errorf("push of a 256 MiB VM: %+v %+v", *pushed, *pushed.Pushed)
	}
	// Pushing it again sends only the manifest.
	again, err := a.mgr.PushCheckpoint(ctx, a.user, "src", "one", api.RemotePushRequest{})
	if err != nil || again.Pushed.ChunksMoved != 0 {
		t.Errorf("second push: %+v %v", again.Pushed, err)
	}

	// B: a pull cut in the middle leaves nothing, and no VM.
	b.close()
	b.remote = &cutStore{Store: a.mgr.remote, n: 2}
	b.open()
	if _, err := b.mgr.CloneRemote(ctx, b.user, api.RemoteCloneRequest{Key: "src/one", As: "copy"}); !errors.Is(err, errdefs.ErrUnavailable) {
		t.Fatalf("clone with the store cut: %v", err)
	}
	if left := remoteEntries(b); len(left) != 0 {
		t.Errorf("a cut pull left %v in %s", left, b.mgr.remoteDir())
	}
	if _, err := b.mgr.GetVM(ctx, b.user, "copy"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("the failed clone left a VM: %v", err)
	}
	b.close()
	b.remote = nil
	b.open()

	cl, err := b.mgr.CloneRemote(ctx, b.user, api.RemoteCloneRequest{Key: "src/one", As: "copy"})
	if err != nil {
		t.Fatalf("clone from the store: %v", err)
	}
	t.Logf("clone: %+v pulled %+v", *cl.Timings, *cl.Pulled)
	if cl.Source != "remote:src/one" || cl.Pulled.Cached || cl.Pulled.BytesMoved <= 0 || cl.Pulled.LocalFiles != 1 {
		t.Errorf("first clone on B: source %q, pulled %+v (want the base image found on B)", cl.Source, *cl.Pulled)
	}
	if got := b.mustExec("copy", "cat", "/root/mark"); got != "from-a\n" {
		t.Errorf("the clone sees /root/mark = %q", got)
	}
	if got := strings.TrimSpace(b.mustExec("copy", "hostname")); got != "copy" {
		t.Errorf("clone hostname %q", got)
	}
	n1 := counterAt(b, "copy")
	if n1 < 1 || n1 > c0+50 {
		t.Errorf("clone counter %d right after the clone, the checkpoint was taken near %d", n1, c0)
	}
	for deadline := time.Now().Add(time.Minute); counterAt(b, "copy") <= n1; {
		if time.Now().After(deadline) {
			t.Fatal("the clone's counter process does not run on")
		}
		b.mustExec("copy", "sleep", "0.2")
	}

	// A second clone on B downloads nothing, and has its own entropy.
	cl2, err := b.mgr.CloneRemote(ctx, b.user, api.RemoteCloneRequest{Key: "src/one", As: "copy2"})
	if err != nil {
		t.Fatal(err)
	}
	if !cl2.Pulled.Cached || cl2.Pulled.BytesMoved != 0 {
		t.Errorf("second clone on B pulled %+v", *cl2.Pulled)
	}
	r1 := b.mustExec("copy", "sh", "-c", "head -c 16 /dev/urandom | od -An -tx1")
	r2 := b.mustExec("copy2", "sh", "-c", "head -c 16 /dev/urandom | od -An -tx1")
	if r1 == r2 {
		t.Errorf("two clones of one remote checkpoint read the same random bytes %q", r1)
	}

	// Keys are per user.
	bob, _, err := b.mgr.Store().CreateUser(ctx, "bob", false)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.mgr.CloneRemote(ctx, bob, api.RemoteCloneRequest{Key: "src/one", As: "stolen"}); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("bob cloned root's checkpoint: %v", err)
	}

	// A manifest of another backend is refused before anything moves.
	st := a.mgr.remote
	raw, err := st.Get(ctx, remote.CheckpointKey(remote.UserNS("root"), "src/one"))
	if err != nil {
		t.Fatal(err)
	}
	forged := strings.Replace(string(raw), `"backend": "qemu"`, `"backend": "firecracker"`, 1)
	if forged == string(raw) {
		t.Fatalf("no backend field in the manifest: %s", raw[:200])
	}
	if err := st.Put(ctx, remote.CheckpointKey(remote.UserNS("root"), "fc/one"), []byte(forged)); err != nil {
		t.Fatal(err)
	}
	_, err = b.mgr.CloneRemote(ctx, b.user, api.RemoteCloneRequest{Key: "fc/one", As: "fc"})
	if !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), "firecracker backend") || !strings.Contains(errdefs.HintOf(err), "firecracker") {
		t.Errorf("clone of a firecracker checkpoint: %v (hint %q)", err, errdefs.HintOf(err))
	}

	// Golden: A promotes and pushes (root: the system golden), B pulls
	// it and creates from it; a second pull moves nothing.
	if _, err := a.mgr.PromoteGolden(ctx, a.user, api.GoldenPromoteRequest{VM: "src", Checkpoint: "one"}); err != nil {
		t.Fatal(err)
	}
	gp, err := a.mgr.PushGolden(ctx, a.user, api.GoldenRemoteRequest{})
	if err != nil || gp.Owner != "system" || gp.Key != "1x256" {
		t.Fatalf("golden push: %+v %v", gp, err)
	}
	g, err := b.mgr.PullGolden(ctx, b.user, api.GoldenRemoteRequest{})
	if err != nil {
		t.Fatalf("golden pull: %v", err)
	}
	if g.Stale || g.Owner != "system" || g.Pulled.Cached || !strings.HasPrefix(g.Remote, "system/golden/1x256@") {
		t.Errorf("pulled golden: %+v %+v", *g, *g.Pulled)
	}
	// Its files are those of the checkpoint B pulled already: none moves.
	if g.Pulled.ChunksMoved != 0 || g.Pulled.LocalFiles < 3 {
		t.Errorf("the golden pull downloaded what B has: %+v", *g.Pulled)
	}
	gv := b.create("from-golden")
	if gv.BootPath != "golden" {
		t.Errorf("create on B after the pull booted %s (%s)", gv.BootPath, gv.BootReason)
	}
	if got := b.mustExec("from-golden", "cat", "/root/mark"); got != "from-a\n" {
		t.Errorf("golden vm on B: %q", got)
	}
	g2, err := b.mgr.PullGolden(ctx, b.user, api.GoldenRemoteRequest{})
	if err != nil || !g2.Pulled.Cached {
		t.Errorf("second golden pull: %+v %v", g2, err)
	}
	// Bob may pull the system golden too; he has none of his own.
	if g, err := b.mgr.PullGolden(ctx, bob, api.GoldenRemoteRequest{}); err != nil || !strings.HasPrefix(g.Remote, "system/") {
		t.Errorf("bob's pull of the system golden: %+v %v", g, err)
	}
	// A checkpoint nobody pushed: not found, with a hint.
	if _, err := b.mgr.CloneRemote(ctx, b.user, api.RemoteCloneRequest{Key: "nope/x", As: "x"}); !errors.Is(err, errdefs.ErrNotFound) || errdefs.HintOf(err) == "" {
		t.Errorf("clone of a missing key: %v", err)
	}
	// The credentials are nowhere in the logs.
	for _, e := range []*env{a, b} {
		if strings.Contains(e.logs.String(), remotetest.SecretKey) {
			t.Error("the store's secret is in the manager's log")
		}
	}
}

// TestRemoteCrashMidPull: a server killed (SIGKILL) in a push once every
// chunk is stored, before the manifest, leaves nothing visible in the
// store and no staging files, and a push again sends only the manifest. A
// server killed once a clone's pull has written every file, before the
// pulled snapshot is renamed into place, leaves nothing after its
// restart: no pulled snapshot, no VM; a clone then pulls it whole.
func TestRemoteCrashMidPull(t *testing.T) {
	srv := remotetest.Start(t)
	e := newEnv(t, remoteSection(t, srv))
	ctx := tctx(t)
	e.create("src")
	e.mustExec("src", "sh", "-c", "echo crash > /root/mark; sync")
	if _, err := e.mgr.Checkpoint(ctx, e.user, "src", api.CheckpointRequest{Name: "one"}); err != nil {
		t.Fatal(err)
	}
	e.crashChild("remote.push-before-manifest", childOp{Op: "remote-push", VM: "src", Checkpoint: "one", Name: "k"}, e.cfgPath)
	e.open()
	if left := remoteEntries(e); len(left) != 0 {
		t.Errorf("after the restart the killed push left %v", left)
	}
	if _, ok, err := e.mgr.remote.Stat(ctx, remote.CheckpointKey(remote.UserNS("root"), "k")); ok || err != nil {
		t.Fatalf("the killed push's manifest: there %v, %v", ok, err)
	}
	p, err := e.mgr.PushCheckpoint(ctx, e.user, "src", "one", api.RemotePushRequest{Key: "k"})
	if err != nil {
		t.Fatal(err)
	}
	if p.Pushed.ChunksMoved != 0 {
		t.Errorf("the push after the crash sent %d chunks again: %+v", p.Pushed.ChunksMoved, *p.Pushed)
	}
	e.crashChild("remote.after-pull", childOp{Op: "remote-clone", Checkpoint: "k", Name: "copy"}, e.cfgPath)
	var tmp []string
	for _, n := range remoteEntries(e) {
		if strings.HasPrefix(n, ".tmp-") {
			tmp = append(tmp, n)
		}
	}
	if len(tmp) != 1 {
		t.Fatalf("after the kill the pull cache holds %v, want one unfinished .tmp- dir", remoteEntries(e))
	}
	e.open()
	if left := remoteEntries(e); len(left) != 0 {
		t.Errorf("after the restart the pull cache holds %v", left)
	}
	if _, err := e.mgr.GetVM(ctx, e.user, "copy"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("the killed clone is listed: %v", err)
	}
	cl, err := e.mgr.CloneRemote(ctx, e.user, api.RemoteCloneRequest{Key: "k", As: "copy"})
	if err != nil {
		t.Fatal(err)
	}
	if cl.Pulled.Cached {
		t.Error("the clone after the crash found a pulled snapshot")
	}
	if got := e.mustExec("copy", "cat", "/root/mark"); got != "crash\n" {
		t.Errorf("clone: %q", got)
	}
}

// TestRemoteFaults drives pushes and clones through a proxy in front of a
// real store that fails on cue: the store killed in the middle of a push
// and of a pull, a 503 storm, a damaged chunk. Each ends in a clear error
// with nothing visible in the store or imported on the host (no pulled
// snapshot, no VM), and a retry works.
func TestRemoteFaults(t *testing.T) {
	srv := remotetest.Start(t)
	target, _ := url.Parse("http://" + srv.Addr)
	const (
		pass = iota
		killAtPut
		killAtGet
		storm
	)
	// n counts the chunk requests of the current mode that the store has
	// answered: the store is killed at the first one after two of them, so
	// that some chunks surely arrived (chunks move in parallel, and on a
	// busy host a third request can start before the first two end).
	var mode, n atomic.Int32
	var killed atomic.Bool
	rp := httputil.NewSingleHostReverseProxy(target)
	rp.ErrorLog = log.New(io.Discard, "", 0)
	proxy := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		chunk := strings.Contains(r.URL.Path, "/chunks/")
		switch m := mode.Load(); m {
		case killAtPut, killAtGet:
			method := http.MethodPut
			if m == killAtGet {
				method = http.MethodGet
			}
			if chunk && r.Method == method {
				if n.Load() >= 2 && killed.CompareAndSwap(false, true) {
					srv.Kill()
				}
				defer n.Add(1)
			}
		case storm:
			if chunk {
				w.WriteHeader(http.StatusServiceUnavailable)
				w.Write([]byte(`<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code><Message>Reduce your request rate.</Message></Error>`))
				return
			}
		}
		rp.ServeHTTP(w, r)
	}))
	defer proxy.Close()
	e := newEnv(t, srv.TOML(t, strings.TrimPrefix(proxy.URL, "http://"), "fleet"))
	ctx := tctx(t)
	e.create("src")
	e.mustExec("src", "sh", "-c", "echo faults > /root/mark; sync")
	if _, err := e.mgr.Checkpoint(ctx, e.user, "src", api.CheckpointRequest{Name: "one"}); err != nil {
		t.Fatal(err)
	}
	manifestKey := "fleet/" + remote.CheckpointKey(remote.UserNS("root"), "src/one")
	visible := func() bool {
		_, err := srv.Client().StatObject(ctx, remotetest.Bucket, manifestKey, minio.StatObjectOptions{})
		return err == nil
	}
	// nothingImported checks that a failed clone left no VM and nothing
	// pulled.
	nothingImported := func(when, vm string) {
		t.Helper()
		if left := remoteEntries(e); len(left) != 0 {
			t.Errorf("%s: the host's pull directory holds %v", when, left)
		}
		if _, err := e.mgr.GetVM(ctx, e.user, vm); !errors.Is(err, errdefs.ErrNotFound) {
			t.Errorf("%s: vm %s exists: %v", when, vm, err)
		}
	}

	// The store dies in the middle of the push.
	mode.Store(killAtPut)
	_, err := e.mgr.PushCheckpoint(ctx, e.user, "src", "one", api.RemotePushRequest{})
	if !errors.Is(err, errdefs.ErrUnavailable) || errdefs.HintOf(err) == "" {
		t.Fatalf("push with the store killed: %v (hint %q)", err, errdefs.HintOf(err))
	}
	t.Logf("push with the store killed: %v", err)
	mode.Store(pass)
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	if visible() {
		t.Fatal("the interrupted push left a manifest")
	}
	if left := remoteEntries(e); len(left) != 0 {
		t.Errorf("the interrupted push left %v", left)
	}
	p, err := e.mgr.PushCheckpoint(ctx, e.user, "src", "one", api.RemotePushRequest{})
	if err != nil {
		t.Fatalf("push again: %v", err)
	}
	if p.Pushed.ChunksReused == 0 {
		t.Errorf("the second push resent everything: %+v", *p.Pushed)
	}

	// The store dies in the middle of the clone's pull.
	n.Store(0)
	killed.Store(false)
	mode.Store(killAtGet)
	if _, err := e.mgr.CloneRemote(ctx, e.user, api.RemoteCloneRequest{Key: "src/one", As: "c1"}); !errors.Is(err, errdefs.ErrUnavailable) {
		t.Fatalf("clone with the store killed: %v", err)
	}
	mode.Store(pass)
	nothingImported("store killed mid-pull", "c1")
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}

	// A 503 storm.
	mode.Store(storm)
	_, err = e.mgr.CloneRemote(ctx, e.user, api.RemoteCloneRequest{Key: "src/one", As: "c1"})
	if !errors.Is(err, errdefs.ErrUnavailable) || !strings.Contains(err.Error(), "503") {
		t.Fatalf("clone in a 503 storm: %v", err)
	}
	t.Logf("clone in a 503 storm: %v (hint %q)", err, errdefs.HintOf(err))
	mode.Store(pass)
	nothingImported("503 storm", "c1")

	// A damaged chunk: another chunk's bytes under its name.
	man, _, err := remote.ReadManifest(ctx, e.mgr.remote, remote.CheckpointKey(remote.UserNS("root"), "src/one"))
	if err != nil {
		t.Fatal(err)
	}
	var mem remote.File
	for _, f := range man.Files {
		if f.Name == "memory.snap" {
			mem = f
		}
	}
	if len(mem.Chunks) < 2 {
		t.Fatalf("memory.snap has %d chunks", len(mem.Chunks))
	}
	chunkKey := func(c remote.Chunk) string { return remote.UserNS("root") + "/chunks/" + c.Sum[:2] + "/" + c.Sum }
	other, err := e.mgr.remote.Get(ctx, chunkKey(mem.Chunks[1]))
	if err != nil {
		t.Fatal(err)
	}
	if err := e.mgr.remote.Put(ctx, chunkKey(mem.Chunks[0]), other); err != nil {
		t.Fatal(err)
	}
	_, err = e.mgr.CloneRemote(ctx, e.user, api.RemoteCloneRequest{Key: "src/one", As: "c1"})
	if !errors.Is(err, errdefs.ErrConflict) || !strings.Contains(err.Error(), "checksum mismatch") || errdefs.HintOf(err) == "" {
		t.Fatalf("clone of a damaged chunk: %v", err)
	}
	t.Logf("clone of a damaged chunk: %v", err)
	nothingImported("damaged chunk", "c1")
	// Remove the damaged object and push again: the chunk goes up again.
	if err := e.mgr.remote.Delete(ctx, chunkKey(mem.Chunks[0])); err != nil {
		t.Fatal(err)
	}
	if _, err := e.mgr.PushCheckpoint(ctx, e.user, "src", "one", api.RemotePushRequest{}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.mgr.CloneRemote(ctx, e.user, api.RemoteCloneRequest{Key: "src/one", As: "c1"}); err != nil {
		t.Fatalf("clone after the faults: %v", err)
	}
	if got := e.mustExec("c1", "cat", "/root/mark"); got != "faults\n" {
		t.Errorf("clone: %q", got)
	}
}
