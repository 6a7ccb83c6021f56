package manager

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
)

// TestTrimLogWhileAppending: a log trimmed while a writer appends to it
// with O_APPEND (as a VMM does) keeps a gap-free run of the newest lines,
// ending with the last one written, and stays bounded; on ext4 by
// collapsing the file, on tmpfs by punching a hole that readers skip.
func TestTrimLogWhileAppending(t *testing.T) {
	dirs := map[string]string{"disk": t.TempDir()}
	if fi, err := os.Stat("/dev/shm"); err == nil && fi.IsDir() {
		d, err := os.MkdirTemp("/dev/shm", "noid-trim-")
		if err == nil {
			t.Cleanup(func() { os.RemoveAll(d) })
			dirs["tmpfs"] = d
		}
	}
	for fs, dir := range dirs {
		t.Run(fs, func(t *testing.T) {
			const limit = 64 << 10
			path := dir + "/serial.log"
			w, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
			if err != nil {
				t.Fatal(err)
			}
			defer w.Close()
			const lines = 200000 // about 3.5 MB
			var wg sync.WaitGroup
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := range lines {
					fmt.Fprintf(w, "line %08d of the console\n", i)
				}
			}()
			done := make(chan struct{})
			go func() { wg.Wait(); close(done) }()
			trims := 0
			for running := true; running; {
				select {
				case <-done:
					running = false
				default:
				}
				if err := trimLog(path, limit); err != nil {
					t.Fatal(err)
				}
				trims++
			}
			if err := trimLog(path, limit); err != nil {
				t.Fatal(err)
			}
			b, err := readLogTail(path, 10<<20)
			if err != nil {
				t.Fatal(err)
			}
			if len(b) > limit {
				t.Errorf("%d bytes of data after trimming, want at most %d", len(b), limit)
			}
			var st os.FileInfo
			if st, err = os.Stat(path); err == nil {
				t.Logf("%d trims; file size %d, %d bytes of data", trims, st.Size(), len(b))
			}
			// Whole lines from the first newline on, consecutive, ending
			// with the last line written.
			text := string(b[bytes.IndexByte(b, '\n')+1:])
			got := strings.Split(strings.TrimSuffix(text, "\n"), "\n")
			last := -1
			for i, l := range got {
				f := strings.Fields(l)
				if len(f) < 2 {
					t.Fatalf("line %d is garbled: %q", i, l)
				}
				n, err := strconv.Atoi(f[1])
				if err != nil || (last >= 0 && n != last+1) {
					t.Fatalf("line %d is %q after line %d: a gap or garbage", i, l, last)
				}
				last = n
			}
			if last != lines-1 {
				t.Errorf("the log ends with line %d, want %d", last, lines-1)
			}
		})
	}
}

// TestOpenLogTailBounded: a reader of "all of it" never gets more than the
// limit, and gets the newest bytes.
func TestOpenLogTailBounded(t *testing.T) {
	path := t.TempDir() + "/serial.log"
	os.WriteFile(path, bytes.Repeat([]byte("0123456789"), 100000), 0o600)
	r, err := openLogTail(path, 0, 4096)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	b, _ := io.ReadAll(r)
	if len(b) != 4096 || !bytes.HasSuffix(b, []byte("89")) {
		t.Errorf("got %d bytes ending %q, want the last 4096", len(b), b[len(b)-2:])
	}
}
