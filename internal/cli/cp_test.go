package cli

import (
	"archive/tar"
	"bytes"
	"crypto/rand"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/creack/pty"
)

var (
	t1 = time.Date(2020, 1, 2, 3, 4, 5, 0, time.UTC)
	t2 = time.Date(2021, 6, 7, 8, 9, 10, 0, time.UTC)
	t3 = time.Date(2022, 3, 4, 5, 6, 7, 123456789, time.UTC) // sub-second
)

// makeTree creates a small tree with varied modes, mtimes and links.
func makeTree(t *testing.T, dir string) map[string][]byte {
	t.Helper()
	big := make([]byte, 3<<20)
	rand.Read(big)
	files := map[string][]byte{"a.txt": []byte("hello\n"), "run.sh": []byte("#!/bin/sh\necho hi\n"), "sub/big.bin": big, "sub/deeper/n.txt": []byte("nested")}
	mk := func(p string, mode os.FileMode, body []byte, mt time.Time) {
		full := filepath.Join(dir, p)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(full, body, 0o600); err != nil {
			t.Fatal(err)
		}
		os.Chmod(full, mode)
		os.Chtimes(full, mt, mt)
	}
	mk("a.txt", 0o640, files["a.txt"], t2)
	mk("run.sh", 0o755, files["run.sh"], t3)
	mk("sub/big.bin", 0o600, files["sub/big.bin"], t1)
	mk("sub/deeper/n.txt", 0o444, files["sub/deeper/n.txt"], t2)
	os.MkdirAll(filepath.Join(dir, "empty"), 0o755)
	os.Symlink("a.txt", filepath.Join(dir, "link"))
	os.Symlink("/etc/passwd", filepath.Join(dir, "abs"))
	os.Chmod(filepath.Join(dir, "sub/deeper"), 0o555) // read-only dir with a file in it
	os.Chmod(filepath.Join(dir, "sub"), 0o700)
	os.Chmod(dir, 0o750)
	for _, d := range []string{"sub/deeper", "sub", "empty", "."} {
		os.Chtimes(filepath.Join(dir, d), t1, t1)
	}
	t.Cleanup(func() {
		filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error { os.Chmod(p, 0o755); return nil })
	})
	return files
}

type node struct {
	mode  fs.FileMode
	mtime time.Time
	body  string
	link  string
}

