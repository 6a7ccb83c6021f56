package firecracker

// These tests drive the Backend end to end against a FAKE firecracker
// process: the test binary re-executed with fctest.ProcessEnv set (see
// TestMain), which serves fctest's fake API, validates every request against
// Firecracker's v1.16.1 schema when the schema file is present, and writes
// fake snapshot files. They check noid's side only: the processes it starts,
// the requests it sends and in which order, its file handling (disk copies,
// diff merges, links), and its error handling. They say nothing about how a
// real Firecracker behaves.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/noid-vm/noid/internal/errdefs"
	"github.com/noid-vm/noid/internal/storage"
	"github.com/noid-vm/noid/internal/vmm"
	"github.com/noid-vm/noid/internal/vmm/firecracker/fctest"
)

type fakeEnv struct {
	b       *Backend
	root    string
	log     string
	kernel  string
	initrd  string
	checked bool // requests are schema-validated
}

// newFakeEnv returns a backend whose "firecracker" is the fake process.
func newFakeEnv(t *testing.T, cfg Config) *fakeEnv {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	e := &fakeEnv{root: t.TempDir()}
	e.log = filepath.Join(e.root, "requests.jsonl")
	t.Setenv(fctest.ProcessEnv, "1")
	t.Setenv(fctest.LogEnv, e.log)
	wd, _ := os.Getwd()
	if p, err := fctest.FindSchemaFile(wd); err == nil {
		t.Setenv(fctest.SchemaEnv, p)
		e.checked = true
	} else {
		t.Setenv(fctest.SchemaEnv, "")
		t.Logf("the Firecracker API schema is absent, so the fake does not validate requests: %v", err)
	}
	e.kernel = filepath.Join(e.root, "vmlinux")
	e.initrd = filepath.Join(e.root, "initrd.cpio")
	os.WriteFile(e.kernel, []byte("\x7fELF fake kernel"), 0o644)
	os.WriteFile(e.initrd, []byte("070701 fake initramfs"), 0o644)
	cfg.Binary = exe
	if cfg.JailerMode == JailerAuto {
		cfg.JailerMode = JailerNever
	}
	cfg.StartTimeout = 20 * time.Second
	e.b = New(cfg)
	return e
}

// spec returns a spec for a VM named name with its own dir, disk and TAP.
func (e *fakeEnv) spec(t *testing.T, name string) vmm.Spec {
	t.Helper()
	dir := filepath.Join(e.root, "vms", name)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	disk := filepath.Join(dir, "rootfs.ext4")
	if _, err := os.Stat(disk); errors.Is(err, os.ErrNotExist) {
		f, _ := os.Create(disk)
		f.Truncate(16 << 20)
		f.WriteAt([]byte("ext4 superblock of "+name), 1024)
		f.Close()
	}
	return vmm.Spec{
		ID: name + "_id", Name: name, Dir: dir, RunDir: dir,
		VCPUs: 2, MemoryMiB: 32,
		Kernel: e.kernel, Initrd: e.initrd, Cmdline: "noid.agent=vsock",
		Disk: disk, MemFile: filepath.Join(dir, "memory.base"),
		Net:       &vmm.NetSpec{Tap: "tap-" + name, MAC: "06:00:00:00:00:01"},
		Accel:     vmm.AccelKVM,
		SerialLog: filepath.Join(dir, "serial.log"),
	}
}

// requests reads the fake's request log for one VM id.
func (e *fakeEnv) requests(t *testing.T) []fctest.Request {
	t.Helper()
	data, err := os.ReadFile(e.log)
	if err != nil {
		t.Fatal(err)
	}
	var out []fctest.Request
	for _, line := range bytes.Split(bytes.TrimSpace(data), []byte("\n")) {
		var r fctest.Request
		if err := json.Unmarshal(line, &r); err != nil {
			t.Fatal(err)
		}
		out = append(out, r)
	}
	return out
}

// clearLog forgets the requests logged so far.
func (e *fakeEnv) clearLog(t *testing.T) { os.WriteFile(e.log, nil, 0o600) }

// assertValid fails on any request the fake refused or found invalid.
func (e *fakeEnv) assertValid(t *testing.T, reqs []fctest.Request) {
	t.Helper()
	for _, r := range reqs {
		if r.Invalid != "" {
			t.Errorf("%s %s violates the Firecracker API schema: %s", r.Method, r.Path, r.Invalid)
		}
	}
}

