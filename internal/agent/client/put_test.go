package client_test

import (
	"archive/tar"
	"bytes"
	"context"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/noid-vm/noid/internal/tarfs/tarfstest"
)

// guestLayout is a directory in the "guest" with a sentinel file and a
// directory "outside" next to the upload directory dst.
type guestLayout struct {
	parent, sentinel, outside, dst string
}

func newGuestLayout(t *testing.T, dstExists bool) guestLayout {
	t.Helper()
	l := guestLayout{parent: t.TempDir()}
	l.sentinel, l.outside = tarfstest.Surround(t, l.parent)
	l.dst = filepath.Join(l.parent, "dst")
	if dstExists {
		if err := os.Mkdir(l.dst, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return l
}

// TestPutRefusesHostileArchives: an upload of a tree "app" into dst never
// creates or changes anything outside dst/app, whether dst exists or not:
// the reported attack (app/s -> .. then app/s/.bashrc) and its relatives,
// in the host-to-guest direction.
func TestPutRefusesHostileArchives(t *testing.T) {
	c, _ := newClient(t)
	for _, exists := range []bool{false, true} {
		probe := newGuestLayout(t, exists)
		for _, hc := range tarfstest.Escapes(t, "app", probe.outside, probe.sentinel) {
			name := map[bool]string{false: "dst missing/", true: "dst exists/"}[exists] + hc.Name
			t.Run(name, func(t *testing.T) {
				l := newGuestLayout(t, exists)
				app := filepath.Join(l.dst, "app")
				before, probeBefore := tarfstest.Tree(t, l.parent, app), tarfstest.Tree(t, probe.parent)
				if _, err := c.Put(context.Background(), l.dst, bytes.NewReader(hc.Tar)); err == nil {
					t.Errorf("the put succeeded")
				}
				after := tarfstest.Tree(t, l.parent, app)
				if !exists {
					delete(after, "dst") // made by the put, as asked
				}
				tarfstest.SameTree(t, "outside dst/app", before, after)
				tarfstest.SameTree(t, "in the probe directory", probeBefore, tarfstest.Tree(t, probe.parent))
			})
		}
	}
	// The connection survived all of this.
	if err := c.Ping(context.Background()); err != nil {
		t.Fatal(err)
	}
}

// TestPutKeepsModesAndOwners: in the guest the agent runs as root and
// extracts like tar run as root: modes as they are (setuid, setgid and
// sticky included, no umask), numeric owners kept; directories made for
// entries the archive does not list get 0755.
func TestPutKeepsModesAndOwners(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("owners are kept only when the agent runs as root")
	}
	old := syscall.Umask(0o022)
	defer syscall.Umask(old)
	c, _ := newClient(t)
	dst := filepath.Join(t.TempDir(), "dst")
	_, err := c.Put(context.Background(), dst, bytes.NewReader(tarfstest.Tar(t,
		tarfstest.Entry{Name: "app/", Type: tar.TypeDir, Mode: 0o777, Uid: 1001, Gid: 1002},
		tarfstest.Entry{Name: "app/suid", Mode: 0o6755, Body: "#!", Uid: 1234, Gid: 5678},
		tarfstest.Entry{Name: "app/tmp/", Type: tar.TypeDir, Mode: 0o1777},
		tarfstest.Entry{Name: "app/l", Type: tar.TypeSymlink, Link: "suid", Uid: 7, Gid: 8},
		tarfstest.Entry{Name: "app/x/y/f", Mode: 0o666, Body: "deep"},
	)))
	if err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]struct {
		mode     fs.FileMode
		uid, gid uint32
	}{
		"app":       {fs.ModeDir | 0o777, 1001, 1002},
		"app/suid":  {fs.ModeSetuid | fs.ModeSetgid | 0o755, 1234, 5678},
		"app/tmp":   {fs.ModeDir | fs.ModeSticky | 0o777, 0, 0},
		"app/l":     {fs.ModeSymlink | 0o777, 7, 8},
		"app/x":     {fs.ModeDir | 0o755, 0, 0},
		"app/x/y":   {fs.ModeDir | 0o755, 0, 0},
		"app/x/y/f": {0o666, 0, 0},
	} {
		fi, err := os.Lstat(filepath.Join(dst, name))
		if err != nil {
			t.Errorf("%s: %v", name, err)
			continue
		}
		st := fi.Sys().(*syscall.Stat_t)
		if fi.Mode() != want.mode || st.Uid != want.uid || st.Gid != want.gid {
			t.Errorf("%s: %v %d:%d, want %v %d:%d", name, fi.Mode(), st.Uid, st.Gid, want.mode, want.uid, want.gid)
		}
	}
}

// TestPutSpecialAndHugeEntries: devices and fifos are not made; an entry
// that claims more than the stream holds fails without a partial file; a
// sparse file is refused before anything is written.
func TestPutSpecialAndHugeEntries(t *testing.T) {
	c, _ := newClient(t)
	dst := filepath.Join(t.TempDir(), "dst")
	res, err := c.Put(context.Background(), dst, bytes.NewReader(tarfstest.Tar(t,
		tarfstest.Entry{Name: "null", Type: tar.TypeChar, Mode: 0o666, Devmajor: 1, Devminor: 3},
		tarfstest.Entry{Name: "disk", Type: tar.TypeBlock, Mode: 0o666, Devmajor: 8},
		tarfstest.Entry{Name: "fifo", Type: tar.TypeFifo, Mode: 0o666},
		tarfstest.Entry{Name: "f", Body: "f"},
	)))
	if err != nil {
		t.Fatal(err)
	}
	if ents, _ := os.ReadDir(dst); len(ents) != 1 || ents[0].Name() != "f" || res.Entries != 1 {
		t.Errorf("extracted %v, result %+v; want only f", ents, res)
	}

	cases := map[string][]byte{
		"huge": tarfstest.Tar(t, tarfstest.Entry{Name: "app/", Type: tar.TypeDir}, tarfstest.Entry{Name: "app/big", Body: "abc", Size: 1 << 40}),
	}
	for _, format := range []string{"pax0.1", "pax1.0", "gnu"} {
		cases["sparse "+format] = tarfstest.Sparse(t, "app", 64<<20, format)
	}
	for name, archive := range cases {
		t.Run(name, func(t *testing.T) {
			dst := filepath.Join(t.TempDir(), "dst")
			if _, err := c.Put(context.Background(), dst, bytes.NewReader(archive)); err == nil {
				t.Errorf("the put succeeded")
			}
			if fi, err := os.Lstat(filepath.Join(dst, "app", "big")); err == nil {
				t.Errorf("app/big left behind (%d bytes)", fi.Size())
			}
		})
	}
}
