package client

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io/fs"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/noid-vm/noid/internal/api"
	"github.com/noid-vm/noid/internal/tarfs/tarfstest"
)

// vmServing returns a client of a server whose VM "vm" answers every file
// download with archive, whatever path is asked for: a VM under an
// attacker's control.
func vmServing(t *testing.T, archive []byte) *Client {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != "GET" || r.URL.Path != "/v1/vms/vm/files" {
			http.NotFound(w, r)
			return
		}
		if r.URL.Query().Get("stat") == "true" {
			hdr, err := tar.NewReader(bytes.NewReader(archive)).Next()
			if err != nil {
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
			fi := api.FileInfo{Path: r.URL.Query().Get("path"), Type: api.FileTypeFile, Size: hdr.Size, ModTime: hdr.ModTime}
			if hdr.Typeflag == tar.TypeDir {
				fi.Type, fi.Size = api.FileTypeDir, 0
			}
			w.Header().Set("Content-Type", "application/json")
			_ = json.NewEncoder(w).Encode(fi)
			return
		}
		w.Header().Set("Content-Type", "application/x-tar")
		_, _ = w.Write(archive)
	}))
	t.Cleanup(srv.Close)
	c, err := New(srv.URL, "")
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// hostLayout is a parent directory with a sentinel file and a directory
// "outside" next to where a copy lands.
type hostLayout struct {
	parent, sentinel, outside string
}

func newHostLayout(t *testing.T) hostLayout {
	t.Helper()
	l := hostLayout{parent: t.TempDir()}
	l.sentinel, l.outside = tarfstest.Surround(t, l.parent)
	return l
}

// place returns the cp argument dst in l and where the copy of "app" lands:
// dst itself, or dst/app when into makes dst an existing directory.
func (l hostLayout) place(t *testing.T, name string, into bool) (dst, dest string) {
	t.Helper()
	dst = filepath.Join(l.parent, name)
	if !into {
		return dst, dst
	}
	if err := os.Mkdir(dst, 0o755); err != nil {
		t.Fatal(err)
	}
	return dst, filepath.Join(dst, "app")
}

// withUmask runs the rest of the test with the process umask set to m.
func withUmask(t *testing.T, m int) {
	old := syscall.Umask(m)
	t.Cleanup(func() { syscall.Umask(old) })
}

// TestCopyFromVMRefusesEscapes: what a VM sends never lands outside the
// copy's own place (the destination, or dst/<name> for a copy into an
// existing directory), whether the destination exists or not. This is the
// reported attack (`noid cp vm:/app ~/app-copy` with app/s -> .. and
// app/s/.bashrc) and its relatives.
func TestCopyFromVMRefusesEscapes(t *testing.T) {
	withUmask(t, 0o022)
	for _, into := range []bool{false, true} {
		probe := newHostLayout(t)
		for _, c := range tarfstest.Escapes(t, "app", probe.outside, probe.sentinel) {
			t.Run(map[bool]string{false: "destination missing/", true: "into an existing directory/"}[into]+c.Name, func(t *testing.T) {
				// The same layout in a fresh directory for each case; the
				// archive's absolute paths point into probe's, which is
				// checked too.
				l := newHostLayout(t)
				dst, dest := l.place(t, "app-copy", into)
				before, probeBefore := tarfstest.Tree(t, l.parent, dest), tarfstest.Tree(t, probe.parent)
				cl := vmServing(t, c.Tar)
				_, err := cl.CopyFromVM(context.Background(), "vm", "/app", dst, nil)
				if err == nil {
					t.Errorf("the copy succeeded")
				} else if !strings.Contains(err.Error(), "refusing") && !strings.Contains(err.Error(), "escapes") {
					t.Errorf("error %q says neither refusing nor escapes", err)
				}
				tarfstest.SameTree(t, "next to the destination", before, tarfstest.Tree(t, l.parent, dest))
				tarfstest.SameTree(t, "in the probe directory", probeBefore, tarfstest.Tree(t, probe.parent))
			})
		}
	}
}