// sequence renders requests as "METHOD /path" lines.
func sequence(reqs []fctest.Request) []string {
	var out []string
	for _, r := range reqs {
		out = append(out, r.Method+" "+r.Path)
	}
	return out
}

func find(reqs []fctest.Request, method, path string) []fctest.Request {
	var out []fctest.Request
	for _, r := range reqs {
		if r.Method == method && r.Path == path {
			out = append(out, r)
		}
	}
	return out
}

// fakeState asks the fake process for its state and memory digest.
func fakeState(t *testing.T, in vmm.Instance) (state, digest string) {
	t.Helper()
	var st struct {
		State  string `json:"state"`
		Digest string `json:"memory_digest"`
	}
	if err := in.(*instance).api.do(context.Background(), "GET", "/fake/state", nil, &st); err != nil {
		t.Fatal(err)
	}
	return st.State, st.Digest
}

// guestWrite makes the fake guest write value into pages.
func guestWrite(t *testing.T, in vmm.Instance, value byte, pages ...int64) {
	t.Helper()
	body := map[string]any{"pages": pages, "value": value}
	if err := in.(*instance).api.do(context.Background(), "PUT", "/fake/touch", body, nil); err != nil {
		t.Fatal(err)
	}
}

// injectFault makes the fake fail the next matching request.
func injectFault(t *testing.T, in vmm.Instance, method, path, msg string) {
	t.Helper()
	f := fctest.Fault{Method: method, Path: path, Status: 400, Message: msg}
	if err := in.(*instance).api.do(context.Background(), "PUT", "/fake/fault", f, nil); err != nil {
		t.Fatal(err)
	}
}

func memDigest(t *testing.T, path string) string {
	t.Helper()
	d, err := fctest.MemoryFileDigest(path)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func sameInode(a, b string) bool {
	var sa, sb unix.Stat_t
	return unix.Stat(a, &sa) == nil && unix.Stat(b, &sb) == nil && sa.Ino == sb.Ino && sa.Dev == sb.Dev
}

func echo(t *testing.T, in vmm.Instance) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	conn, err := in.DialAgent(ctx)
	if err != nil {
		t.Fatalf("DialAgent: %v", err)
	}
	defer conn.Close()
	fmt.Fprintf(conn, "hello agent\n")
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil || line != "hello agent\n" {
		t.Fatalf("agent echo: %q %v", line, err)
	}
}

func killed(t *testing.T, in vmm.Instance) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := in.Kill(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case <-in.Done():
	default:
		t.Fatal("Done not closed after Kill")
	}
}