// snapshot describes every entry below dir (names relative to it).
func snapshot(t *testing.T, dir string) map[string]node {
	t.Helper()
	out := map[string]node{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		fi, err := os.Lstat(p)
		if err != nil {
			return err
		}
		n := node{mode: fi.Mode(), mtime: fi.ModTime().UTC()}
		switch {
		case fi.Mode()&fs.ModeSymlink != 0:
			n.link, _ = os.Readlink(p)
			n.mtime = time.Time{}
		case fi.Mode().IsRegular():
			b, _ := os.ReadFile(p)
			n.body = string(b)
		}
		out[rel] = n
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// sameTree compares two snapshots; seconds only compares mtimes to the
// second (the agent's tar writer keeps whole seconds).
func sameTree(t *testing.T, what string, want, got map[string]node) {
	t.Helper()
	var names []string
	for n := range want {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		w, g := want[n], got[n]
		if _, ok := got[n]; !ok {
			t.Errorf("%s: %s missing", what, n)
			continue
		}
		if w.mode != g.mode || !w.mtime.Equal(g.mtime) || w.body != g.body || w.link != g.link {
			t.Errorf("%s: %s differs: want mode %v mtime %v link %q (%d bytes), got mode %v mtime %v link %q (%d bytes)",
				what, n, w.mode, w.mtime, w.link, len(w.body), g.mode, g.mtime, g.link, len(g.body))
		}
	}
	for n := range got {
		if _, ok := want[n]; !ok {
			t.Errorf("%s: unexpected %s", what, n)
		}
	}
}

// TestCpRoundTrip copies a tree into a (fake) VM served by a real agent and
// back, checking content, modes, mtimes and links byte for byte, and the
// naming rules (into a directory, to a new name, contents with /.).
func TestCpRoundTrip(t *testing.T) {
	f := newFakeServer(t, "dev")
	r := f.runner(t)
	local := t.TempDir()
	src := filepath.Join(local, "proj")
	makeTree(t, src)
	want := snapshot(t, src)

	ok := func(args ...string) cliResult {
		t.Helper()
		res := r.run(args...)
		if res.code != 0 {
			t.Fatalf("noid %s: exit %d\nstderr: %s", strings.Join(args, " "), res.code, res.stderr)
		}
		if res.stdout != "" || res.stderr != "" {
			t.Errorf("noid %s printed something while not on a terminal: %q %q", strings.Join(args, " "), res.stdout, res.stderr)
		}
		return res
	}
	// Host to VM, into an existing directory (trailing slash).
	ok("cp", src, "dev:/root/")
	sameTree(t, "host->vm", want, snapshot(t, f.guestPath("/root/proj")))

	// VM to host, into an existing directory.
	out := filepath.Join(local, "out")
	os.Mkdir(out, 0o755)
	ok("cp", "dev:/root/proj", out)
	sameTree(t, "vm->host", want, snapshot(t, filepath.Join(out, "proj")))

	// VM to host under a new name, and a single file.
	ok("cp", "dev:/root/proj", filepath.Join(local, "renamed"))
	sameTree(t, "vm->host renamed", want, snapshot(t, filepath.Join(local, "renamed")))
	ok("cp", "dev:/root/proj/run.sh", filepath.Join(local, "single.sh"))
	if fi, err := os.Stat(filepath.Join(local, "single.sh")); err != nil || fi.Mode().Perm() != 0o755 || !fi.ModTime().Equal(t3) {
		t.Errorf("single file: %v %v", fi, err)
	}
	// Into a directory that does not exist yet (trailing slash).
	ok("cp", "dev:/root/proj/a.txt", filepath.Join(local, "newdir")+"/")
	if b, err := os.ReadFile(filepath.Join(local, "newdir", "a.txt")); err != nil || string(b) != "hello\n" {
		t.Errorf("into a new dir: %q %v", b, err)
	}

	// Host to VM under a new name; a file onto an existing directory lands in it.
	ok("cp", filepath.Join(src, "a.txt"), "dev:/root/copy.txt")
	if b, err := os.ReadFile(f.guestPath("/root/copy.txt")); err != nil || string(b) != "hello\n" {
		t.Errorf("renamed upload: %q %v", b, err)
	}
	ok("cp", filepath.Join(src, "a.txt"), "dev:/root/proj/sub")
	if _, err := os.Stat(f.guestPath("/root/proj/sub/a.txt")); err != nil {
		t.Errorf("file into an existing dir: %v", err)
	}
	// A directory onto a file is refused.
	if res := r.run("cp", src, "dev:/root/copy.txt"); res.code != 1 || !strings.Contains(res.stderr, "cannot overwrite non-directory") {
		t.Errorf("dir onto a file: %+v", res)
	}
	// Contents with /. in both directions.
	ok("cp", src+"/.", "dev:/srv/www")
	if _, err := os.Stat(f.guestPath("/srv/www/a.txt")); err != nil {
		t.Errorf("contents upload: %v", err)
	}
	if _, err := os.Stat(f.guestPath("/srv/www/proj")); err == nil {
		t.Error("contents upload created proj/")
	}
	ok("cp", "dev:/root/proj/sub/.", filepath.Join(local, "subcopy"))
	if b, err := os.ReadFile(filepath.Join(local, "subcopy", "deeper", "n.txt")); err != nil || string(b) != "nested" {
		t.Errorf("contents download: %q %v", b, err)
	}

	// Tar on stdout and stdin.
	res := ok2(t, r, "cp", "dev:/root/proj/sub/deeper", "-")
	names := tarNames(t, res.stdout)
	if strings.Join(names, ",") != "deeper/,deeper/n.txt" {
		t.Errorf("tar to stdout: %v", names)
	}
	r2 := r.in(r.cwd)
	r2.stdin = strings.NewReader(res.stdout)
	if res := r2.run("cp", "-", "dev:/opt/x"); res.code != 0 {
		t.Fatalf("tar from stdin: %+v", res)
	}
	if b, err := os.ReadFile(f.guestPath("/opt/x/deeper/n.txt")); err != nil || string(b) != "nested" {
		t.Errorf("tar from stdin: %q %v", b, err)
	}

	// Missing paths.
	if res := r.run("cp", "dev:/root/nope", local); res.code != 1 || !strings.Contains(res.stderr, "no such file") {
		t.Errorf("missing source in the VM: %+v", res)
	}
	if res := r.run("cp", filepath.Join(local, "nope"), "dev:/root/"); res.code != 1 || !strings.Contains(res.stderr, "no such file") {
		t.Errorf("missing local source: %+v", res)
	}
	if res := r.run("cp", src, "nope:/root/"); res.code != 1 || !strings.Contains(res.stderr, "not found") {
		t.Errorf("missing VM: %+v", res)
	}
}

func ok2(t *testing.T, r *cliRunner, args ...string) cliResult {
	t.Helper()
	res := r.run(args...)
	if res.code != 0 {
		t.Fatalf("noid %s: %+v", strings.Join(args, " "), res)
	}
	return res
}

func tarNames(t *testing.T, s string) []string {
	t.Helper()
	tr := tar.NewReader(strings.NewReader(s))
	var names []string
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, h.Name)
	}
	sort.Strings(names)
	return names
}

