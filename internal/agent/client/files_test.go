package client_test

import (
	"archive/tar"
	"bytes"
	"context"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"
)

type entry struct {
	name, link, body string
	typ              byte
	mode             int64
	mtime            time.Time
}

func makeTar(t *testing.T, entries []entry) *bytes.Buffer {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		h := &tar.Header{Name: e.name, Linkname: e.link, Typeflag: e.typ, Mode: e.mode, ModTime: e.mtime, Size: int64(len(e.body))}
		if e.typ != tar.TypeReg {
			h.Size = 0
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if e.typ == tar.TypeReg {
			if _, err := io.WriteString(tw, e.body); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return &buf
}

func TestPutGetRoundTrip(t *testing.T) {
	c, _ := newClient(t)
	t1 := time.Date(2020, 1, 2, 3, 4, 5, 0, time.UTC)
	t2 := time.Date(2021, 6, 7, 8, 9, 10, 0, time.UTC)
	big := strings.Repeat("0123456789abcdef", 300000) // 4.8 MB, several windows
	in := []entry{
		{name: "d/", typ: tar.TypeDir, mode: 0o750, mtime: t1},
		{name: "d/f.txt", typ: tar.TypeReg, mode: 0o640, mtime: t2, body: "hello"},
		{name: "d/run.sh", typ: tar.TypeReg, mode: 0o755, mtime: t2, body: "#!/bin/sh\n"},
		{name: "d/sub/big.bin", typ: tar.TypeReg, mode: 0o600, mtime: t1, body: big},
		{name: "d/link", typ: tar.TypeSymlink, link: "f.txt", mtime: t1},
		{name: "d/abs", typ: tar.TypeSymlink, link: "/etc/passwd", mtime: t1},
		{name: "d/hard", typ: tar.TypeLink, link: "d/f.txt"},
	}
	dst := filepath.Join(t.TempDir(), "dst", "nested")
	res, err := c.Put(context.Background(), dst, makeTar(t, in))
	if err != nil {
		t.Fatal(err)
	}
	if res.Entries != len(in) || res.Bytes != int64(5+10+len(big)) {
		t.Fatalf("put result %+v", res)
	}
	check := func(name string, mode os.FileMode, mtime time.Time, body string) {
		t.Helper()
		p := filepath.Join(dst, name)
		fi, err := os.Lstat(p)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != mode {
			t.Errorf("%s mode %v, want %v", name, fi.Mode().Perm(), mode)
		}
		if !fi.ModTime().Equal(mtime) {
			t.Errorf("%s mtime %v, want %v", name, fi.ModTime(), mtime)
		}
		if body != "" {
			b, _ := os.ReadFile(p)
			if string(b) != body {
				t.Errorf("%s content differs (%d bytes)", name, len(b))
			}
		}
	}
	check("d", 0o750, t1, "")
	check("d/f.txt", 0o640, t2, "hello")
	check("d/run.sh", 0o755, t2, "#!/bin/sh\n")
	check("d/sub/big.bin", 0o600, t1, big)
	if l, err := os.Readlink(filepath.Join(dst, "d/link")); err != nil || l != "f.txt" {
		t.Errorf("symlink %q %v", l, err)
	}
	if l, err := os.Readlink(filepath.Join(dst, "d/abs")); err != nil || l != "/etc/passwd" {
		t.Errorf("absolute symlink %q %v", l, err)
	}
	a, _ := os.Stat(filepath.Join(dst, "d/f.txt"))
	b, _ := os.Stat(filepath.Join(dst, "d/hard"))
	if !os.SameFile(a, b) {
		t.Error("hard link is not the same file")
	}

	// Get it back.
	rc, err := c.Get(context.Background(), filepath.Join(dst, "d"))
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	tr := tar.NewReader(rc)
	got := map[string]*tar.Header{}
	bodies := map[string]string{}
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		got[h.Name] = h
		body, _ := io.ReadAll(tr)
		bodies[h.Name] = string(body)
	}
	var names []string
	for n := range got {
		names = append(names, n)
	}
	sort.Strings(names)
	want := []string{"d/", "d/abs", "d/f.txt", "d/hard", "d/link", "d/run.sh", "d/sub/", "d/sub/big.bin"}
	if strings.Join(names, ",") != strings.Join(want, ",") {
		t.Fatalf("get entries %v, want %v", names, want)
	}
	if bodies["d/sub/big.bin"] != big || bodies["d/f.txt"] != "hello" {
		t.Fatal("get content differs")
	}
	if h := got["d/f.txt"]; h.Mode&0o777 != 0o640 || !h.ModTime.Equal(t2) {
		t.Fatalf("get header %+v", h)
	}
	if h := got["d/link"]; h.Typeflag != tar.TypeSymlink || h.Linkname != "f.txt" {
		t.Fatalf("get symlink header %+v", h)
	}

	// A single file.
	rc2, err := c.Get(context.Background(), filepath.Join(dst, "d/f.txt"))
	if err != nil {
		t.Fatal(err)
	}
	tr = tar.NewReader(rc2)
	h, err := tr.Next()
	if err != nil || h.Name != "f.txt" {
		t.Fatalf("single file get: %v %v", h, err)
	}
	rc2.Close()

	// Closing a get early aborts it without harming the connection.
	rc3, err := c.Get(context.Background(), filepath.Join(dst, "d"))
	if err != nil {
		t.Fatal(err)
	}
	rc3.Close()
	if err := c.Ping(context.Background()); err != nil {
		t.Fatal(err)
	}
}

func TestGetMissing(t *testing.T) {
	c, _ := newClient(t)
	_, err := c.Get(context.Background(), "/nonexistent/path")
	if err == nil || !strings.Contains(err.Error(), "no such file") {
		t.Fatalf("get of a missing path: %v", err)
	}
	if _, err := c.Get(context.Background(), "relative/path"); err == nil {
		t.Fatal("get of a relative path succeeded")
	}
}

func TestPutRefusesEscapes(t *testing.T) {
	c, _ := newClient(t)
	base := t.TempDir()
	outside := filepath.Join(base, "outside")
	if err := os.Mkdir(outside, 0o755); err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	cases := map[string][]entry{
		"dotdot": {{name: "../outside/pwned", typ: tar.TypeReg, mode: 0o644, body: "x", mtime: now}},
		"nested dotdot": {
			{name: "a/", typ: tar.TypeDir, mode: 0o755, mtime: now},
			{name: "a/../../outside/pwned", typ: tar.TypeReg, mode: 0o644, body: "x", mtime: now},
		},
		"absolute": {{name: outside + "/pwned", typ: tar.TypeReg, mode: 0o644, body: "x", mtime: now}},
		"through archive symlink": {
			{name: "esc", typ: tar.TypeSymlink, link: outside, mtime: now},
			{name: "esc/pwned", typ: tar.TypeReg, mode: 0o644, body: "x", mtime: now},
		},
		"through relative symlink": {
			{name: "esc2", typ: tar.TypeSymlink, link: "../outside", mtime: now},
			{name: "esc2/pwned", typ: tar.TypeReg, mode: 0o644, body: "x", mtime: now},
		},
		"hard link to outside": {{name: "h", typ: tar.TypeLink, link: "../outside/target", mtime: now}},
		"dir through symlink": {
			{name: "esc3", typ: tar.TypeSymlink, link: outside, mtime: now},
			{name: "esc3/newdir/", typ: tar.TypeDir, mode: 0o755, mtime: now},
		},
	}
	for name, entries := range cases {
		t.Run(name, func(t *testing.T) {
			dst := filepath.Join(base, strings.ReplaceAll(name, " ", "_"))
			_, err := c.Put(context.Background(), dst, makeTar(t, entries))
			if err == nil {
				t.Fatal("put succeeded")
			}
			ents, _ := os.ReadDir(outside)
			if len(ents) != 0 {
				t.Fatalf("something was written outside: %v", ents)
			}
		})
	}
	// A symlink already on disk is not followed either.
	dst := filepath.Join(base, "preexisting")
	if err := os.MkdirAll(dst, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(outside, filepath.Join(dst, "link")); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Put(context.Background(), dst, makeTar(t, []entry{{name: "link/pwned", typ: tar.TypeReg, mode: 0o644, body: "x", mtime: now}})); err == nil {
		t.Fatal("put through an existing symlink succeeded")
	}
	// Replacing the symlink itself by a file is fine and leaves the target alone.
	if err := os.WriteFile(filepath.Join(outside, "target"), []byte("keep"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(filepath.Join(outside, "target"), filepath.Join(dst, "f")); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Put(context.Background(), dst, makeTar(t, []entry{{name: "f", typ: tar.TypeReg, mode: 0o644, body: "new", mtime: now}})); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(filepath.Join(outside, "target")); string(b) != "keep" {
		t.Fatalf("symlink target was overwritten: %q", b)
	}
	if fi, err := os.Lstat(filepath.Join(dst, "f")); err != nil || !fi.Mode().IsRegular() {
		t.Fatalf("f should now be a regular file: %v %v", fi, err)
	}
	// The connection survived all of this.
	if err := c.Ping(context.Background()); err != nil {
		t.Fatal(err)
	}
}