func TestLifecycleAgainstFakeFirecracker(t *testing.T) {
	e := newFakeEnv(t, Config{})
	ctx := context.Background()
	cp := &storage.Copier{}

	// Boot.
	specA := e.spec(t, "alpha")
	a, err := e.b.Boot(ctx, specA)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Kill(context.Background()) })
	reqs := e.requests(t)
	e.assertValid(t, reqs)
	want := []string{"GET /", "PUT /logger", "PUT /machine-config", "PUT /boot-source", "PUT /drives/rootfs",
		"PUT /network-interfaces/eth0", "PUT /vsock", "PUT /entropy", "PUT /actions"}
	if got := sequence(reqs); strings.Join(got, ",") != strings.Join(want, ",") {
		t.Fatalf("boot sequence:\n got %v\nwant %v", got, want)
	}
	var mc MachineConfig
	json.Unmarshal(find(reqs, "PUT", "/machine-config")[0].Body, &mc)
	if mc.VCPUCount != 2 || mc.MemSizeMiB != 32 || !mc.TrackDirtyPages {
		t.Fatalf("machine config %+v", mc)
	}
	var bs BootSource
	json.Unmarshal(find(reqs, "PUT", "/boot-source")[0].Body, &bs)
	if bs.KernelImagePath != e.kernel || bs.InitrdPath != e.initrd || !strings.HasSuffix(bs.BootArgs, "pci=off noid.transport=vsock noid.vsock_port=1024 noid.agent=vsock") {
		t.Fatalf("boot source %+v", bs)
	}
	var drive Drive
	json.Unmarshal(find(reqs, "PUT", "/drives/rootfs")[0].Body, &drive)
	if drive.PathOnHost != "rootfs.ext4" {
		t.Fatalf("the drive path must be relative so snapshots stay valid for clones: %+v", drive)
	}
	if st, _ := fakeState(t, a); st != "Running" {
		t.Fatalf("state %s", st)
	}
	if serial, _ := os.ReadFile(specA.SerialLog); !strings.Contains(string(serial), "fake firecracker serial console") {
		t.Fatalf("serial log not wired to stdout: %q", serial)
	}
	echo(t, a)

	// A Full checkpoint: the first one after boot.
	guestWrite(t, a, 7, 1, 2, 3)
	_, digestA1 := fakeState(t, a)
	c1 := filepath.Join(e.root, "ckpt1")
	os.Mkdir(c1, 0o700)
	e.clearLog(t)
	tm, err := a.Checkpoint(ctx, c1, cp)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("checkpoint 1 (Full): %+v", tm)
	reqs = e.requests(t)
	e.assertValid(t, reqs)
	if got := sequence(reqs); strings.Join(got, ",") != "PATCH /vm,PUT /snapshot/create,PATCH /vm" {
		t.Fatalf("checkpoint sequence %v", got)
	}
	var sc SnapshotCreateParams
	json.Unmarshal(find(reqs, "PUT", "/snapshot/create")[0].Body, &sc)
	if sc.SnapshotType != SnapshotFull || sc.MemFilePath != filepath.Join(c1, vmm.SnapMemory) {
		t.Fatalf("first checkpoint %+v", sc)
	}
	for _, f := range []string{vmm.SnapMemory, vmm.SnapState, vmm.SnapDisk, vmm.SnapMeta} {
		if _, err := os.Stat(filepath.Join(c1, f)); err != nil {
			t.Fatalf("checkpoint lacks %s: %v", f, err)
		}
	}
	if memDigest(t, filepath.Join(c1, vmm.SnapMemory)) != digestA1 {
		t.Fatal("Full checkpoint memory differs from the guest's")
	}
	meta, err := ReadMeta(c1)
	if err != nil || meta.Backend != "firecracker" || meta.VMMVersion != "1.16.1" || meta.MemoryMiB != 32 || !meta.HasNet || meta.KernelSHA256 == "" {
		t.Fatalf("meta %+v %v", meta, err)
	}
	if !sameInode(specA.MemFile, filepath.Join(c1, vmm.SnapMemory)) {
		t.Fatal("Spec.MemFile is not linked to the checkpoint's memory (the next diff base)")
	}
	if st, _ := fakeState(t, a); st != "Running" {
		t.Fatalf("not resumed after checkpoint: %s", st)
	}

	// A Diff checkpoint, merged onto a copy of the base.
	guestWrite(t, a, 9, 2, 100, 4000)
	guestWrite(t, a, 0, 3) // a page written back to zero
	_, digestA2 := fakeState(t, a)
	c2 := filepath.Join(e.root, "ckpt2")
	os.Mkdir(c2, 0o700)
	e.clearLog(t)
	if _, err := a.Checkpoint(ctx, c2, cp); err != nil {
		t.Fatal(err)
	}
	reqs = e.requests(t)
	e.assertValid(t, reqs)
	json.Unmarshal(find(reqs, "PUT", "/snapshot/create")[0].Body, &sc)
	if sc.SnapshotType != SnapshotDiff || filepath.Base(sc.MemFilePath) != diffFile {
		t.Fatalf("second checkpoint %+v", sc)
	}
	if memDigest(t, filepath.Join(c2, vmm.SnapMemory)) != digestA2 {
		t.Fatal("merged Diff checkpoint memory differs from the guest's")
	}
	if _, err := os.Stat(filepath.Join(c2, diffFile)); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("the diff layer was left in the checkpoint")
	}
	if memDigest(t, filepath.Join(c1, vmm.SnapMemory)) != digestA1 {
		t.Fatal("the earlier checkpoint's memory changed")
	}
	if alloc, _ := storage.AllocatedSize(filepath.Join(c2, vmm.SnapMemory)); alloc > 1<<20 {
		t.Fatalf("merged memory file allocates %d bytes; holes were filled", alloc)
	}

	// A forced Full checkpoint of the same state is byte-identical to the
	// merged Diff.
	a.(*instance).base = ""
	c3 := filepath.Join(e.root, "ckpt3")
	os.Mkdir(c3, 0o700)
	if _, err := a.Checkpoint(ctx, c3, cp); err != nil {
		t.Fatal(err)
	}
	m2, _ := os.ReadFile(filepath.Join(c2, vmm.SnapMemory))
	m3, _ := os.ReadFile(filepath.Join(c3, vmm.SnapMemory))
	if !bytes.Equal(m2, m3) {
		t.Fatal("Diff+merge and Full give different memory files")
	}

	// Clone B from checkpoint 2.
	specB := e.spec(t, "bravo")
	os.Remove(specB.Disk)
	e.clearLog(t)
	b, tr, err := e.b.Restore(ctx, specB, c2, cp)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Kill(context.Background()) })
	t.Logf("restore: %+v", tr)
	reqs = e.requests(t)
	e.assertValid(t, reqs)
	if got := sequence(reqs); strings.Join(got, ",") != "GET /,PUT /logger,PUT /snapshot/load" {
		t.Fatalf("restore sequence %v", got)
	}
	var load SnapshotLoadParams
	json.Unmarshal(find(reqs, "PUT", "/snapshot/load")[0].Body, &load)
	if load.MemBackend == nil || load.MemBackend.BackendType != MemBackendFile || load.MemBackend.BackendPath != specB.MemFile ||
		!load.ResumeVM || !load.TrackDirtyPages || load.VsockOverride == nil || load.VsockOverride.UDSPath != "v.sock" ||
		len(load.NetworkOverrides) != 1 || load.NetworkOverrides[0].HostDevName != "tap-bravo" ||
		load.SnapshotPath != filepath.Join(c2, vmm.SnapState) {
		t.Fatalf("load request %+v", load)
	}
	if !sameInode(specB.MemFile, filepath.Join(c2, vmm.SnapMemory)) {
		t.Fatal("the clone's memory is not the checkpoint's file (no page sharing)")
	}
	if st, dg := fakeState(t, b); st != "Running" || dg != digestA2 {
		t.Fatalf("clone state %s, memory matches checkpoint: %v", st, dg == digestA2)
	}
	db, _ := os.ReadFile(specB.Disk)
	dc, _ := os.ReadFile(filepath.Join(c2, vmm.SnapDisk))
	if !bytes.Equal(db, dc) || !bytes.Contains(db, []byte("superblock of alpha")) {
		t.Fatal("the clone's disk is not the checkpoint's")
	}
	echo(t, b)
	echo(t, a) // the original is untouched

	// The clone can be checkpointed at once, as a Diff against its base.
	guestWrite(t, b, 3, 5)
	_, digestB := fakeState(t, b)
	c4 := filepath.Join(e.root, "ckpt4")
	os.Mkdir(c4, 0o700)
	e.clearLog(t)
	if _, err := b.Checkpoint(ctx, c4, cp); err != nil {
		t.Fatal(err)
	}
	json.Unmarshal(find(e.requests(t), "PUT", "/snapshot/create")[0].Body, &sc)
	if sc.SnapshotType != SnapshotDiff || memDigest(t, filepath.Join(c4, vmm.SnapMemory)) != digestB {
		t.Fatalf("clone checkpoint %+v", sc)
	}

	// Kill A: its sockets go, B runs on.
	killed(t, a)
	if _, err := os.Stat(filepath.Join(specA.Dir, "fc", fcAPISock)); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("API socket left after Kill")
	}
	if err := a.Kill(ctx); err != nil {
		t.Fatalf("second Kill: %v", err)
	}
	if _, err := a.DialAgent(ctx); !errors.Is(err, errdefs.ErrNotRunning) {
		t.Fatalf("DialAgent on a dead VM: %v", err)
	}
	if _, err := a.Checkpoint(ctx, t.TempDir(), cp); !errors.Is(err, errdefs.ErrNotRunning) {
		t.Fatalf("Checkpoint on a dead VM: %v", err)
	}

	// Adopt B from a "restarted server".
	b2 := New(e.b.cfg)
	adopted, err := b2.Adopt(ctx, specB, b.Pid())
	if err != nil {
		t.Fatal(err)
	}
	echo(t, adopted)
	e.clearLog(t)
	c5 := filepath.Join(e.root, "ckpt5")
	os.Mkdir(c5, 0o700)
	if _, err := adopted.Checkpoint(ctx, c5, cp); err != nil {
		t.Fatal(err)
	}
	json.Unmarshal(find(e.requests(t), "PUT", "/snapshot/create")[0].Body, &sc)
	if sc.SnapshotType != SnapshotFull {
		t.Fatalf("first checkpoint after Adopt is %s, want Full", sc.SnapshotType)
	}
	if _, err := b2.Adopt(ctx, specA, a.Pid()); !errors.Is(err, vmm.ErrGone) {
		t.Fatalf("Adopt of a dead VM: %v", err)
	}
	if _, err := b2.Adopt(ctx, specA, os.Getpid()); !errors.Is(err, vmm.ErrGone) {
		t.Fatalf("Adopt of a pid that is not this VM's firecracker: %v", err)
	}
	// Close releases the handle only: the VM keeps running.
	if err := adopted.Close(); err != nil {
		t.Fatal(err)
	}
	if st, _ := fakeState(t, b); st != "Running" {
		t.Fatalf("after Close: %s", st)
	}
	killed(t, b)
	select {
	case <-b.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("the original handle did not see the process exit")
	}
	if err := adopted.Pause(ctx); !errors.Is(err, errdefs.ErrNotRunning) && err == nil {
		t.Fatalf("Pause after the process died: %v", err)
	}
}

