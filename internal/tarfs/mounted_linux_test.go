package tarfs

import (
	"archive/tar"
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/noid-vm/noid/internal/tarfs/tarfstest"
	"github.com/noid-vm/noid/internal/testutil"
)

// TestExtractOverMountedFile: a file something is mounted over (the guest's
// init keeps /etc/hosts in memory that way) cannot be removed and replaced;
// extracting over it rewrites it in place, and a symlink entry in its way
// still fails with a clear error.
func TestExtractOverMountedFile(t *testing.T) {
	testutil.RequireRoot(t)
	dst, mem := t.TempDir(), t.TempDir()
	if err := unix.Mount("tmpfs", mem, "tmpfs", 0, ""); err != nil {
		t.Fatalf("mounting a tmpfs: %v", err)
	}
	t.Cleanup(func() { unix.Unmount(mem, unix.MNT_DETACH) })
	target, copy := filepath.Join(dst, "hosts"), filepath.Join(mem, "hosts")
	for _, p := range []string{target, copy} {
		if err := os.WriteFile(p, []byte("old\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := unix.Mount(copy, target, "", unix.MS_BIND, ""); err != nil {
		t.Fatalf("bind-mounting: %v", err)
	}
	t.Cleanup(func() { unix.Unmount(target, unix.MNT_DETACH) })

	archive := tarfstest.Tar(t, tarfstest.Entry{Name: "hosts", Body: "127.0.0.1 new\n"})
	if _, err := Extract(context.Background(), dst, bytes.NewReader(archive), Options{}); err != nil {
		t.Fatalf("extracting over a mounted file: %v", err)
	}
	for _, p := range []string{target, copy} {
		if b, _ := os.ReadFile(p); string(b) != "127.0.0.1 new\n" {
			t.Errorf("%s holds %q after the extraction", p, b)
		}
	}
	archive = tarfstest.Tar(t, tarfstest.Entry{Name: "hosts", Type: tar.TypeSymlink, Link: "/elsewhere"})
	if _, err := Extract(context.Background(), dst, bytes.NewReader(archive), Options{}); err == nil {
		t.Error("a symlink replaced a mounted file")
	}
}
