package remote_test

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/noid-vm/noid/internal/config"
	"github.com/noid-vm/noid/internal/errdefs"
	"github.com/noid-vm/noid/internal/remote"
	"github.com/noid-vm/noid/internal/remote/remotetest"
	"github.com/noid-vm/noid/internal/storage"
)

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	t.Cleanup(cancel)
	return c
}

func newStore(t *testing.T, cfg config.Remote) *remote.S3 {
	t.Helper()
	creds, err := cfg.LoadRemoteCredentials()
	if err != nil {
		t.Fatal(err)
	}
	st, err := remote.NewS3(cfg, creds)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

const memSize = 2 << 30

// snapshotDir makes a snapshot-like directory: a 2 GiB sparse memory file
// with touched MiB of random data scattered over it (and a zero page
// written, which must not move), a small state file, a disk layer and its
// metadata.
func snapshotDir(t *testing.T, touched int) (string, []string) {
	t.Helper()
	dir := t.TempDir()
	f, err := os.Create(filepath.Join(dir, "memory.snap"))
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(memSize); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1<<20)
	for i := range touched {
		rand.Read(buf)
		// Spread over the file, not aligned to the chunk size.
		off := int64(i) * (memSize / int64(touched+1))
		off = off/4096*4096 + 12288
		if _, err := f.WriteAt(buf, off); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := f.WriteAt(make([]byte, 1<<20), memSize-(4<<20)); err != nil {
		t.Fatal(err)
	}
	f.Close()
	rand.Read(buf)
	os.WriteFile(filepath.Join(dir, "vmstate.snap"), buf[:70000], 0o600)
	os.WriteFile(filepath.Join(dir, "disk-0001.qcow2"), append([]byte(strings.Repeat("qcow2 layer ", 10000)), buf[:5000]...), 0o600)
	os.WriteFile(filepath.Join(dir, "meta.json"), []byte(`{"backend":"qemu","vcpus":1,"memory_mib":2048}`), 0o600)
	return dir, []string{"memory.snap", "vmstate.snap", "disk-0001.qcow2"}
}

func manifest() *remote.Manifest {
	return &remote.Manifest{Kind: remote.KindCheckpoint, Key: "dev/clean", Owner: "alice", Backend: "qemu", VCPUs: 1, MemoryMiB: 2048, MetaFile: "meta.json"}
}

// sameFiles checks that every file of want is in got with the same
// content identity, and that got's memory file kept its holes.
func sameFiles(t *testing.T, want, got string, names []string) {
	t.Helper()
	a, _ := os.ReadFile(filepath.Join(want, "meta.json"))
	b, _ := os.ReadFile(filepath.Join(got, "meta.json"))
	var ma, mb any
	if json.Unmarshal(a, &ma) != nil || json.Unmarshal(b, &mb) != nil || !reflect.DeepEqual(ma, mb) {
		t.Errorf("meta.json differs after the round trip: %s, was %s", b, a)
	}
	for _, n := range names {
		a, err := storage.ContentID(context.Background(), filepath.Join(want, n))
		if err != nil {
			t.Fatal(err)
		}
		b, err := storage.ContentID(context.Background(), filepath.Join(got, n))
		if err != nil {
			t.Fatal(err)
		}
		if a != b {
			t.Errorf("%s differs after the round trip", n)
		}
	}
	var st syscall.Stat_t
	if err := syscall.Stat(filepath.Join(got, "memory.snap"), &st); err != nil {
		t.Fatal(err)
	}
	if st.Size != memSize || st.Blocks*512 > 256<<20 {
		t.Errorf("pulled memory file: size %d, %d MiB allocated: its holes were not kept", st.Size, st.Blocks*512>>20)
	}
}

func TestPushPullRoundTrip(t *testing.T) {
	srv := remotetest.Start(t)
	st := newStore(t, srv.Config(t, srv.Addr, "fleet"))
	if err := st.Check(ctx(t)); err != nil {
		t.Fatal(err)
	}
	dir, names := snapshotDir(t, 64)
	ns := remote.UserNS("alice")
	key := remote.CheckpointKey(ns, "dev/clean")
	m := manifest()
	s1, err := remote.Push(ctx(t), st, ns, key, dir, names, m, remote.PushOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("push: %+v", *s1)
	// 64 MiB of random data, about 2 MiB of state and layer: not 2 GiB.
	if s1.BytesMoved > 80<<20 || s1.BytesMoved < 64<<20 {
		t.Errorf("push moved %d MiB for 64 MiB of data in a 2 GiB file", s1.BytesMoved>>20)
	}
	want, _ := storage.ContentID(context.Background(), filepath.Join(dir, "memory.snap"))
	if m.Files[0].SHA256 != want {
		t.Errorf("manifest sum %s, storage.ContentID %s", m.Files[0].SHA256, want)
	}
	// The objects are under the prefix and the user's namespace.
	keys := srv.Client().ListObjects(ctx(t), remotetest.Bucket, minio.ListObjectsOptions{Prefix: "fleet/users/alice/", Recursive: true})
	n := 0
	for o := range keys {
		if o.Err != nil {
			t.Fatal(o.Err)
		}
		n++
	}
	if n != s1.Moved+1 {
		t.Errorf("%d objects under fleet/users/alice/, want %d chunks + the manifest", n, s1.Moved)
	}

	// A second push of the same snapshot sends only its manifest.
	s2, err := remote.Push(ctx(t), st, ns, key, dir, names, manifest(), remote.PushOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if s2.Moved != 0 || s2.Reused != s1.Chunks {
		t.Errorf("second push moved %d chunks, reused %d of %d", s2.Moved, s2.Reused, s1.Chunks)
	}

	got, raw, err := remote.ReadManifest(ctx(t), st, key)
	if err != nil || len(raw) == 0 {
		t.Fatal(err)
	}
	out := t.TempDir()
	ps, err := remote.Pull(ctx(t), st, ns, got, out, remote.PullOptions{Parallel: 3})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("pull: %+v", *ps)
	if ps.BytesMoved > 80<<20 {
		t.Errorf("pull moved %d MiB", ps.BytesMoved>>20)
	}
	sameFiles(t, dir, out, names)

	// Local files with the right identity are used instead of the store.
	out2 := t.TempDir()
	ps2, err := remote.Pull(ctx(t), st, ns, got, out2, remote.PullOptions{Local: func(ctx context.Context, f remote.File, dst string) bool {
		return f.Name == "memory.snap" && os.Link(filepath.Join(out, f.Name), dst) == nil
	}})
	if err != nil {
		t.Fatal(err)
	}
	if ps2.LocalFiles != 1 || ps2.BytesMoved > 4<<20 {
		t.Errorf("pull with the memory file at hand: %d local files, %d bytes moved", ps2.LocalFiles, ps2.BytesMoved)
	}
	sameFiles(t, dir, out2, names)
}

// failing wraps a Store and runs hook before each call.
type failing struct {
	remote.Store
	hook func(op string)
}

func (f failing) Put(ctx context.Context, key string, data []byte) error {
	f.hook("put " + key)
	return f.Store.Put(ctx, key, data)
}

func (f failing) Get(ctx context.Context, key string) ([]byte, error) {
	f.hook("get " + key)
	return f.Store.Get(ctx, key)
}

func manifestThere(t *testing.T, st remote.Store, key string) bool {
	_, ok, err := st.Stat(ctx(t), key)
	if err != nil {
		t.Fatal(err)
	}
	return ok
}

// The store dies in the middle of a push: the push fails with a clear
// error and no manifest; once it is back a retry sends only what is
// missing.
func TestStoreKilledMidPush(t *testing.T) {
	srv := remotetest.Start(t)
	st := newStore(t, srv.Config(t, srv.Addr, ""))
	dir, names := snapshotDir(t, 48)
	ns := remote.UserNS("alice")
	key := remote.CheckpointKey(ns, "dev/cut")
	var puts atomic.Int32
	f := failing{st, func(op string) {
		if strings.HasPrefix(op, "put") && puts.Add(1) == 10 {
			srv.Kill()
		}
	}}
	_, err := remote.Push(ctx(t), f, ns, key, dir, names, manifest(), remote.PushOptions{})
	if !errors.Is(err, errdefs.ErrUnavailable) || !strings.Contains(err.Error(), "cannot reach") {
		t.Fatalf("push with the store killed: %v, want unavailable: cannot reach", err)
	}
	if errdefs.HintOf(err) == "" {
		t.Errorf("no hint in %v", err)
	}
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	if manifestThere(t, st, key) {
		t.Fatal("the manifest of the failed push is visible")
	}
	s, err := remote.Push(ctx(t), st, ns, key, dir, names, manifest(), remote.PushOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if s.Reused < 5 {
		t.Errorf("the retry reused %d chunks: it did not resume", s.Reused)
	}
	if !manifestThere(t, st, key) {
		t.Fatal("no manifest after the retry")
	}
}

// The store dies in the middle of a pull: the pull fails with a clear
// error, and a retry once it is back gets the whole snapshot.
func TestStoreKilledMidPull(t *testing.T) {
	srv := remotetest.Start(t)
	st := newStore(t, srv.Config(t, srv.Addr, ""))
	dir, names := snapshotDir(t, 48)
	ns := remote.UserNS("alice")
	key := remote.CheckpointKey(ns, "dev/cut")
	if _, err := remote.Push(ctx(t), st, ns, key, dir, names, manifest(), remote.PushOptions{}); err != nil {
		t.Fatal(err)
	}
	m, _, err := remote.ReadManifest(ctx(t), st, key)
	if err != nil {
		t.Fatal(err)
	}
	var gets atomic.Int32
	f := failing{st, func(op string) {
		if gets.Add(1) == 8 {
			srv.Kill()
		}
	}}
	_, err = remote.Pull(ctx(t), f, ns, m, t.TempDir(), remote.PullOptions{})
	if !errors.Is(err, errdefs.ErrUnavailable) {
		t.Fatalf("pull with the store killed: %v, want unavailable", err)
	}
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	out := t.TempDir()
	if _, err := remote.Pull(ctx(t), st, ns, m, out, remote.PullOptions{}); err != nil {
		t.Fatal(err)
	}
	sameFiles(t, dir, out, names)
}

// A chunk damaged in the store is found by its checksum.
func TestCorruptedChunk(t *testing.T) {
	srv := remotetest.Start(t)
	st := newStore(t, srv.Config(t, srv.Addr, ""))
	dir, names := snapshotDir(t, 8)
	ns := remote.UserNS("alice")
	key := remote.CheckpointKey(ns, "dev/bad")
	m := manifest()
	if _, err := remote.Push(ctx(t), st, ns, key, dir, names, m, remote.PushOptions{}); err != nil {
		t.Fatal(err)
	}
	// Replace one chunk of the memory file by another valid chunk: it
	// decompresses, but its content is not what its name says.
	mf := m.Files[0]
	a, b := mf.Chunks[0], mf.Chunks[1]
	other, err := st.Get(ctx(t), ns+"/chunks/"+b.Sum[:2]+"/"+b.Sum)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Put(ctx(t), ns+"/chunks/"+a.Sum[:2]+"/"+a.Sum, other); err != nil {
		t.Fatal(err)
	}
	got, _, err := remote.ReadManifest(ctx(t), st, key)
	if err != nil {
		t.Fatal(err)
	}
	_, err = remote.Pull(ctx(t), st, ns, got, t.TempDir(), remote.PullOptions{})
	if !errors.Is(err, errdefs.ErrConflict) || !strings.Contains(err.Error(), "checksum mismatch") || !strings.Contains(err.Error(), "memory.snap") {
		t.Fatalf("pull of a damaged chunk: %v", err)
	}
	// Garbage that is not zstd at all.
	if err := st.Put(ctx(t), ns+"/chunks/"+a.Sum[:2]+"/"+a.Sum, []byte("garbage")); err != nil {
		t.Fatal(err)
	}
	_, err = remote.Pull(ctx(t), st, ns, got, t.TempDir(), remote.PullOptions{})
	if !errors.Is(err, errdefs.ErrConflict) || !strings.Contains(err.Error(), "damaged") {
		t.Fatalf("pull of a garbage chunk: %v", err)
	}
}

// A store that answers 503 to everything: the push fails with a clear
// error and leaves nothing visible; when the storm ends, it works.
func TestServiceUnavailableStorm(t *testing.T) {
	srv := remotetest.Start(t)
	target, _ := url.Parse("http://" + srv.Addr)
	var storm, refused atomic.Bool
	rp := httputil.NewSingleHostReverseProxy(target)
	proxy := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if storm.Load() && r.Method == http.MethodPut {
			refused.Store(true)
			w.Header().Set("Retry-After", "0")
			w.WriteHeader(http.StatusServiceUnavailable)
			w.Write([]byte(`<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>`))
			return
		}
		rp.ServeHTTP(w, r)
	}))
	defer proxy.Close()
	st := newStore(t, srv.Config(t, strings.TrimPrefix(proxy.URL, "http://"), ""))
	dir, names := snapshotDir(t, 8)
	ns := remote.UserNS("alice")
	key := remote.CheckpointKey(ns, "dev/storm")
	storm.Store(true)
	_, err := remote.Push(ctx(t), st, ns, key, dir, names, manifest(), remote.PushOptions{})
	if !errors.Is(err, errdefs.ErrUnavailable) || !strings.Contains(err.Error(), "503") || !refused.Load() {
		t.Fatalf("push in a 503 storm: %v", err)
	}
	storm.Store(false)
	if manifestThere(t, st, key) {
		t.Fatal("a manifest is visible after the failed push")
	}
	if _, err := remote.Push(ctx(t), st, ns, key, dir, names, manifest(), remote.PushOptions{}); err != nil {
		t.Fatal(err)
	}
}

// Wrong credentials and a missing bucket each give one line with a hint,
// and the secret is in neither.
func TestConfigErrors(t *testing.T) {
	srv := remotetest.Start(t)
	cfg := srv.Config(t, srv.Addr, "")
	bad := filepath.Join(t.TempDir(), "bad")
	os.WriteFile(bad, []byte("access_key_id = \"noidtestaccess\"\nsecret_access_key = \"wrong-secret-xyz\"\n"), 0o600)
	cfg.CredentialsFile = bad
	err := newStore(t, cfg).Check(ctx(t))
	if !errors.Is(err, errdefs.ErrUnavailable) || !strings.Contains(err.Error(), "refused the server's credentials") ||
		!strings.Contains(errdefs.HintOf(err), "credentials_file") || strings.Contains(err.Error(), "wrong-secret") {
		t.Errorf("wrong secret: %v (hint %q)", err, errdefs.HintOf(err))
	}
	cfg = srv.Config(t, srv.Addr, "")
	cfg.Bucket = "no-such-bucket"
	err = newStore(t, cfg).Check(ctx(t))
	if !errors.Is(err, errdefs.ErrUnavailable) || !strings.Contains(err.Error(), `bucket "no-such-bucket" does not exist`) || !strings.Contains(errdefs.HintOf(err), "create the bucket") {
		t.Errorf("missing bucket: %v (hint %q)", err, errdefs.HintOf(err))
	}
	// A credentials file others can read is refused.
	os.Chmod(bad, 0o644)
	cfg.CredentialsFile = bad
	if _, err := cfg.LoadRemoteCredentials(); err == nil || !strings.Contains(err.Error(), "chmod 600") {
		t.Errorf("credentials file with mode 0644: %v", err)
	}
}