// copierFunc adapts a function to vmm.Copier.
type copierFunc func(ctx context.Context, src, dst string) error

func (f copierFunc) CopyFile(ctx context.Context, src, dst string) error { return f(ctx, src, dst) }

func TestCheckpointFailuresAlwaysResume(t *testing.T) {
	e := newFakeEnv(t, Config{})
	ctx := context.Background()
	spec := e.spec(t, "faulty")
	in, err := e.b.Boot(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Kill(context.Background())
	if e.b.Name() != "firecracker" {
		t.Fatal(e.b.Name())
	}
	if err := in.Pause(ctx); err != nil {
		t.Fatal(err)
	}
	if st, _ := fakeState(t, in); st != "Paused" {
		t.Fatalf("after Pause: %s", st)
	}
	if err := in.Resume(ctx); err != nil {
		t.Fatal(err)
	}
	if st, _ := fakeState(t, in); st != "Running" {
		t.Fatalf("after Resume: %s", st)
	}
	cp := &storage.Copier{}
	first := t.TempDir()
	if _, err := in.Checkpoint(ctx, first, cp); err != nil {
		t.Fatal(err)
	}

	// Firecracker refuses the snapshot (disk full while writing memory).
	injectFault(t, in, "PUT", "/snapshot/create", "Cannot create snapshot: No space left on device (os error 28)")
	_, err = in.Checkpoint(ctx, t.TempDir(), cp)
	t.Logf("%v", err)
	if err == nil || !strings.Contains(err.Error(), "No space left") || !errors.Is(err, errdefs.ErrResourceExhausted) {
		t.Fatalf("got %v", err)
	}
	if st, _ := fakeState(t, in); st != "Running" {
		t.Fatalf("VM left %s after a failed snapshot", st)
	}
	if in.(*instance).base != "" {
		t.Fatal("the diff base survived a failed checkpoint")
	}

	// The disk copy fails while paused.
	failDisk := copierFunc(func(ctx context.Context, src, dst string) error {
		if filepath.Base(dst) == vmm.SnapDisk {
			return fmt.Errorf("copying %s: %w", src, syscall.EIO)
		}
		return cp.CopyFile(ctx, src, dst)
	})
	e.clearLog(t)
	_, err = in.Checkpoint(ctx, t.TempDir(), failDisk)
	if !errors.Is(err, syscall.EIO) || !strings.Contains(err.Error(), "copying the disk") {
		t.Fatalf("got %v", err)
	}
	if st, _ := fakeState(t, in); st != "Running" {
		t.Fatalf("VM left %s after a failed disk copy", st)
	}
	if got := sequence(e.requests(t)); strings.Join(got, ",") != "PATCH /vm,PUT /snapshot/create,PATCH /vm" {
		t.Fatalf("sequence %v", got)
	}

	// Pausing fails.
	injectFault(t, in, "PATCH", "/vm", "pause refused")
	if _, err := in.Checkpoint(ctx, t.TempDir(), cp); err == nil || !strings.Contains(err.Error(), "pause refused") {
		t.Fatalf("got %v", err)
	}
	if st, _ := fakeState(t, in); st != "Running" {
		t.Fatalf("VM left %s after a failed pause", st)
	}

	// A cancelled context still resumes.
	cctx, cancel := context.WithCancel(ctx)
	slow := copierFunc(func(c context.Context, src, dst string) error {
		if filepath.Base(dst) == vmm.SnapDisk {
			cancel()
		}
		return cp.CopyFile(c, src, dst)
	})
	if _, err := in.Checkpoint(cctx, t.TempDir(), slow); !errors.Is(err, context.Canceled) {
		t.Fatalf("got %v", err)
	}
	if st, _ := fakeState(t, in); st != "Running" {
		t.Fatalf("VM left %s after a cancelled checkpoint", st)
	}

	// After the failures the next checkpoint is Full and succeeds.
	e.clearLog(t)
	if _, err := in.Checkpoint(ctx, t.TempDir(), cp); err != nil {
		t.Fatal(err)
	}
	var sc SnapshotCreateParams
	json.Unmarshal(find(e.requests(t), "PUT", "/snapshot/create")[0].Body, &sc)
	if sc.SnapshotType != SnapshotFull {
		t.Fatalf("after failures: %s", sc.SnapshotType)
	}
}

// TestCheckpointOntoFullFilesystem checkpoints into a nearly full
// loop-mounted filesystem: a clear error, and the VM keeps running.
func TestCheckpointOntoFullFilesystem(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("skipping: needs root to mount a loop filesystem")
	}
	if _, err := os.Stat("/dev/loop-control"); err != nil {
		t.Skip("skipping: no loop devices")
	}
	e := newFakeEnv(t, Config{})
	ctx := context.Background()
	img, mnt := filepath.Join(t.TempDir(), "full.img"), filepath.Join(t.TempDir(), "mnt")
	if err := storage.SetupReflinkLoop(ctx, img, mnt, storage.MinReflinkImageSize); err != nil {
		t.Skipf("skipping: cannot set up a loop XFS: %v", err)
	}
	t.Cleanup(func() { storage.TeardownReflinkLoop(context.Background(), mnt) })
	var st unix.Statfs_t
	unix.Statfs(mnt, &st)
	f, _ := os.Create(filepath.Join(mnt, "filler"))
	unix.Fallocate(int(f.Fd()), 0, 0, int64(st.Bavail)*st.Bsize-(1<<20))
	f.Close()

	spec := e.spec(t, "fullfs")
	in, err := e.b.Boot(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Kill(context.Background())
	// 32 MiB of guest memory (fake) + a 16 MiB disk do not fit in 1 MiB.
	pages := make([]int64, 0, 2048)
	for p := int64(0); p < 2048; p++ {
		pages = append(pages, p)
	}
	guestWrite(t, in, 1, pages...)
	dir := filepath.Join(mnt, "ckpt")
	os.Mkdir(dir, 0o700)
	_, err = in.Checkpoint(ctx, dir, &storage.Copier{})
	t.Logf("%v", err)
	if !errors.Is(err, errdefs.ErrResourceExhausted) {
		t.Fatalf("got %v, want ErrResourceExhausted", err)
	}
	if s, _ := fakeState(t, in); s != "Running" {
		t.Fatalf("VM left %s", s)
	}
	echo(t, in)
}

func TestRestoreRefusals(t *testing.T) {
	e := newFakeEnv(t, Config{})
	ctx := context.Background()
	spec := e.spec(t, "target")
	dir := t.TempDir()
	for _, f := range []string{vmm.SnapMemory, vmm.SnapState, vmm.SnapDisk} {
		os.WriteFile(filepath.Join(dir, f), []byte("x"), 0o600)
	}

	// No meta.json.
	if _, _, err := e.b.Restore(ctx, spec, dir, &storage.Copier{}); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Fatalf("no meta: %v", err)
	}
	// A QEMU checkpoint.
	writeMeta(dir, vmm.SnapshotMeta{Backend: "qemu", VMMVersion: "7.2.0", VCPUs: 2, MemoryMiB: 32, HasNet: true})
	_, _, err := e.b.Restore(ctx, spec, dir, &storage.Copier{})
	t.Logf("%v", err)
	if !errors.Is(err, ErrWrongBackend) || !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), `"qemu"`) {
		t.Fatalf("qemu snapshot: %v", err)
	}
	// A different spec.
	writeMeta(dir, vmm.SnapshotMeta{Backend: "firecracker", VCPUs: 1, MemoryMiB: 64, HasNet: false})
	_, _, err = e.b.Restore(ctx, spec, dir, &storage.Copier{})
	t.Logf("%v", err)
	if !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), "1 vCPUs, not 2") ||
		!strings.Contains(err.Error(), "64 MiB") || !strings.Contains(err.Error(), "no network interface") {
		t.Fatalf("spec mismatch: %v", err)
	}
	// Nothing was started or copied.
	if _, err := os.Stat(spec.MemFile); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("a refused restore linked memory")
	}
	if _, err := os.Stat(e.log); err == nil {
		if len(e.requests(t)) > 0 {
			t.Fatal("a refused restore started firecracker")
		}
	}
}