// TestCopyFromVMPreexistingSymlinks: symlinks already in the destination
// are followed only where they stay inside it; one at the destination
// itself is replaced, not followed.
func TestCopyFromVMPreexistingSymlinks(t *testing.T) {
	withUmask(t, 0o022)
	d := tarfstest.Entry{Name: "app/", Type: tar.TypeDir}
	cases := []struct {
		name    string
		links   map[string]string // below dst/app, made before the copy
		entries []tarfstest.Entry
		ok      bool
	}{
		{"link to the destination's parent", map[string]string{"up": ".."}, []tarfstest.Entry{d, {Name: "app/up/pwned", Body: "x"}}, false},
		{"absolute link out", map[string]string{"abs": "OUTSIDE"}, []tarfstest.Entry{d, {Name: "app/abs/pwned", Body: "x"}}, false},
		{"hard link to a link out, then through it", map[string]string{"ln": "OUTSIDE"},
			[]tarfstest.Entry{d, {Name: "app/h", Type: tar.TypeLink, Link: "app/ln"}, {Name: "app/h/pwned", Body: "x"}}, false},
		{"hard link through a link out", map[string]string{"ln": "OUTSIDE"},
			[]tarfstest.Entry{d, {Name: "app/h", Type: tar.TypeLink, Link: "app/ln/target"}}, false},
		{"file over a link out", map[string]string{"f": "OUTSIDE/target"}, []tarfstest.Entry{d, {Name: "app/f", Body: "new"}}, true},
		{"link that stays inside", map[string]string{"in": "sub"}, []tarfstest.Entry{d, {Name: "app/in/ok", Body: "x"}}, true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			l := newHostLayout(t)
			dst := filepath.Join(l.parent, "dst")
			dest := filepath.Join(dst, "app")
			if err := os.MkdirAll(filepath.Join(dest, "sub"), 0o755); err != nil {
				t.Fatal(err)
			}
			for name, target := range c.links {
				if err := os.Symlink(strings.ReplaceAll(target, "OUTSIDE", l.outside), filepath.Join(dest, name)); err != nil {
					t.Fatal(err)
				}
			}
			before := tarfstest.Tree(t, l.parent, dest)
			_, err := vmServing(t, tarfstest.Tar(t, c.entries...)).CopyFromVM(context.Background(), "vm", "/app", dst, nil)
			if c.ok && err != nil {
				t.Errorf("copy: %v", err)
			}
			if !c.ok && err == nil {
				t.Errorf("the copy succeeded")
			}
			tarfstest.SameTree(t, "next to the destination", before, tarfstest.Tree(t, l.parent, dest))
		})
	}

	// A symlink where the copy lands is replaced by the copy, file or
	// directory; its target stays as it was.
	for _, src := range []struct {
		name    string
		entries []tarfstest.Entry
	}{
		{"directory", []tarfstest.Entry{d, {Name: "app/f", Body: "new"}}},
		{"file", []tarfstest.Entry{{Name: "app", Body: "new"}}},
	} {
		for _, target := range []string{"outside", "sentinel", "missing"} {
			t.Run(src.name+" over a link to "+target, func(t *testing.T) {
				l := newHostLayout(t)
				dst := filepath.Join(l.parent, "dst")
				os.Mkdir(dst, 0o755)
				if err := os.Symlink(filepath.Join(l.parent, target), filepath.Join(dst, "app")); err != nil {
					t.Fatal(err)
				}
				before := tarfstest.Tree(t, l.parent, filepath.Join(dst, "app"))
				res, err := vmServing(t, tarfstest.Tar(t, src.entries...)).CopyFromVM(context.Background(), "vm", "/app", dst, nil)
				if err != nil {
					t.Fatal(err)
				}
				if res.Dest != filepath.Join(dst, "app") {
					t.Errorf("Dest %q", res.Dest)
				}
				if fi, err := os.Lstat(res.Dest); err != nil || fi.Mode()&fs.ModeSymlink != 0 {
					t.Errorf("the link is still there: %v %v", fi, err)
				}
				tarfstest.SameTree(t, "next to the destination", before, tarfstest.Tree(t, l.parent, res.Dest))
			})
		}
	}
}

