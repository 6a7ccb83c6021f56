package storage

import (
	"context"
	"errors"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/noid-vm/noid/internal/errdefs"
)

// TestDecideWithoutReflinks resolves each [storage] mode on the test's
// temporary directory, which has no reflinks here (ext4).
func TestDecideWithoutReflinks(t *testing.T) {
	dir := t.TempDir()
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	if st.Type != unix.EXT4_SUPER_MAGIC {
		t.Skipf("the temporary directory %s is not on ext4", dir)
	}
	d, err := Decide(dir, SettingAuto, "")
	if err != nil || d.Mode != ModeCopy || d.Resolved() != "copy" || d.FS != "ext4" || !d.NoReflink() {
		t.Fatalf("auto on ext4: %+v, %v", d, err)
	}
	for _, want := range []string{"copies are sparse copies: ext4 has no reflinks", "do not copy data", "reflink_image_size"} {
		if !strings.Contains(d.String(), want) {
			t.Errorf("auto on ext4 says %q, want it to say %q", d, want)
		}
	}
	d, err = Decide(dir, SettingCopy, "")
	if err != nil || d.Mode != ModeCopy || !strings.Contains(d.Why, `mode = "copy"`) {
		t.Fatalf("copy on ext4: %+v, %v", d, err)
	}
	d, err = Decide(dir, SettingReflink, "")
	if !errors.Is(err, errdefs.ErrUnavailable) || !strings.Contains(err.Error(), "has no reflinks") || !strings.Contains(errdefs.HintOf(err), "reflink_image_size") {
		t.Fatalf("reflink on ext4: %+v, %v (hint %q), want it refused", d, err, errdefs.HintOf(err))
	}
	// A root on the loop image has reflinks by construction: not probed.
	img := filepath.Join(dir, "reflink.img")
	d, err = Decide(filepath.Join(dir, "not-mounted"), SettingAuto, img)
	if err != nil || d.Mode != ModeReflink || d.Resolved() != "reflink-image" || d.NoReflink() || !strings.Contains(d.Why, img) {
		t.Fatalf("a root on the loop image: %+v, %v", d, err)
	}
	// A root that cannot be probed gets sparse copies and an error.
	if d, err := Decide(filepath.Join(dir, "missing"), SettingAuto, ""); err == nil || d.Mode != ModeCopy {
		t.Fatalf("a missing root: %+v, %v", d, err)
	}
}

// TestDecideOnXFS resolves each [storage] mode on a reflink XFS, and
// checks that a Copier told "copy" never makes a FICLONE there.
func TestDecideOnXFS(t *testing.T) {
	mnt := mountXFS(t, 1*GiB)
	d, err := Decide(mnt, SettingAuto, "")
	if err != nil || d.Mode != ModeReflink || d.Resolved() != "reflink" || d.FS != "xfs" || d.String() != "copies are reflinks: xfs has reflinks (FICLONE)" {
		t.Fatalf("auto on xfs: %+v %q, %v", d, d, err)
	}
	if d, err := Decide(mnt, SettingReflink, ""); err != nil || d.Mode != ModeReflink {
		t.Fatalf("reflink on xfs: %+v, %v", d, err)
	}
	d, err = Decide(mnt, SettingCopy, "")
	if err != nil || d.Mode != ModeCopy || !d.NoReflink() || !strings.Contains(d.Why, "although xfs has reflinks") {
		t.Fatalf("copy on xfs: %+v, %v", d, err)
	}
	src := filepath.Join(mnt, "src")
	writeSparse(t, src, 8*MiB, spreadExtents(8*MiB, 3, 64<<10), 0o600)
	c := &Copier{NoReflink: d.NoReflink()}
	if err := c.CopyFile(context.Background(), src, filepath.Join(mnt, "copy")); err != nil {
		t.Fatal(err)
	}
	assertSameBytes(t, src, filepath.Join(mnt, "copy"))
	if c.FlushFirst() {
		t.Error(`a Copier for mode "copy" made a FICLONE`)
	}
	c = &Copier{}
	if err := c.CopyFile(context.Background(), src, filepath.Join(mnt, "reflinked")); err != nil || !c.FlushFirst() {
		t.Errorf("a Copier for mode auto on xfs made no FICLONE: %v", err)
	}
}