func TestBootFailureKillsProcess(t *testing.T) {
	e := newFakeEnv(t, Config{})
	spec := e.spec(t, "nokernel")
	spec.Kernel = filepath.Join(e.root, "missing-vmlinux")
	_, err := e.b.Boot(context.Background(), spec)
	t.Logf("%v", err)
	if err == nil || !strings.Contains(err.Error(), "configuring the boot source") {
		t.Fatalf("got %v", err)
	}
	// The process is gone: its socket is removed and nothing answers.
	c := NewClient(filepath.Join(spec.Dir, "fc", fcAPISock))
	cctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if _, err := c.DescribeInstance(cctx); err == nil {
		t.Fatal("the firecracker of a failed boot still answers")
	}

	// Invalid specs never start a process.
	bad := e.spec(t, "tcg")
	bad.Accel = vmm.AccelTCG
	if _, err := e.b.Boot(context.Background(), bad); !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), "KVM") {
		t.Fatalf("tcg spec: %v", err)
	}
}

func TestCheck(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()

	err := New(Config{Binary: filepath.Join(dir, "firecracker")}).Check(ctx)
	t.Logf("%v", err)
	if !errors.Is(err, errdefs.ErrUnavailable) || !strings.Contains(err.Error(), "no firecracker binary at") {
		t.Fatalf("missing binary: %v", err)
	}
	if strings.Contains(err.Error(), "\n") {
		t.Fatal("Check's message is not one line")
	}

	old := filepath.Join(dir, "old", "firecracker")
	os.MkdirAll(filepath.Dir(old), 0o755)
	os.WriteFile(old, []byte("#!/bin/sh\necho 'Firecracker v1.15.1'\n"), 0o755)
	err = New(Config{Binary: old}).Check(ctx)
	t.Logf("%v", err)
	if err == nil || !strings.Contains(err.Error(), "1.15.1 is too old") {
		t.Fatalf("old version: %v", err)
	}

	good := filepath.Join(dir, "good", "firecracker")
	os.MkdirAll(filepath.Dir(good), 0o755)
	os.WriteFile(good, []byte("#!/bin/sh\necho 'Firecracker v1.16.1'\necho\necho 'Supported snapshot data format versions: 8.0.0'\n"), 0o755)
	if v, err := New(Config{Binary: good}).Version(ctx); err != nil || v != "1.16.1" {
		t.Fatalf("Version: %q %v", v, err)
	}
	err = New(Config{Binary: good, KVMDevice: filepath.Join(dir, "kvm")}).Check(ctx)
	t.Logf("%v", err)
	if err == nil || !strings.Contains(err.Error(), "does not exist: this host has no KVM") {
		t.Fatalf("no KVM: %v", err)
	}
	err = New(Config{Binary: good, JailerMode: JailerAlways}).Check(ctx)
	if err == nil || !strings.Contains(err.Error(), "requires the jailer") {
		t.Fatalf("jailer required: %v", err)
	}
	// The real /dev/kvm, whatever this host has.
	err = New(Config{Binary: good}).Check(ctx)
	t.Logf("Check on this host with a v1.16.1 binary: %v", err)
}

