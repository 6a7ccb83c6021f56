package client

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/noid-vm/noid/internal/api"
)

func TestIsContentsPath(t *testing.T) {
	for in, want := range map[string]bool{".": true, "dir/.": true, "/.": true, "dir": false, "dir/": false, "./dir": false} {
		if isContentsPath(in) != want {
			t.Errorf("isContentsPath(%q) = %v", in, !want)
		}
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
