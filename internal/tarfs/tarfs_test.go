package tarfs

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/noid-vm/noid/internal/tarfs/tarfstest"
)

func TestEntryName(t *testing.T) {
	for in, want := range map[string]string{"a": "a", "a/": "a", "./a/b/": "a/b", "a//b": "a/b", "a/./b": "a/b", ".": "", "./": ""} {
		if got, err := entryName(in); err != nil || got != want {
			t.Errorf("entryName(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "/abs", "..", "../x", "a/../../x", "a/..", "a\x00b"} {
		if _, err := entryName(bad); err == nil || !strings.Contains(err.Error(), "refusing entry") {
			t.Errorf("entryName(%q): %v, want a refusal", bad, err)
		}
	}
}

// makeTree makes a small tree with varied modes, sub-second times, a
// symlink and a fifo.
func makeTree(t *testing.T, dir string) {
	t.Helper()
	mt := time.Date(2022, 3, 4, 5, 6, 7, 123456789, time.UTC)
	for _, d := range []string{dir, filepath.Join(dir, "sub")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	write := func(name string, mode fs.FileMode, body string) {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		os.Chmod(p, mode)
		os.Chtimes(p, mt, mt)
	}
	write("a.txt", 0o640, "hello\n")
	write("sub/run.sh", 0o755, "#!/bin/sh\n")
	if err := os.Symlink("a.txt", filepath.Join(dir, "link")); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mkfifo(filepath.Join(dir, "fifo"), 0o644); err != nil {
		t.Fatal(err)
	}
	os.Chmod(filepath.Join(dir, "sub"), 0o750)
	os.Chtimes(filepath.Join(dir, "sub"), mt, mt)
	os.Chtimes(dir, mt, mt)
}

// headers reads every header of a stream.
func headers(t *testing.T, b []byte) []*tar.Header {
	t.Helper()
	tr := tar.NewReader(bytes.NewReader(b))
	var out []*tar.Header
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, h)
	}
}

// TestWrite: names start with the top name, or are relative without one;
// owners are root unless kept; times keep their nanoseconds; symlinks are
// links; fifos are skipped; progress counts content bytes.
func TestWrite(t *testing.T) {
	src := filepath.Join(t.TempDir(), "src")
	makeTree(t, src)
	if err := os.Chown(filepath.Join(src, "a.txt"), 1234, 5678); err != nil && os.Geteuid() == 0 {
		t.Fatal(err)
	}
	write := func(opts WriteOptions) ([]*tar.Header, int64) {
		var buf bytes.Buffer
		var done int64
		opts.OnBytes = func(n int64) { done = n }
		if err := Write(context.Background(), &buf, src, opts); err != nil {
			t.Fatal(err)
		}
		return headers(t, buf.Bytes()), done
	}
	names := func(hs []*tar.Header) string {
		var out []string
		for _, h := range hs {
			out = append(out, h.Name)
		}
		return strings.Join(out, ",")
	}
	hs, done := write(WriteOptions{})
	if got := names(hs); got != "src/,src/a.txt,src/link,src/sub/,src/sub/run.sh" {
		t.Errorf("names: %s", got)
	}
	if done != 16 {
		t.Errorf("progress %d bytes, want 16", done)
	}
	for _, h := range hs {
		if h.Uid != 0 || h.Gid != 0 || h.Uname != "" || h.Gname != "" || !h.AccessTime.IsZero() {
			t.Errorf("%s: owner %d:%d %q %q, atime %v", h.Name, h.Uid, h.Gid, h.Uname, h.Gname, h.AccessTime)
		}
		switch h.Name {
		case "src/a.txt":
			if h.Mode != 0o640 || h.ModTime.Nanosecond() != 123456789 || h.Size != 6 {
				t.Errorf("a.txt: mode %o mtime %v size %d", h.Mode, h.ModTime, h.Size)
			}
		case "src/link":
			if h.Typeflag != tar.TypeSymlink || h.Linkname != "a.txt" {
				t.Errorf("link: %c %q", h.Typeflag, h.Linkname)
			}
		case "src/sub/":
			if h.Typeflag != tar.TypeDir || h.Mode != 0o750 {
				t.Errorf("sub: %c %o", h.Typeflag, h.Mode)
			}
		}
	}
	if hs, _ := write(WriteOptions{Name: "renamed"}); names(hs) != "renamed/,renamed/a.txt,renamed/link,renamed/sub/,renamed/sub/run.sh" {
		t.Errorf("renamed: %s", names(hs))
	}
	if hs, _ := write(WriteOptions{NoTop: true}); names(hs) != "a.txt,link,sub/,sub/run.sh" {
		t.Errorf("contents: %s", names(hs))
	}
	if os.Geteuid() == 0 {
		hs, _ := write(WriteOptions{KeepOwner: true})
		if h := hs[1]; h.Name != "src/a.txt" || h.Uid != 1234 || h.Gid != 5678 || h.Uname != "" {
			t.Errorf("kept owner: %s %d:%d %q", h.Name, h.Uid, h.Gid, h.Uname)
		}
	}
	// A symlink as the source is stored, not followed.
	var buf bytes.Buffer
	if err := Write(context.Background(), &buf, filepath.Join(src, "link"), WriteOptions{}); err != nil {
		t.Fatal(err)
	}
	if hs := headers(t, buf.Bytes()); len(hs) != 1 || hs[0].Typeflag != tar.TypeSymlink || hs[0].Name != "link" {
		t.Errorf("symlink source: %+v", hs)
	}
	// A canceled context stops the walk.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := Write(ctx, io.Discard, src, WriteOptions{}); !errors.Is(err, context.Canceled) {
		t.Errorf("canceled write: %v", err)
	}
	if err := Write(context.Background(), io.Discard, filepath.Join(src, "missing"), WriteOptions{}); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("missing source: %v", err)
	}
}