// TestJailedLayoutAgainstFakeJailer runs the jailed path with a FAKE jailer
// (fctest's runJailer: same directory layout and exec, no chroot, no uid
// switch, no cgroups), to check the paths noid gives a jailed Firecracker
// and the files it places in and takes out of the jail.
func TestJailedLayoutAgainstFakeJailer(t *testing.T) {
	exe, _ := os.Executable()
	e := newFakeEnv(t, Config{JailerMode: JailerAlways, Jailer: exe})
	if !strings.Contains(filepath.Base(exe), "firecracker") {
		t.Skipf("the test binary %s is not named like firecracker, as the jailer requires", exe)
	}
	ctx := context.Background()
	cp := &storage.Copier{}
	spec := e.spec(t, "jailed")
	in, err := e.b.Boot(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { in.Kill(context.Background()) })
	l := in.(*instance).lay
	wantRoot := filepath.Join(spec.Dir, "jail", filepath.Base(exe), "jailed-id", "root")
	if !l.Jailed || l.Root != wantRoot {
		t.Fatalf("layout %+v, want root %s", l, wantRoot)
	}
	reqs := e.requests(t)
	e.assertValid(t, reqs)
	var bs BootSource
	json.Unmarshal(find(reqs, "PUT", "/boot-source")[0].Body, &bs)
	if bs.KernelImagePath != fcKernel || bs.InitrdPath != fcInitrd {
		t.Fatalf("jailed boot source %+v", bs)
	}
	if !sameInode(filepath.Join(l.Root, fcDisk), spec.Disk) {
		t.Fatal("the disk is not hard-linked into the jail")
	}
	echo(t, in)

	for i, wantType := range []string{SnapshotFull, SnapshotDiff} {
		guestWrite(t, in, byte(i+1), int64(10+i))
		_, dg := fakeState(t, in)
		dir := filepath.Join(e.root, fmt.Sprintf("jckpt%d", i))
		os.Mkdir(dir, 0o700)
		e.clearLog(t)
		if _, err := in.Checkpoint(ctx, dir, cp); err != nil {
			t.Fatal(err)
		}
		var sc SnapshotCreateParams
		json.Unmarshal(find(e.requests(t), "PUT", "/snapshot/create")[0].Body, &sc)
		if sc.SnapshotType != wantType || !strings.HasPrefix(sc.SnapshotPath, fcStage+"/") || !strings.HasPrefix(sc.MemFilePath, fcStage+"/") {
			t.Fatalf("jailed checkpoint %d: %+v", i, sc)
		}
		if memDigest(t, filepath.Join(dir, vmm.SnapMemory)) != dg {
			t.Fatalf("jailed checkpoint %d: memory differs", i)
		}
		if _, err := os.Stat(filepath.Join(l.Root, fcStage)); !errors.Is(err, os.ErrNotExist) {
			t.Fatal("staging directory left in the jail")
		}
	}

	clone := e.spec(t, "jclone")
	os.Remove(clone.Disk)
	e.clearLog(t)
	c, _, err := e.b.Restore(ctx, clone, filepath.Join(e.root, "jckpt1"), cp)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Kill(context.Background()) })
	var load SnapshotLoadParams
	json.Unmarshal(find(e.requests(t), "PUT", "/snapshot/load")[0].Body, &load)
	if load.SnapshotPath != fcState || load.MemBackend.BackendPath != fcMem {
		t.Fatalf("jailed load %+v", load)
	}
	cl := c.(*instance).lay
	if !sameInode(filepath.Join(cl.Root, fcMem), clone.MemFile) || !sameInode(clone.MemFile, filepath.Join(e.root, "jckpt1", vmm.SnapMemory)) {
		t.Fatal("the jailed clone does not map the checkpoint's memory file")
	}
	if _, err := os.Stat(filepath.Join(cl.Root, fcState)); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("the state file was left in the jail")
	}
	echo(t, c)
	killed(t, in)
	if _, err := os.Stat(l.JailDir); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("Kill left the jail directory")
	}
	if _, err := os.Stat(spec.Disk); err != nil {
		t.Fatal("removing the jail removed the VM's disk")
	}
}
