package client

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/noid-vm/noid/internal/api"
)

func TestEntryName(t *testing.T) {
	for in, want := range map[string]string{"a": "a", "a/": "a", "a/./b": "a/b", ".": "", "./": ""} {
		if got, err := entryName(in); err != nil || got != want {
			t.Errorf("entryName(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "/abs", "../x", "a/../../x", "a/..", "a\x00b"} {
		if _, err := entryName(bad); err == nil {
			t.Errorf("entryName(%q) accepted", bad)
		}
	}
	for in, want := range map[string]bool{".": true, "dir/.": true, "/.": true, "dir": false, "dir/": false, "./dir": false} {
		if isContentsPath(in) != want {
			t.Errorf("isContentsPath(%q) = %v", in, !want)
		}
	}
}

// TestWriteLocalTarNames: the archive's names start with the top name, or
// are relative for a contents copy; owners are root; sockets are skipped.
func TestWriteLocalTarNames(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "src")
	os.MkdirAll(filepath.Join(dir, "sub"), 0o755)
	os.WriteFile(filepath.Join(dir, "sub", "f"), []byte("x"), 0o640)
	os.Symlink("sub/f", filepath.Join(dir, "l"))
	names := func(top string) []string {
		var buf bytes.Buffer
		var done int64
		if err := writeLocalTar(&buf, dir, top, func(n int64) { done = n }); err != nil {
			t.Fatal(err)
		}
		if done != 1 {
			t.Errorf("progress reported %d bytes, want 1", done)
		}
		tr := tar.NewReader(&buf)
		var out []string
		for {
			h, err := tr.Next()
			if err == io.EOF {
				return out
			}
			if err != nil {
				t.Fatal(err)
			}
			if h.Uid != 0 || h.Gid != 0 || h.Uname != "" {
				t.Errorf("%s owned by %d/%d %q", h.Name, h.Uid, h.Gid, h.Uname)
			}
			out = append(out, h.Name)
		}
	}
	if got := strings.Join(names("renamed"), ","); got != "renamed/,renamed/l,renamed/sub/,renamed/sub/f" {
		t.Errorf("top names: %s", got)
	}
	if got := strings.Join(names(""), ","); got != "l,sub/,sub/f" {
		t.Errorf("contents names: %s", got)
	}
}

// TestPutFilesReportsLocalErrors: when the local source fails mid-upload,
// that failure is reported, not a vague transport error.
func TestPutFilesReportsLocalErrors(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "application/json")
		w.Write([]byte(`{"entries":1,"bytes":1}`))
	}))
	defer srv.Close()
	c, err := New(srv.URL, "")
	if err != nil {
		t.Fatal(err)
	}
	boom := errors.New("disk on fire")
	_, err = c.PutFiles(context.Background(), "vm", "/root", io.MultiReader(strings.NewReader("partial"), &failReader{boom}))
	if !errors.Is(err, boom) {
		t.Fatalf("PutFiles with a failing source: %v", err)
	}
	res, err := c.PutFiles(context.Background(), "vm", "/root", strings.NewReader("ok"))
	if err != nil || *res != (api.PutFilesResult{Entries: 1, Bytes: 1}) {
		t.Fatalf("PutFiles: %+v %v", res, err)
	}
}

type failReader struct{ err error }

func (f *failReader) Read([]byte) (int, error) { return 0, f.err }

// TestGetFilesTrailerError: an error the server reports in the trailer
// after the stream started becomes a read error, not a silent short read.
func TestGetFilesTrailerError(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Trailer", api.FilesErrorTrailer)
		w.Write([]byte("some tar bytes"))
		if r.URL.Query().Get("path") == "/bad" {
			w.Header().Set(api.FilesErrorTrailer, "agent went away")
		}
	}))
	defer srv.Close()
	c, _ := New(srv.URL, "")
	rc, err := c.GetFiles(context.Background(), "vm", "/bad")
	if err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(rc)
	rc.Close()
	if err == nil || !strings.Contains(err.Error(), "agent went away") || string(b) != "some tar bytes" {
		t.Fatalf("trailer error: %q %v", b, err)
	}
	rc, _ = c.GetFiles(context.Background(), "vm", "/good")
	if b, err := io.ReadAll(rc); err != nil || string(b) != "some tar bytes" {
		t.Fatalf("good download: %q %v", b, err)
	}
	rc.Close()
}
