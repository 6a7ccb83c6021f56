package guest

import (
	"log/slog"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/noid-vm/noid/internal/agent/proto"
	"github.com/noid-vm/noid/internal/testutil"
)

// hostnameSystem is nopSystem with a kernel hostname that can be set.
type hostnameSystem struct {
	nopSystem
	name string
}

func (h *hostnameSystem) Hostname() (string, error)  { return h.name, nil }
func (h *hostnameSystem) SetHostname(n string) error { h.name = n; return nil }

// TestBindEtcFilesInMemory mounts a tmpfs the way init has /run, keeps
// hosts and hostname of an etc directory in it, and checks that the sync's
// writes then go to the in-memory copies, in place, and never to the files
// on the (here: the test's) disk.
func TestBindEtcFilesInMemory(t *testing.T) {
	testutil.RequireRoot(t)
	etc, mem := t.TempDir(), t.TempDir()
	if err := unix.Mount("tmpfs", mem, "tmpfs", 0, "mode=0755"); err != nil {
		t.Fatalf("mounting a tmpfs: %v", err)
	}
	t.Cleanup(func() { unix.Unmount(mem, unix.MNT_DETACH) })
	disk := map[string]string{"hosts": "127.0.0.1\tlocalhost\n10.0.0.9\told # noid\n", "hostname": "old\n"}
	for name, body := range disk {
		if err := os.WriteFile(filepath.Join(etc, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	// A symlink is left alone (the sync replaces it by a file, as before).
	if err := os.Symlink("/run/elsewhere", filepath.Join(etc, "resolv.conf")); err != nil {
		t.Fatal(err)
	}
	BindEtcFiles(slog.New(slog.DiscardHandler), etc, filepath.Join(mem, "etc"))
	for name := range disk {
		p := filepath.Join(etc, name)
		t.Cleanup(func() { unix.Unmount(p, unix.MNT_DETACH) })
		if !mountedFile(p) {
			t.Fatalf("%s is not mounted from memory", p)
		}
	}
	if mountedFile(filepath.Join(etc, "resolv.conf")) {
		t.Fatal("a symlink was mounted over")
	}
	// Binding twice (init runs once, but nothing should stack) is a no-op.
	BindEtcFiles(slog.New(slog.DiscardHandler), etc, filepath.Join(mem, "etc"))

	a := New(Config{Logger: slog.New(slog.DiscardHandler), System: &hostnameSystem{}, EtcDir: etc})
	if res := a.applySync(proto.Sync{Identity: &proto.Identity{Hostname: "new"}}); len(res.Errors) > 0 {
		t.Fatalf("sync failed: %v", res.Errors)
	}
	for name, want := range map[string]string{"hostname": "new\n", "hosts": "127.0.0.1\tlocalhost\n127.0.1.1\tnew # noid\n"} {
		got, err := os.ReadFile(filepath.Join(etc, name))
		if err != nil || string(got) != want {
			t.Errorf("%s reads %q (%v), want %q", name, got, err, want)
		}
		inMem, _ := os.ReadFile(filepath.Join(mem, "etc", name))
		if string(inMem) != want {
			t.Errorf("the in-memory %s holds %q, want %q", name, inMem, want)
		}
	}
	// Under the mounts, the disk's files are as they were.
	for name, body := range disk {
		p := filepath.Join(etc, name)
		if err := unix.Unmount(p, 0); err != nil {
			t.Fatalf("unmounting %s: %v", p, err)
		}
		if got, _ := os.ReadFile(p); string(got) != body {
			t.Errorf("the disk's %s changed to %q", name, got)
		}
	}
	if ents, _ := os.ReadDir(etc); len(ents) != 3 {
		t.Errorf("etc holds %d entries, want the 3 it had (no temp files left): %v", len(ents), ents)
	}
}