// TestRoundTrip: what Write makes, Extract puts back with the same
// content, modes, times and links, on the host's and the guest's options.
func TestRoundTrip(t *testing.T) {
	src := filepath.Join(t.TempDir(), "src")
	makeTree(t, src)
	os.Remove(filepath.Join(src, "fifo"))
	var buf bytes.Buffer
	if err := Write(context.Background(), &buf, src, WriteOptions{}); err != nil {
		t.Fatal(err)
	}
	want := tarfstest.Tree(t, src)
	for name, c := range map[string]struct {
		dst  string
		opts Options
	}{
		"host":  {"copy", Options{Top: "src", Umask: 0o022}},
		"guest": {"", Options{KeepSetID: true, KeepOwner: os.Geteuid() == 0}},
	} {
		t.Run(name, func(t *testing.T) {
			parent := t.TempDir()
			var bytes int64
			c.opts.OnBytes = func(n int64) { bytes = n }
			res, err := Extract(context.Background(), filepath.Join(parent, c.dst), strings.NewReader(buf.String()), c.opts)
			if err != nil {
				t.Fatal(err)
			}
			if res.Entries != 5 || res.Bytes != 16 || bytes != 16 {
				t.Errorf("result %+v, progress %d", res, bytes)
			}
			got := filepath.Join(parent, c.dst)
			if c.dst == "" {
				got = filepath.Join(parent, "src")
			}
			tarfstest.SameTree(t, "copy", want, tarfstest.Tree(t, got))
		})
	}
}

