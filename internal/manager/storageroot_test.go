package manager

import (
	"bytes"
	"context"
	"errors"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/noid-vm/noid/internal/api"
	"github.com/noid-vm/noid/internal/config"
	"github.com/noid-vm/noid/internal/errdefs"
	"github.com/noid-vm/noid/internal/storage"
	"github.com/noid-vm/noid/internal/store"
	"github.com/noid-vm/noid/internal/vmm"
)

// TestStorageSwitch changes [storage] on a data dir that holds golden
// snapshots (a system one with a backup, and a user's own) and had a VM:
// while a VM lives in the old root the start is refused and nothing
// moves; once it is destroyed, a start on the loop XFS image moves every
// golden there, with its base image, and leaves nothing of them in the
// old root, even when that start is killed midway and the config is
// reverted before the next one; creates restore the moved goldens; and
// after a reboot (the image unmounted) switching back brings them home.
func TestStorageSwitch(t *testing.T) {
	for _, need := range []string{"/dev/loop-control"} {
		if _, err := os.Stat(need); err != nil {
			t.Skipf("skipping: %v", err)
		}
	}
	if _, err := exec.LookPath("mkfs.xfs"); err != nil {
		t.Skip("skipping: mkfs.xfs not installed")
	}
	// Registered before the env, so it runs after the env's clean-up.
	var mnt, top string
	t.Cleanup(func() {
		if mnt == "" {
			return
		}
		if err := storage.TeardownReflinkLoop(context.Background(), mnt); err != nil {
			t.Logf("unmounting %s: %v; detaching lazily", mnt, err)
			syscall.Unmount(mnt, syscall.MNT_DETACH)
		}
		os.RemoveAll(top)
	})
	e := newEnv(t, "")
	data := e.cfg.DataDir
	mnt, top = filepath.Join(data, "reflink"), e.dir
	img := filepath.Join(data, "reflink.img")
	plain, err := os.ReadFile(e.cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	imgPath := filepath.Join(e.dir, "config-image.toml")
	if err := os.WriteFile(imgPath, append(plain, "[storage]\nreflink_image_size = \"2G\"\n"...), 0o600); err != nil {
		t.Fatal(err)
	}
	load := func(path string) *config.Config {
		c, err := config.Load(path)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	plainCfg, imageCfg := load(e.cfgPath), load(imgPath)

	// A system golden with a backup, from a cold-booted VM.
	e.create("src")
	e.mustExec("src", "sh", "-c", "echo system > /root/mark; sync")
	if _, err := e.mgr.Checkpoint(tctx(t), e.user, "src", api.CheckpointRequest{Name: "c0"}); err != nil {
		t.Fatal(err)
	}
	for range 2 {
		if _, err := e.mgr.PromoteGolden(tctx(t), e.user, api.GoldenPromoteRequest{VM: "src", Checkpoint: "c0"}); err != nil {
			t.Fatal(err)
		}
	}
	// A user's own golden, from a VM restored from the system one (so
	// the two share disk layers and the base image).
	root := e.user
	alice, _, err := e.mgr.Store().CreateUser(tctx(t), "alice", false)
	if err != nil {
		t.Fatal(err)
	}
	e.user = alice
	if v := e.create("a1"); v.BootPath != "golden" {
		t.Fatalf("alice's VM did not start from the system golden: %+v", v)
	}
	e.mustExec("a1", "sh", "-c", "echo alice > /root/mark; sync")
	if _, err := e.mgr.Checkpoint(tctx(t), alice, "a1", api.CheckpointRequest{Name: "ac"}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.mgr.PromoteGolden(tctx(t), alice, api.GoldenPromoteRequest{VM: "a1", Checkpoint: "ac"}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.mgr.DestroyVM(tctx(t), alice, "a1"); err != nil {
		t.Fatal(err)
	}
	e.user = root
	if d := e.mgr.StorageDecision(); d.NoReflink() != e.mgr.copier.NoReflink || (d.FS == "ext4" && d.Resolved() != "copy") {
		t.Errorf("storage on ext4 resolved to %+v (FICLONE off: %v)", d, e.mgr.copier.NoReflink)
	}
	goldens := goldenDirs(t, data)
	if len(goldens) != 3 {
		t.Fatalf("want a system golden, its backup and alice's golden, got %v", goldens)
	}

	// 1. A VM (src) still lives in the old root: the switch is refused
	// before anything is mounted or moved.
	e.close()
	_, err = New(tctx(t), Options{Config: imageCfg, Logger: slog.New(slog.NewTextHandler(e.logs, nil))})
	if !errors.Is(err, errdefs.ErrConflict) || !strings.Contains(err.Error(), "1 VM still has its files") ||
		!strings.Contains(err.Error(), "root/src") || !strings.Contains(errdefs.HintOf(err), "revert [storage]") {
		t.Fatalf("switching storage under a VM: %v (hint %q), want a conflict naming root/src", err, errdefs.HintOf(err))
	}
	if _, err := os.Stat(img); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("the refused start made the reflink image: %v", err)
	}
	if got := goldenDirs(t, data); !equalMaps(got, goldens) {
		t.Errorf("the refused start changed the goldens: %v, had %v", got, goldens)
	}

	// 2. With the VM destroyed, a start on the image is killed right
	// after it moved its first golden into place; the config is then
	// reverted, and the next start moves that golden back.
	e.open()
	if _, err := e.mgr.DestroyVM(tctx(t), e.user, "src"); err != nil {
		t.Fatal(err)
	}
	e.crashChild("storage.move-after-rename", childOp{Op: "open"}, imgPath)
	// Every golden is whole in one root or the other: the one moved is
	// in both.
	if got := goldenDirs(t, data); !equalMaps(got, goldens) {
		t.Errorf("after a move cut short, the old root holds goldens %v, want %v", got, goldens)
	}
	if got := goldenDirs(t, mnt); len(got) != 1 {
		t.Errorf("after a move cut short, the new root holds goldens %v, want the first one moved", got)
	}
	e.open()
	if !strings.Contains(e.logs.String(), "the old storage root's image is no longer used") {
		t.Errorf("the reverted start did not empty and unmount the image")
	}
	if got := goldenDirs(t, data); !equalMaps(got, goldens) {
		t.Errorf("after a move cut short and reverted, the old root holds goldens %v, want %v", got, goldens)
	}
	if isMountPoint(t, mnt) {
		t.Errorf("the emptied image is still mounted on %s", mnt)
	}
	e.checkGoldens(goldens, data, alice)

	// 3. The switch to the image (issue 12's case): every golden moves.
	// The server before it was killed and left a golden's spare running.
	e.close()
	cmd, out := e.child(childOp{Op: "open-spare"}, e.cfgPath)
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	for deadline := time.Now().Add(2 * time.Minute); !strings.Contains(out.String(), "child: spare ready\n"); time.Sleep(20 * time.Millisecond) {
		select {
		case <-exited:
			t.Fatalf("the child exited before it had a spare:\n%s", lastLines(out.String(), 30))
		default:
		}
		if time.Now().After(deadline) {
			cmd.Process.Kill()
			t.Fatalf("the child made no spare:\n%s", lastLines(out.String(), 30))
		}
	}
	cmd.Process.Kill()
	<-exited
	if !oldRootInUse(t, data) {
		t.Fatalf("no spare runs from the old root after the child was killed")
	}
	e.cfg = imageCfg
	e.open()
	if oldRootInUse(t, data) {
		t.Errorf("a VMM still uses the old root after the switch")
	}
	if got := goldenDirs(t, mnt); !equalMaps(got, goldens) {
		t.Errorf("the new root holds goldens %v, want %v", got, goldens)
	}
	assertNothingLeft(t, data)
	if d := e.mgr.StorageDecision(); d.Resolved() != "reflink-image" || d.Mode != storage.ModeReflink || e.mgr.copier.NoReflink {
		t.Errorf("storage on the image resolved to %+v (FICLONE off: %v)", d, e.mgr.copier.NoReflink)
	}
	for _, want := range []string{"golden snapshot moved to the new storage root", "base image moved to the new storage root", "storage: copies are reflinks"} {
		if !strings.Contains(e.logs.String(), want) {
			t.Errorf("the log does not say %q", want)
		}
	}
	// The moved goldens still link one base image, now the new root's,
	// and the backup still shares the golden's layers.
	sys := filepath.Join(mnt, "golden", "1x256")
	bottom := inode(t, filepath.Join(sys, "disk-0000.raw"))
	pins, _ := filepath.Glob(filepath.Join(mnt, "bases", "*.raw"))
	if len(pins) != 1 || inode(t, pins[0]) != bottom {
		t.Errorf("the system golden's base is not the new root's pin %v", pins)
	}
	for rel := range goldens {
		if inode(t, filepath.Join(mnt, rel, "disk-0000.raw")) != bottom {
			t.Errorf("golden %s does not share the base image after the move", rel)
		}
	}
	e.checkGoldens(goldens, mnt, alice)
	// The golden view came along: the new root shows it (the old one
	// holds nothing of it, see assertNothingLeft).
	waitGoldenView(t, filepath.Join(mnt, "golden"))
	if v := e.create("after"); v.BootPath != "golden" || v.Source != "golden:system:1x256" {
		t.Errorf("a create after the switch: boot %s (%s), source %q", v.BootPath, v.BootReason, v.Source)
	}
	if got := e.mustExec("after", "cat", "/root/mark"); got != "system\n" {
		t.Errorf("the VM from the moved system golden has %q", got)
	}
	e.user = alice
	if v := e.create("a2"); v.BootPath != "golden" || v.Source != "golden:user:1x256" {
		t.Errorf("alice's create after the switch: boot %s (%s), source %q", v.BootPath, v.BootReason, v.Source)
	}
	if got := e.mustExec("a2", "cat", "/root/mark"); got != "alice\n" {
		t.Errorf("the VM from alice's moved golden has %q", got)
	}
	if _, err := e.mgr.DestroyVM(tctx(t), alice, "a2"); err != nil {
		t.Fatal(err)
	}
	e.user = root
	if _, err := e.mgr.DestroyVM(tctx(t), root, "after"); err != nil {
		t.Fatal(err)
	}

	// 4. After a reboot (the image is not mounted), switching back
	// mounts the image to empty it, and unmounts it.
	e.close()
	if err := storage.TeardownReflinkLoop(tctx(t), mnt); err != nil {
		t.Fatal(err)
	}
	e.cfg = plainCfg
	e.open()
	if got := goldenDirs(t, data); !equalMaps(got, goldens) {
		t.Errorf("switching back: the data dir holds goldens %v, want %v", got, goldens)
	}
	if isMountPoint(t, mnt) {
		t.Errorf("the image is still mounted on %s after switching back", mnt)
	}
	e.checkGoldens(goldens, data, alice)
	waitGoldenView(t, filepath.Join(data, "golden"))
}

// waitGoldenView waits until root (a storage root's golden/) shows the
// system golden 1x256 in the seed's layout, every link resolving.
func waitGoldenView(t *testing.T, root string) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for {
		links, vc := viewState(t, root)
		ok := vc != nil && vc.View == "1x256" && links[vmm.SnapMemory] == "1x256/"+vmm.SnapMemory && links[vmm.SnapState] == "1x256/"+vmm.SnapState
		for _, v := range links {
			ok = ok && v != "-" && !strings.Contains(v, "dangling")
		}
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s does not show the golden view: %v %+v", root, links, vc)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// goldenDirs maps the golden directories under a storage root (system,
// users', backups) to their config.json.
func goldenDirs(t *testing.T, root string) map[string]string {
	t.Helper()
	out := map[string]string{}
	for _, pattern := range []string{"golden/*", "golden/.backup/*", "users/*/golden/*", "users/*/golden/.backup/*"} {
		dirs, _ := filepath.Glob(filepath.Join(root, pattern))
		for _, d := range dirs {
			b, err := os.ReadFile(filepath.Join(d, vmm.GoldenConfig))
			if err != nil {
				continue
			}
			rel, _ := filepath.Rel(root, d)
			out[rel] = string(b)
		}
	}
	return out
}

func equalMaps(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || v != w {
			return false
		}
	}
	return true
}

// checkGoldens checks that each golden (relative to root) is whole (its
// files match their recorded checksums) and that the manager lists the
// live ones to their owners, fresh.
func (e *env) checkGoldens(goldens map[string]string, root string, alice *store.User) {
	e.t.Helper()
	ctx := tctx(e.t)
	for rel := range goldens {
		if _, err := e.mgr.verifySnapshot(ctx, filepath.Join(root, rel), rel); err != nil {
			e.t.Errorf("golden %s is not whole: %v", rel, err)
		}
	}
	for _, u := range []*store.User{e.user, alice} {
		gs, err := e.mgr.ListGolden(ctx, u)
		var owners []string
		for _, g := range gs {
			if g.Stale {
				e.t.Errorf("%s's golden of %s is stale: %s", u.Name, g.Owner, g.StaleWhy)
			}
			owners = append(owners, g.Owner)
		}
		sort.Strings(owners)
		want := "system"
		if u == alice {
			want = "alice system"
		}
		if err != nil || strings.Join(owners, " ") != want {
			e.t.Errorf("%s lists goldens of %v (%v), want %s", u.Name, owners, err, want)
		}
	}
}

// assertNothingLeft checks that the old storage root data holds nothing
// of noid's storage any more: no golden, base image, spare, or user
// directory.
func assertNothingLeft(t *testing.T, data string) {
	t.Helper()
	for _, d := range []string{"golden", "bases", "pool", "users", movingDir} {
		if _, err := os.Stat(filepath.Join(data, d)); !errors.Is(err, fs.ErrNotExist) {
			ents, _ := os.ReadDir(filepath.Join(data, d))
			t.Errorf("the old storage root still has %s/ (%v): %v", d, err, ents)
		}
	}
	b, err := os.ReadFile(filepath.Join(data, storageRootFile))
	if err != nil || bytes.Contains(b, []byte("moving_from")) {
		t.Errorf("the storage root record %q (%v) still names a root to move from", b, err)
	}
}

// oldRootInUse reports whether a VMM runs with files of the storage root
// data (a spare's or a VM's directory), leaving out the image mounted
// below it.
func oldRootInUse(t *testing.T, data string) bool {
	t.Helper()
	ps, _ := exec.Command("pgrep", "-af", "qemu-system").Output()
	for _, l := range strings.Split(string(ps), "\n") {
		if strings.Contains(l, data+"/pool/") || strings.Contains(l, data+"/users/") {
			return true
		}
	}
	return false
}

func inode(t *testing.T, path string) uint64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

// isMountPoint reports whether path is a mount point, from mountinfo.
func isMountPoint(t *testing.T, path string) bool {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	re := regexp.MustCompile(`^\S+ \S+ \S+ \S+ (\S+) `)
	for _, l := range strings.Split(string(b), "\n") {
		if m := re.FindStringSubmatch(l); m != nil && m[1] == path {
			return true
		}
	}
	return false
}

// TestPlanStorageSwitch decides from a real store and record, without
// VMMs: a record written by an older noid (the root's path alone) is read,
// its loop image inferred; a moved root is refused while the store holds
// VMs of any user, naming how many and a few; with none it plans to empty
// the old root, and an unchanged root plans nothing.
func TestPlanStorageSwitch(t *testing.T) {
	ctx := tctx(t)
	dir := t.TempDir()
	load := func(extra string) *config.Config {
		c, err := config.Parse([]byte("data_dir = \"" + dir + "\"\n" + extra))
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	plain, onImage := load(""), load("[storage]\nreflink_image_size = \"2G\"\n")
	st, err := store.Open(ctx, filepath.Join(dir, "noid.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()

	// A new data dir: nothing to do.
	if sw, err := planStorageSwitch(ctx, plain, st); err != nil || sw.recorded != nil || len(sw.from) != 0 {
		t.Fatalf("a new data dir: %+v, %v", sw, err)
	}
	// An older noid's record of the loop mount; its image exists.
	if err := os.WriteFile(filepath.Join(dir, storageRootFile), []byte(filepath.Join(dir, "reflink")+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(onImage.Storage.ReflinkImage, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	sw, err := planStorageSwitch(ctx, plain, st)
	if err != nil || len(sw.from) != 1 || sw.from[0] != (storageRoot{Dir: filepath.Join(dir, "reflink"), Image: onImage.Storage.ReflinkImage}) {
		t.Fatalf("switching off the image with no VM: %+v, %v", sw, err)
	}
	if sw, err := planStorageSwitch(ctx, onImage, st); err != nil || len(sw.from) != 0 {
		t.Fatalf("an unchanged root: %+v, %v", sw, err)
	}

	// VMs of two users, one of them half-destroyed, live in the old root.
	alice, _, err := st.CreateUser(ctx, "alice", false)
	if err != nil {
		t.Fatal(err)
	}
	bob, _, err := st.CreateUser(ctx, "bob", false)
	if err != nil {
		t.Fatal(err)
	}
	for i, v := range []*store.VM{
		{UserID: alice.ID, Name: "web", State: store.StateRunning},
		{UserID: bob.ID, Name: "db", State: store.StateDestroying},
		{UserID: alice.ID, Name: "w2", State: store.StateDead},
		{UserID: bob.ID, Name: "w3", State: store.StateRunning},
		{UserID: bob.ID, Name: "w4", State: store.StateRunning},
	} {
		v.ID, v.VCPUs, v.MemoryMiB, v.VMM = "id"+string(rune('a'+i)), 1, 256, "qemu"
		v.CreatedAt = time.Now().Add(time.Duration(i) * time.Second)
		if err := st.CreateVM(ctx, v, store.CreateOpts{}); err != nil {
			t.Fatal(err)
		}
	}
	_, err = planStorageSwitch(ctx, plain, st)
	if !errors.Is(err, errdefs.ErrConflict) {
		t.Fatalf("switching under VMs: %v, want a conflict", err)
	}
	for _, want := range []string{"from " + filepath.Join(dir, "reflink") + " to " + dir, "5 VMs still have their files",
		"alice/web, bob/db (destroying), alice/w2 (dead), and 2 more"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("the refusal %q does not say %q", err, want)
		}
	}
	if h := errdefs.HintOf(err); !strings.Contains(h, "revert [storage]") || !strings.Contains(h, "noid destroy") {
		t.Errorf("the refusal's hint %q", h)
	}

	// A move cut short is finished by the next start, even reverted: the
	// record names both roots, and neither is refused for VMs (none can
	// have been made meanwhile).
	for _, v := range []string{"ida", "idb", "idc", "idd", "ide"} {
		if err := st.DeleteVM(ctx, v); err != nil {
			t.Fatal(err)
		}
	}
	rec := rootRecord{storageRoot: storageRoot{Dir: dir}, MovingFrom: []storageRoot{{Dir: filepath.Join(dir, "reflink"), Image: onImage.Storage.ReflinkImage}}}
	if err := writeRootRecord(dir, rec); err != nil {
		t.Fatal(err)
	}
	if sw, err := planStorageSwitch(ctx, plain, st); err != nil || len(sw.from) != 1 || sw.from[0].Dir != filepath.Join(dir, "reflink") {
		t.Errorf("finishing a move: %+v, %v", sw, err)
	}
	if sw, err := planStorageSwitch(ctx, onImage, st); err != nil || len(sw.from) != 1 || sw.from[0].Dir != dir {
		t.Errorf("reverting a move cut short: %+v, %v", sw, err)
	}
}

// TestMoveGoldenKeepsBoth: where the new root already has another golden
// of the same name, it keeps it and the moved one becomes a backup there;
// a second move of the same golden (a start that crashed before removing
// the old copy) adds no second backup.
func TestMoveGoldenKeepsBoth(t *testing.T) {
	oldRoot, newRoot := t.TempDir(), t.TempDir()
	write := func(dir, config, disk string) {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			t.Fatal(err)
		}
		for name, content := range map[string]string{vmm.GoldenConfig: config, "disk-0001.qcow2": disk} {
			if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o600); err != nil {
				t.Fatal(err)
			}
		}
	}
	write(filepath.Join(newRoot, "golden", "1x256"), `{"promoted_at":"new"}`, "new disk")
	m := &Manager{log: slog.New(slog.NewTextHandler(&logBuf{}, nil)), copier: &storage.Copier{}}
	mv := &rootMove{m: m, from: storageRoot{Dir: oldRoot}, to: storageRoot{Dir: newRoot}, copier: &storage.Copier{Sync: true},
		pins: map[fileKey]string{}, moved: map[fileKey]string{}}
	for i := range 2 {
		write(filepath.Join(oldRoot, "golden", "1x256"), `{"promoted_at":"old"}`, "old disk")
		if err := mv.moveTree(tctx(t), "golden"); err != nil {
			t.Fatal(err)
		}
		if _, err := os.Stat(filepath.Join(oldRoot, "golden")); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("move %d left the old golden: %v", i, err)
		}
		if b, _ := os.ReadFile(filepath.Join(newRoot, "golden", "1x256", "disk-0001.qcow2")); string(b) != "new disk" {
			t.Errorf("move %d replaced the new root's golden: %q", i, b)
		}
		backups, _ := filepath.Glob(filepath.Join(newRoot, "golden", ".backup", "1x256-moved-*"))
		if len(backups) != 1 {
			t.Fatalf("move %d: backups %v, want the moved golden once", i, backups)
		}
		if b, _ := os.ReadFile(filepath.Join(backups[0], "disk-0001.qcow2")); string(b) != "old disk" {
			t.Errorf("move %d: the backup holds %q", i, b)
		}
	}
	if ents, _ := os.ReadDir(filepath.Join(newRoot, movingDir)); len(ents) != 0 {
		t.Errorf("temporary directories left: %v", ents)
	}
}