// TestCopyFromVMSingleFile: when the VM's source is a file, that one file
// is all that may be written, at the destination's name.
func TestCopyFromVMSingleFile(t *testing.T) {
	withUmask(t, 0o022)
	first := tarfstest.Entry{Name: "app", Body: "one\n"}
	for name, extra := range map[string]tarfstest.Entry{
		"the same name again":     {Name: "app", Body: "two\n"},
		"the same name as a dir":  {Name: "app/", Type: tar.TypeDir},
		"the same name as a link": {Name: "app", Type: tar.TypeSymlink, Link: ".."},
		"a file below it":         {Name: "app/x", Body: "x"},
		"another top":             {Name: "other", Body: "x"},
		"a hard link to it":       {Name: "app2", Type: tar.TypeLink, Link: "app"},
	} {
		for _, into := range []bool{false, true} {
			t.Run(name+map[bool]string{false: "", true: " into a dir"}[into], func(t *testing.T) {
				l := newHostLayout(t)
				dst, dest := l.place(t, "copy", into)
				before := tarfstest.Tree(t, l.parent, dest)
				_, err := vmServing(t, tarfstest.Tar(t, first, extra)).CopyFromVM(context.Background(), "vm", "/app", dst, nil)
				if err == nil || !strings.Contains(err.Error(), "refusing") {
					t.Errorf("copy: %v, want a refusal", err)
				}
				if b, err := os.ReadFile(dest); err != nil || string(b) != "one\n" {
					t.Errorf("the copied file: %q %v", b, err)
				}
				tarfstest.SameTree(t, "next to the destination", before, tarfstest.Tree(t, l.parent, dest))
			})
		}
	}
}

// TestCopyFromVMModes: on the host, modes from a VM never exceed what the
// umask allows, for entries and for the directories made for them; no
// setuid or setgid bit survives; a read-only directory still receives its
// files.
func TestCopyFromVMModes(t *testing.T) {
	archive := tarfstest.Tar(t,
		tarfstest.Entry{Name: "app/", Type: tar.TypeDir, Mode: 0o777},
		tarfstest.Entry{Name: "app/sub/", Type: tar.TypeDir, Mode: 0o777},
		tarfstest.Entry{Name: "app/sub/f", Mode: 0o666, Body: "f"},
		tarfstest.Entry{Name: "app/suid", Mode: 0o6777, Body: "#!"},
		tarfstest.Entry{Name: "app/sgid/", Type: tar.TypeDir, Mode: 0o2777},
		tarfstest.Entry{Name: "app/tmp/", Type: tar.TypeDir, Mode: 0o1777},
		tarfstest.Entry{Name: "app/ro/", Type: tar.TypeDir, Mode: 0o555},
		tarfstest.Entry{Name: "app/ro/f", Mode: 0o444, Body: "r"},
		tarfstest.Entry{Name: "app/x/y/f", Mode: 0o600, Body: "deep"}, // x and x/y are not in the archive
	)
	for _, c := range []struct {
		umask int
		want  map[string]fs.FileMode
	}{
		{0o022, map[string]fs.FileMode{"": 0o755, "sub": 0o755, "sub/f": 0o644, "suid": 0o755, "sgid": 0o755, "tmp": fs.ModeSticky | 0o755,
			"ro": 0o555, "ro/f": 0o444, "x": 0o755, "x/y": 0o755, "x/y/f": 0o600}},
		{0o077, map[string]fs.FileMode{"": 0o700, "sub": 0o700, "sub/f": 0o600, "suid": 0o700, "sgid": 0o700, "tmp": fs.ModeSticky | 0o700,
			"ro": 0o500, "ro/f": 0o400, "x": 0o700, "x/y": 0o700, "x/y/f": 0o600}},
	} {
		for _, into := range []bool{false, true} {
			t.Run(fmt.Sprintf("into=%v umask=%03o", into, c.umask), func(t *testing.T) {
				withUmask(t, c.umask)
				l := newHostLayout(t)
				dst, dest := l.place(t, "copy", into)
				t.Cleanup(func() { os.Chmod(filepath.Join(dest, "ro"), 0o755) })
				res, err := vmServing(t, archive).CopyFromVM(context.Background(), "vm", "/app", dst, nil)
				if err != nil {
					t.Fatal(err)
				}
				if res.Dest != dest || res.Entries != 9 || res.Bytes != 8 {
					t.Errorf("result %+v", res)
				}
				for name, want := range c.want {
					fi, err := os.Lstat(filepath.Join(dest, name))
					if err != nil {
						t.Errorf("%s: %v", name, err)
						continue
					}
					if got := fi.Mode() &^ fs.ModeDir; got != want {
						t.Errorf("%q: mode %v, want %v", name, got, want)
					}
				}
			})
		}
	}
	// A single file: the same rules.
	withUmask(t, 0o027)
	l := newHostLayout(t)
	dst := filepath.Join(l.parent, "f")
	if _, err := vmServing(t, tarfstest.Tar(t, tarfstest.Entry{Name: "f", Mode: 0o4777, Body: "x"})).CopyFromVM(context.Background(), "vm", "/f", dst, nil); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(dst); err != nil || fi.Mode() != 0o750 {
		t.Errorf("single file mode %v %v, want 0750", fi.Mode(), err)
	}
}