// TestExtractTop: the rules for the destination itself with Options.Top.
func TestExtractTop(t *testing.T) {
	dir := tarfstest.Tar(t, tarfstest.Entry{Name: "app/", Type: tar.TypeDir, Mode: 0o750}, tarfstest.Entry{Name: "app/f", Body: "f"})
	file := tarfstest.Tar(t, tarfstest.Entry{Name: "app", Mode: 0o640, Body: "new"})
	host := Options{Top: "app", Umask: 0o022}
	extract := func(dst string, archive []byte, opts Options) (Result, error) {
		return Extract(context.Background(), dst, bytes.NewReader(archive), opts)
	}
	parent := t.TempDir()
	p := func(name string) string { return filepath.Join(parent, name) }

	// A missing directory is made, with its parents, and gets the mode.
	if _, err := extract(p("a/b/new"), dir, host); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Lstat(p("a/b/new")); err != nil || fi.Mode() != fs.ModeDir|0o750 {
		t.Errorf("new directory: %v %v", fi, err)
	}
	// An existing one gets the mode too, unless it takes the contents.
	os.Mkdir(p("old"), 0o700)
	if _, err := extract(p("old"), dir, host); err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Lstat(p("old")); fi.Mode() != fs.ModeDir|0o750 {
		t.Errorf("existing directory: %v", fi.Mode())
	}
	os.Mkdir(p("contents"), 0o700)
	res, err := extract(p("contents"), dir, Options{Top: "app", Contents: true, Umask: 0o022})
	if err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Lstat(p("contents")); fi.Mode() != fs.ModeDir|0o700 || res.Entries != 1 {
		t.Errorf("contents destination: %v, result %+v", fi.Mode(), res)
	}
	if _, err := extract(p("c2"), file, Options{Top: "app", Contents: true}); err == nil || !strings.Contains(err.Error(), "not a directory, so it has no contents") {
		t.Errorf("contents of a file: %v", err)
	}
	// A directory onto a file fails; onto a symlink replaces the link.
	os.WriteFile(p("file"), []byte("keep"), 0o644)
	if _, err := extract(p("file"), dir, host); err == nil || !strings.Contains(err.Error(), "cannot overwrite non-directory") {
		t.Errorf("directory onto a file: %v", err)
	}
	os.Symlink("file", p("link"))
	if _, err := extract(p("link"), dir, host); err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Lstat(p("link")); !fi.IsDir() {
		t.Errorf("the symlink was not replaced: %v", fi.Mode())
	}
	// A file replaces a file or a link, never writing through it, and
	// fails on a directory.
	if _, err := extract(p("link2"), file, host); err != nil {
		t.Fatal(err)
	}
	os.Symlink("file", p("link3"))
	if _, err := extract(p("link3"), file, host); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(p("file")); string(b) != "keep" {
		t.Errorf("written through a symlink: %q", b)
	}
	if fi, _ := os.Lstat(p("link3")); !fi.Mode().IsRegular() || fi.Mode().Perm() != 0o640 {
		t.Errorf("file over a link: %v", fi.Mode())
	}
	if _, err := extract(p("old"), file, host); err == nil || !strings.Contains(err.Error(), "a directory is in the way") {
		t.Errorf("file onto a directory: %v", err)
	}
	// The first entry must be the top; nothing, or only a fifo, is empty.
	other := tarfstest.Tar(t, tarfstest.Entry{Name: "other/", Type: tar.TypeDir})
	if _, err := extract(p("x"), other, host); err == nil || !strings.Contains(err.Error(), `must start with "app"`) {
		t.Errorf("other top: %v", err)
	}
	if _, err := extract(p("x"), tarfstest.Tar(t), host); !errors.Is(err, ErrEmpty) {
		t.Errorf("empty: %v", err)
	}
	if _, err := extract(p("x"), tarfstest.Tar(t, tarfstest.Entry{Name: "app", Type: tar.TypeFifo}), host); !errors.Is(err, ErrEmpty) {
		t.Errorf("only a fifo: %v", err)
	}
	if _, err := os.Lstat(p("x")); err == nil {
		t.Error("a refused copy made its destination")
	}
	if _, err := extract(p("y"), dir, Options{Top: "a/b"}); err == nil {
		t.Error("a top name with a slash was accepted")
	}
	for _, bad := range []string{"", ".", "/", "a/.."} {
		if _, err := extract(bad, dir, host); err == nil || !strings.Contains(err.Error(), "bad destination") {
			t.Errorf("destination %q: %v", bad, err)
		}
	}
}

// TestExtractCanceled: a done context stops the extraction.
func TestExtractCanceled(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := Extract(ctx, t.TempDir(), bytes.NewReader(tarfstest.Tar(t, tarfstest.Entry{Name: "f", Body: "x"})), Options{})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("canceled extract: %v", err)
	}
}

// TestExtractConfined runs the fuzz target's checks on the hostile
// archives of tarfstest, each of which must be refused on every option
// set.
func TestExtractConfined(t *testing.T) {
	probe := t.TempDir()
	for _, c := range tarfstest.Escapes(t, "app", filepath.Join(probe, "outside"), filepath.Join(probe, "sentinel")) {
		t.Run(c.Name, func(t *testing.T) {
			for _, set := range optionSets {
				if err := confined(t, c.Tar, set); err == nil {
					t.Errorf("%s: extracted", set.name)
				}
			}
		})
	}
}