type tent struct {
	name, link string
	typ        byte
	mode       int64
	body       string
}

func mkTar(t *testing.T, ents ...tent) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range ents {
		h := &tar.Header{Name: e.name, Linkname: e.link, Typeflag: e.typ, Mode: e.mode, ModTime: t1}
		if e.typ == tar.TypeReg {
			h.Size = int64(len(e.body))
		}
		if h.Mode == 0 {
			h.Mode = 0o644
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		io.WriteString(tw, e.body)
	}
	tw.Close()
	return buf.Bytes()
}

// TestCpRefusesEscapes: on both receiving sides, entries that would land
// outside the destination are refused and nothing is written outside.
func TestCpRefusesEscapes(t *testing.T) {
	f := newFakeServer(t, "dev")
	r := f.runner(t)

	// Host to VM: the agent refuses.
	guestOutside := f.guestPath("/root/outside")
	os.MkdirAll(guestOutside, 0o755)
	for name, tr := range map[string][]byte{
		"dotdot":  mkTar(t, tent{name: "../outside/pwned", typ: tar.TypeReg, body: "x"}),
		"symlink": mkTar(t, tent{name: "esc", typ: tar.TypeSymlink, link: "/root/outside"}, tent{name: "esc/pwned", typ: tar.TypeReg, body: "x"}),
	} {
		r2 := r.in(r.cwd)
		r2.stdin = bytes.NewReader(tr)
		res := r2.run("cp", "-", "dev:/root/dst-"+name)
		if res.code != 1 || !strings.Contains(res.stderr, "refusing entry") && !strings.Contains(res.stderr, "escapes") {
			t.Errorf("host->vm %s: %+v", name, res)
		}
		if ents, _ := os.ReadDir(guestOutside); len(ents) != 0 {
			t.Errorf("host->vm %s wrote outside: %v", name, ents)
		}
	}

	// VM to host: the CLI refuses what a (malicious) VM sends.
	local := t.TempDir()
	outside := filepath.Join(local, "outside")
	os.Mkdir(outside, 0o755)
	os.WriteFile(filepath.Join(outside, "target"), []byte("keep"), 0o644)
	dst := filepath.Join(local, "dst")
	os.Mkdir(dst, 0o755)
	cases := map[string][]byte{
		"dotdot":        mkTar(t, tent{name: "x/", typ: tar.TypeDir, mode: 0o755}, tent{name: "x/../../outside/pwned", typ: tar.TypeReg, body: "x"}),
		"absolute":      mkTar(t, tent{name: outside + "/pwned", typ: tar.TypeReg, body: "x"}),
		"symlink":       mkTar(t, tent{name: "x/", typ: tar.TypeDir, mode: 0o755}, tent{name: "x/esc", typ: tar.TypeSymlink, link: outside}, tent{name: "x/esc/pwned", typ: tar.TypeReg, body: "x"}),
		"rel symlink":   mkTar(t, tent{name: "x/", typ: tar.TypeDir, mode: 0o755}, tent{name: "x/esc", typ: tar.TypeSymlink, link: "../../outside"}, tent{name: "x/esc/pwned", typ: tar.TypeReg, body: "x"}),
		"hard link out": mkTar(t, tent{name: "x/", typ: tar.TypeDir, mode: 0o755}, tent{name: "x/h", typ: tar.TypeLink, link: "../outside/target"}),
		"other top":     mkTar(t, tent{name: "x/", typ: tar.TypeDir, mode: 0o755}, tent{name: "y/pwned", typ: tar.TypeReg, body: "x"}),
	}
	for name, tr := range cases {
		f.getOverride = tr
		res := r.run("cp", "dev:/x", dst)
		if res.code != 1 || !strings.Contains(res.stderr, "refusing") && !strings.Contains(res.stderr, "escapes") {
			t.Errorf("vm->host %s: exit %d stderr %q", name, res.code, res.stderr)
		}
		if ents, _ := os.ReadDir(outside); len(ents) != 1 {
			t.Errorf("vm->host %s wrote outside: %v", name, ents)
		}
		os.RemoveAll(filepath.Join(dst, "x"))
		os.RemoveAll(filepath.Join(dst, "y"))
	}
	if b, _ := os.ReadFile(filepath.Join(outside, "target")); string(b) != "keep" {
		t.Errorf("target changed: %q", b)
	}

	// A symlink already on the host is replaced, never written through.
	os.Symlink(outside, filepath.Join(dst, "x"))
	f.getOverride = mkTar(t, tent{name: "x/", typ: tar.TypeDir, mode: 0o755}, tent{name: "x/f", typ: tar.TypeReg, body: "new"})
	if res := r.run("cp", "dev:/x", dst); res.code != 0 {
		t.Errorf("over a local symlink: %+v", res)
	}
	if fi, err := os.Lstat(filepath.Join(dst, "x")); err != nil || !fi.IsDir() {
		t.Errorf("x should now be a real directory: %v %v", fi, err)
	}
	if ents, _ := os.ReadDir(outside); len(ents) != 1 {
		t.Errorf("wrote through the local symlink: %v", ents)
	}
	// No setuid or setgid bits from a VM.
	f.getOverride = mkTar(t, tent{name: "suid", typ: tar.TypeReg, mode: 0o6755, body: "#!"})
	if res := r.run("cp", "dev:/suid", dst); res.code != 0 {
		t.Fatalf("suid: %+v", res)
	}
	if fi, err := os.Stat(filepath.Join(dst, "suid")); err != nil || fi.Mode() != 0o755 {
		t.Errorf("suid file mode %v %v, want 0755 without set-id bits", fi.Mode(), err)
	}
}