// TestCopyFromVMHugeAndSparse: an entry whose header claims far more than
// the stream holds fails cleanly without a partial file, and a sparse file
// (a few bytes in the stream that would expand to a disk-filling size) is
// refused before anything is written.
func TestCopyFromVMHugeAndSparse(t *testing.T) {
	withUmask(t, 0o022)
	cases := map[string][]byte{
		"huge file in a tree": tarfstest.Tar(t, tarfstest.Entry{Name: "app/", Type: tar.TypeDir},
			tarfstest.Entry{Name: "app/big", Body: "abc", Size: 1 << 40}),
		"huge single file": tarfstest.Tar(t, tarfstest.Entry{Name: "app", Body: "abc", Size: 1 << 40}),
	}
	// Large enough to notice, small enough not to hurt if it is written.
	const sparseSize = 64 << 20
	for _, format := range []string{"pax0.1", "pax1.0", "gnu"} {
		cases["sparse "+format] = tarfstest.Sparse(t, "app", sparseSize, format)
	}
	for name, archive := range cases {
		t.Run(name, func(t *testing.T) {
			l := newHostLayout(t)
			dst := filepath.Join(l.parent, "copy")
			before := tarfstest.Tree(t, l.parent, dst)
			_, err := vmServing(t, archive).CopyFromVM(context.Background(), "vm", "/app", dst, nil)
			if err == nil {
				t.Errorf("the copy succeeded")
			}
			for _, p := range []string{filepath.Join(dst, "big"), dst} {
				if fi, err := os.Lstat(p); err == nil && !fi.IsDir() {
					t.Errorf("%s left behind (%d bytes)", p, fi.Size())
				}
			}
			tarfstest.SameTree(t, "next to the destination", before, tarfstest.Tree(t, l.parent, dst))
		})
	}
}

// TestCopyFromVMSkipsSpecialFiles: devices and fifos from a VM are never
// made on the host; the rest of the tree is copied.
func TestCopyFromVMSkipsSpecialFiles(t *testing.T) {
	withUmask(t, 0o022)
	l := newHostLayout(t)
	dst := filepath.Join(l.parent, "copy")
	res, err := vmServing(t, tarfstest.Tar(t,
		tarfstest.Entry{Name: "app/", Type: tar.TypeDir},
		tarfstest.Entry{Name: "app/null", Type: tar.TypeChar, Mode: 0o666, Devmajor: 1, Devminor: 3},
		tarfstest.Entry{Name: "app/disk", Type: tar.TypeBlock, Mode: 0o666, Devmajor: 8, Devminor: 0},
		tarfstest.Entry{Name: "app/fifo", Type: tar.TypeFifo, Mode: 0o666},
		tarfstest.Entry{Name: "app/f", Body: "f"},
	)).CopyFromVM(context.Background(), "vm", "/app", dst, nil)
	if err != nil {
		t.Fatal(err)
	}
	ents, _ := os.ReadDir(dst)
	if len(ents) != 1 || ents[0].Name() != "f" || res.Entries != 2 {
		t.Errorf("copied %v, result %+v; want only f", ents, res)
	}
}
