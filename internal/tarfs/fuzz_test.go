package tarfs

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/noid-vm/noid/internal/tarfs/tarfstest"
)

// optionSet is one way Extract is called, with the place it extracts to
// inside a parent directory that also holds a sentinel file, a directory
// "outside", and (prepared by setup) whatever the destination needs.
type optionSet struct {
	name string
	opts Options
	// dst is the destination below the parent, the only place Extract may
	// change.
	dst   string
	setup func(t *testing.T, parent string)
	// host: modes must stay within the umask, without set-id bits.
	host bool
}

var optionSets = []optionSet{
	{name: "host, new destination", opts: Options{Top: "app", Umask: 0o022}, dst: "app-copy", host: true},
	{name: "host, existing destination with symlinks in it", opts: Options{Top: "app", Umask: 0o022}, dst: "dst/app", host: true,
		setup: func(t *testing.T, parent string) {
			app := filepath.Join(parent, "dst", "app")
			must(t, os.MkdirAll(filepath.Join(app, "sub"), 0o755))
			must(t, os.Symlink("..", filepath.Join(app, "up")))
			must(t, os.Symlink(filepath.Join(parent, "outside"), filepath.Join(app, "abs")))
			must(t, os.Symlink("../../../sentinel", filepath.Join(app, "sub", "s")))
			must(t, os.Symlink("sub", filepath.Join(app, "in")))
		}},
	{name: "host, contents", opts: Options{Top: "app", Contents: true, Umask: 0o022}, dst: "dst", host: true,
		setup: func(t *testing.T, parent string) { must(t, os.Mkdir(filepath.Join(parent, "dst"), 0o755)) }},
	// The guest's root is the upload directory: names are relative to it.
	{name: "guest", opts: Options{KeepSetID: true, KeepOwner: os.Geteuid() == 0}, dst: "dst"},
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// confined extracts data with set in a fresh parent directory and fails t
// if anything outside set.dst was created, removed or changed, or (on the
// host) a mode exceeds the umask or keeps a set-id bit, or a device or
// fifo was made. It returns Extract's error.
func confined(t *testing.T, data []byte, set optionSet) error {
	t.Helper()
	parent := t.TempDir()
	// Read-only directories from the archive must not stop the clean-up.
	t.Cleanup(func() {
		filepath.WalkDir(parent, func(p string, d fs.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				os.Chmod(p, 0o700)
			}
			return nil
		})
	})
	tarfstest.Surround(t, parent)
	if set.setup != nil {
		set.setup(t, parent)
	}
	dest := filepath.Join(parent, set.dst)
	before := tarfstest.Tree(t, parent, dest)
	_, err := Extract(context.Background(), dest, bytes.NewReader(data), set.opts)
	tarfstest.SameTree(t, set.name, before, tarfstest.Tree(t, parent, dest))
	filepath.WalkDir(dest, func(p string, d fs.DirEntry, werr error) error {
		if werr != nil {
			return nil
		}
		fi, ierr := d.Info()
		if ierr != nil {
			return nil
		}
		m := fi.Mode()
		if m&(fs.ModeDevice|fs.ModeCharDevice|fs.ModeNamedPipe|fs.ModeSocket) != 0 {
			t.Errorf("%s: %s is a %v", set.name, p, m.Type())
		}
		if set.host && m&fs.ModeSymlink == 0 && (m&0o022 != 0 || m&(fs.ModeSetuid|fs.ModeSetgid) != 0) {
			t.Errorf("%s: %s has mode %v, beyond umask 022 or set-id", set.name, p, m)
		}
		return nil
	})
	return err
}

// FuzzExtract feeds arbitrary bytes to Extract on the host's and the
// guest's option sets and checks that nothing outside the destination is
// ever created or changed (see confined).
func FuzzExtract(f *testing.F) {
	probe := f.TempDir()
	for _, c := range tarfstest.Escapes(f, "app", filepath.Join(probe, "outside"), filepath.Join(probe, "sentinel")) {
		f.Add(c.Tar)
	}
	f.Add(tarfstest.Sparse(f, "app", 1<<30, "pax1.0"))
	f.Add(tarfstest.Tar(f,
		tarfstest.Entry{Name: "app/", Type: tar.TypeDir, Mode: 0o777},
		tarfstest.Entry{Name: "app/ro/", Type: tar.TypeDir, Mode: 0o555},
		tarfstest.Entry{Name: "app/ro/f", Mode: 0o4777, Body: "x"},
		tarfstest.Entry{Name: "app/up/x", Body: "through a link already there"},
		tarfstest.Entry{Name: "app/in/x", Body: "through a link that stays inside"},
		tarfstest.Entry{Name: "app/h", Type: tar.TypeLink, Link: "app/ro/f"},
		tarfstest.Entry{Name: "app/fifo", Type: tar.TypeFifo},
	))
	scratch := f.TempDir()
	f.Fuzz(func(t *testing.T, data []byte) {
		data = fixChecksums(data)
		if _, err := tar.NewReader(bytes.NewReader(data)).Next(); err != nil {
			// Not one header (most mutations): the cheap check, without
			// building the layouts. Nothing may be made.
			dst := filepath.Join(scratch, "app-copy")
			if _, err := Extract(context.Background(), dst, bytes.NewReader(data), optionSets[0].opts); err == nil {
				t.Fatal("extracted a stream without a header")
			}
			if _, err := os.Lstat(dst); err == nil {
				t.Fatalf("made %s from a stream without a header", dst)
			}
			return
		}
		for _, set := range optionSets {
			_ = confined(t, data, set)
		}
	})
}

// fixChecksums returns data with the checksum of every block that stands
// where a header would be recomputed, so that the fuzzer's mutations of
// header fields reach Extract instead of all failing the reader's
// checksum test. (Sizes are read as octal only; a wrong guess merely
// leaves a checksum as it was.)
func fixChecksums(data []byte) []byte {
	data = bytes.Clone(data)
	for off := 0; off+512 <= len(data); {
		blk := data[off : off+512]
		if bytes.Equal(blk, make([]byte, 512)) {
			off += 512
			continue
		}
		copy(blk[148:156], "        ")
		sum := 0
		for _, c := range blk {
			sum += int(c)
		}
		copy(blk[148:156], fmt.Sprintf("%06o\x00 ", sum))
		size, err := strconv.ParseInt(strings.Trim(string(blk[124:136]), " \x00"), 8, 64)
		if err != nil || size < 0 || size > int64(len(data)) {
			size = 0
		}
		off += 512 + int((size+511)/512*512)
	}
	return data
}