// TestCpProgress: progress and a summary on a terminal, nothing when piped
// or with --quiet.
func TestCpProgress(t *testing.T) {
	f := newFakeServer(t, "dev")
	r := f.runner(t)
	src := filepath.Join(t.TempDir(), "big.bin")
	b := make([]byte, 8<<20)
	rand.Read(b)
	os.WriteFile(src, b, 0o644)

	ptmx, tty, err := pty.Open()
	if err != nil {
		t.Skipf("no pty: %v", err)
	}
	defer ptmx.Close()
	var mu sync.Mutex
	var seen bytes.Buffer
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 4096)
		for {
			n, err := ptmx.Read(buf)
			mu.Lock()
			seen.Write(buf[:n])
			mu.Unlock()
			if err != nil {
				return
			}
		}
	}()
	rt := r.in(r.cwd)
	rt.stderr = tty
	res := rt.run("cp", src, "dev:/root/")
	if res.code != 0 {
		t.Fatalf("cp on a tty: %+v", res)
	}
	res = rt.run("cp", "dev:/root/big.bin", filepath.Join(t.TempDir(), "back.bin"))
	if res.code != 0 {
		t.Fatalf("cp back on a tty: %+v", res)
	}
	res = rt.run("cp", "-q", src, "dev:/root/quiet.bin")
	if res.code != 0 {
		t.Fatalf("cp -q on a tty: %+v", res)
	}
	tty.Close()
	<-done
	mu.Lock()
	out := seen.String()
	mu.Unlock()
	for _, want := range []string{"copying to dev:/root/: ", "of 8.0 MiB", "copied " + src + " to dev:/root/big.bin: 1 entries, 8.0 MiB", "copying dev:/root/big.bin: ", "copied dev:/root/big.bin to "} {
		if !strings.Contains(out, want) {
			t.Errorf("terminal output lacks %q:\n%q", want, out)
		}
	}
	if strings.Contains(out, "quiet.bin") {
		t.Errorf("-q printed on the terminal: %q", out)
	}
	// Piped: silent.
	res = r.run("cp", src, "dev:/root/piped.bin")
	if res.code != 0 || res.stdout != "" || res.stderr != "" {
		t.Errorf("piped cp printed: %+v", res)
	}
}

// TestSpinnerOnTTY: a long request shows "checkpointing dev… Ns" on a
// terminal, clears it when done, and shows nothing when piped.
func TestSpinnerOnTTY(t *testing.T) {
	f := newFakeServer(t, "dev")
	r := f.runner(t)
	ptmx, tty, err := pty.Open()
	if err != nil {
		t.Skipf("no pty: %v", err)
	}
	defer ptmx.Close()
	f.hold = make(chan struct{})
	seen := make(chan string, 64)
	go func() {
		buf := make([]byte, 1024)
		var all strings.Builder
		for {
			n, err := ptmx.Read(buf)
			all.Write(buf[:n])
			seen <- all.String()
			if err != nil {
				close(seen)
				return
			}
		}
	}()
	rt := r.in(r.cwd)
	rt.stderr = tty
	resc := make(chan cliResult, 1)
	go func() { resc <- rt.run("checkpoint", "dev", "snap") }()
	// The request is held until the spinner has been seen.
	var out string
	for s := range seen {
		if strings.Contains(s, "checkpointing dev… ") {
			out = s
			break
		}
	}
	if out == "" {
		t.Fatal("no spinner on the terminal")
	}
	close(f.hold)
	res := <-resc
	if res.code != 0 || !strings.Contains(res.stdout, "checkpoint snap") {
		t.Fatalf("checkpoint: %+v", res)
	}
	tty.Close()
	for s := range seen {
		out = s
	}
	if !strings.HasSuffix(out, "\r\033[K") {
		t.Errorf("the spinner line was not cleared: %q", out)
	}
	// Piped: nothing on stderr.
	f.hold = nil
	if res := r.run("checkpoint", "dev", "snap2"); res.code != 0 || res.stderr != "" {
		t.Errorf("piped checkpoint: %+v", res)
	}
}

// TestParseCpArgUserVM: an admin's USER/VM:PATH is a VM side; a relative
// local path with a slash before a colon-free rest stays local.
func TestParseCpArgUserVM(t *testing.T) {
	if a := parseCpArg("alice/dev:/root/x"); !a.remote || a.vm != "alice/dev" || a.path != "/root/x" {
		t.Errorf("alice/dev:/root/x: %+v", a)
	}
	if a := parseCpArg("dir/file.txt"); a.remote {
		t.Errorf("dir/file.txt: %+v", a)
	}
	if a := parseCpArg("a/b/c:/x"); a.remote {
		t.Errorf("a/b/c:/x is a local path: %+v", a)
	}
}
