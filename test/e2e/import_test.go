//go:build e2e

package e2e

import (
	"bytes"
	"crypto/sha256"
	"database/sql"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	_ "modernc.org/sqlite"

	"github.com/noid-vm/noid/client"
	"github.com/noid-vm/noid/internal/testutil"
)

// legacySchema is the SQLite schema of the original Rust noid (noid-cli
// 0.2), as it creates it in ~/.noid/noid.db.
const legacySchema = `
CREATE TABLE IF NOT EXISTS users (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    token_hash TEXT NOT NULL,
    created_at TEXT NOT NULL DEFAULT (datetime('now'))
);
CREATE TABLE IF NOT EXISTS vms (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id TEXT NOT NULL REFERENCES users(id),
    name TEXT NOT NULL,
    pid INTEGER,
    socket_path TEXT NOT NULL,
    kernel TEXT NOT NULL,
    rootfs TEXT NOT NULL,
    cpus INTEGER NOT NULL DEFAULT 1,
    mem_mib INTEGER NOT NULL DEFAULT 2048,
    state TEXT NOT NULL DEFAULT 'running',
    created_at TEXT NOT NULL DEFAULT (datetime('now')),
    net_index INTEGER,
    tap_name TEXT,
    guest_ip TEXT,
    UNIQUE(user_id, name)
);
CREATE TABLE IF NOT EXISTS checkpoints (
    id TEXT PRIMARY KEY,
    vm_name TEXT NOT NULL,
    user_id TEXT NOT NULL,
    label TEXT,
    snapshot_path TEXT NOT NULL,
    created_at TEXT NOT NULL DEFAULT (datetime('now')),
    FOREIGN KEY (user_id, vm_name) REFERENCES vms(user_id, name)
);`

// goldenView waits until dir (a storage root's golden/) shows the seed's
// four files and returns its config.json.
func goldenView(t *testing.T, dir string) map[string]any {
	t.Helper()
	want := []string{"config.json", "memory.snap", "rootfs.ext4", "vmstate.snap"}
	deadline := time.Now().Add(2 * time.Minute)
	for {
		var have []string
		ents, _ := os.ReadDir(dir)
		for _, e := range ents {
			if _, err := os.Stat(filepath.Join(dir, e.Name())); err == nil && !e.IsDir() {
				have = append(have, e.Name())
			}
		}
		sort.Strings(have)
		if strings.Join(have, " ") == strings.Join(want, " ") {
			var c map[string]any
			b, _ := os.ReadFile(filepath.Join(dir, "config.json"))
			if err := json.Unmarshal(b, &c); err != nil {
				t.Fatalf("golden view config.json: %v: %s", err, b)
			}
			return c
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s shows %v, want the seed's files %v", dir, have, want)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// treeDigest digests every file of dir: names, modes, sizes, mtimes and
// contents, so that a change anywhere shows.
func treeDigest(t *testing.T, dir string) string {
	t.Helper()
	h := sha256.New()
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		fmt.Fprintf(h, "%s %v %d %d\n", p, fi.Mode(), fi.Size(), fi.ModTime().UnixNano())
		if fi.Mode().IsRegular() {
			f, err := os.Open(p)
			if err != nil {
				return err
			}
			defer f.Close()
			io.Copy(h, f)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

func copyFile(t *testing.T, src, dst string) {
	t.Helper()
	in, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out, err := os.Create(dst)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestImportFromOriginalNoid builds a data dir in the original Rust noid's
// layout (its SQLite schema, a user with a token hash, a VM with a
// Firecracker checkpoint, a flat golden made from a real golden of this
// noid) and imports it into a fresh server: the token authenticates, the
// golden serves creates, the old dir is unchanged, a second import brings
// nothing new, and both servers' golden/ show the seed's four files.
func TestImportFromOriginalNoid(t *testing.T) {
	c := ctx(t)
	// A real golden of ours, and the seed's view of it.
	src := NewEnv(t)
	src.Create("base")
	src.MustExec("base", "sh", "-c", "echo one > /root/mark; sync")
	src.MustCLI("checkpoint", "base", "one")
	src.MustCLI("golden", "promote", "base", "one")
	view := filepath.Join(src.Dir, "data", "golden")
	first := goldenView(t, view)
	if first["cpus"] != 1.0 || first["mem_mib"] != 256.0 || first["view"] != "1x256" || first["rootfs"] != "flattened" {
		t.Errorf("golden view config.json: %v", first)
	}
	// The golden is replaced: the view follows (its disk is a chain of
	// layers, so rootfs.ext4 is remade from the new one).
	src.MustExec("base", "sh", "-c", "echo two > /root/mark; sync")
	src.MustCLI("checkpoint", "base", "two")
	src.MustCLI("golden", "promote", "base", "two")
	for deadline := time.Now().Add(2 * time.Minute); goldenView(t, view)["promoted_at"] == first["promoted_at"]; time.Sleep(100 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the golden view still shows the replaced golden")
		}
	}
	if target, err := os.Readlink(filepath.Join(view, "memory.snap")); err != nil || target != "1x256/memory.snap" {
		t.Errorf("view memory.snap: %q %v", target, err)
	}

	// The original's ~/.noid.
	old := filepath.Join(t.TempDir(), ".noid")
	if err := os.MkdirAll(filepath.Join(old, "golden"), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"rootfs.ext4", "memory.snap", "vmstate.snap"} {
		copyFile(t, filepath.Join(view, f), filepath.Join(old, "golden", f))
	}
	os.WriteFile(filepath.Join(old, "golden", "config.json"), []byte(`{"cpus": 1, "mem_mib": 256}`), 0o644)
	cpDir := filepath.Join(old, "storage", "users", "u-1", "checkpoints", "web", "a1b2c3d4e5f67890")
	os.MkdirAll(cpDir, 0o755)
	os.WriteFile(filepath.Join(cpDir, "vmstate.snap"), []byte("\x00\x01firecracker state"), 0o644)
	token := "noid_tok_" + strings.Repeat("5a", 32)
	sum := sha256.Sum256([]byte(token))
	db, err := sql.Open("sqlite", "file:"+filepath.Join(old, "noid.db"))
	if err != nil {
		t.Fatal(err)
	}
	for _, q := range []string{legacySchema,
		`INSERT INTO users (id, name, token_hash) VALUES ('u-1', 'alice', '` + hex.EncodeToString(sum[:]) + `')`,
		`INSERT INTO vms (user_id, name, pid, socket_path, kernel, rootfs, tap_name) VALUES ('u-1', 'web', 4242, '/x/firecracker.sock', '/x/vmlinux', '/x/rootfs.ext4', 'noid0')`,
		`INSERT INTO checkpoints (id, vm_name, user_id, label, snapshot_path) VALUES ('a1b2c3d4e5f67890', 'web', 'u-1', 'golden-ready', '` + cpDir + `')`,
	} {
		if _, err := db.Exec(q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	db.Close()
	before := treeDigest(t, old)

	dst := NewEnv(t)
	if r := dst.ServerCLI("import", "--from", old); r.Code == 0 || !strings.Contains(r.Stderr, "cannot run while noid-server") {
		t.Errorf("import next to a running server: exit %d\n%s%s", r.Code, r.Stdout, r.Stderr)
	}
	dst.Stop()
	r := dst.ServerCLI("import", "--from", old)
	if r.Code != 0 {
		t.Fatalf("import: exit %d\n%s%s", r.Code, r.Stdout, r.Stderr)
	}
	t.Logf("import:\n%s", r.Stdout)
	for _, want := range []string{"user alice (its token keeps working)", "golden snapshot 1x256", "checkpoint a1b2c3d4e5f67890 (golden-ready) of vm web of user alice: a firecracker snapshot", "vm web of user alice", "iptables -t nat -D POSTROUTING"} {
		if !strings.Contains(r.Stdout, want) {
			t.Errorf("import report lacks %q", want)
		}
	}
	if strings.Contains(r.Stdout, "nothing new") {
		t.Errorf("the first import says it imported nothing")
	}
	again := dst.ServerCLI("import", "--from", old)
	if again.Code != 0 || !strings.Contains(again.Stdout, "nothing new to import") || !strings.Contains(again.Stdout, "imported by an earlier run:\n  user alice") {
		t.Errorf("second import: exit %d\n%s%s", again.Code, again.Stdout, again.Stderr)
	}
	if after := treeDigest(t, old); after != before {
		t.Errorf("the import changed the old data dir")
	}
	dst.Start()

	// The imported token authenticates; a wrong one still does not.
	if r := dst.CLIAs(token, "list"); r.Code != 0 {
		t.Fatalf("list with the imported token: exit %d: %s", r.Code, r.Stderr)
	}
	if r := dst.CLIAs("noid_tok_"+strings.Repeat("5b", 32), "list"); r.Code == 0 {
		t.Errorf("a wrong token was accepted")
	}
	alice, err := client.New("unix://"+dst.Socket, token)
	if err != nil {
		t.Fatal(err)
	}
	vm, err := alice.CreateVM(c, client.CreateVMRequest{Name: "w1"})
	if err != nil {
		t.Fatalf("create from the imported golden: %v\n%s", err, lastLines(dst.Log(), 30))
	}
	if vm.BootPath != "golden" {
		t.Errorf("create as alice: boot path %q (%s), want golden", vm.BootPath, vm.BootReason)
	}
	if r := dst.CLIAs(token, "exec", "w1", "--", "echo", "from-golden"); r.Code != 0 || r.Stdout != "from-golden\n" {
		t.Errorf("exec in the VM from the imported golden: exit %d %q %s", r.Code, r.Stdout, r.Stderr)
	}
	// The disk is the replaced golden's, layers and all (read from the
	// disk, not from the page cache the restored memory holds).
	if r := dst.CLIAs(token, "exec", "w1", "--", "sh", "-c", "echo 3 > /proc/sys/vm/drop_caches && cat /root/mark"); r.Stdout != "two\n" {
		t.Errorf("the VM from the imported golden has mark %q (exit %d %s), want two", r.Stdout, r.Code, r.Stderr)
	}
	if vc := goldenView(t, filepath.Join(dst.Dir, "data", "golden")); vc["cpus"] != 1.0 || vc["mem_mib"] != 256.0 || vc["rootfs"] != "link" {
		t.Errorf("imported golden view config.json: %v", vc)
	}
}

// TestStartNextToOriginalNetd starts noid-server, networking on with the
// defaults, in a namespace that holds the original noid-netd's leftovers
// (TAPs noid0 and noid3, the latter with its /30 of 172.16.0.0/16): the
// start is refused with a hint naming them and the commands that remove
// them, and the TAPs are left as they were.
func TestStartNextToOriginalNetd(t *testing.T) {
	ns := newNamespace(t)
	err := inNetNS(ns, func() error {
		for _, name := range []string{"noid0", "noid3"} {
			if err := netlink.LinkAdd(&netlink.Tuntap{LinkAttrs: netlink.LinkAttrs{Name: name}, Mode: netlink.TUNTAP_MODE_TAP}); err != nil {
				return err
			}
		}
		l, err := netlink.LinkByName("noid3")
		if err != nil {
			return err
		}
		netlink.LinkSetUp(l)
		return netlink.AddrAdd(l, &netlink.Addr{IPNet: &net.IPNet{IP: net.IPv4(172, 16, 0, 13), Mask: net.CIDRMask(30, 32)}})
	})
	if err != nil {
		t.Fatal(err)
	}
	bins := testutil.Build(t)
	dir := t.TempDir()
	cfg := filepath.Join(dir, "config.toml")
	os.WriteFile(cfg, []byte(configTOML(filepath.Join(dir, "data"), filepath.Join(dir, "noid.sock"), testutil.TinyImage(t), "[network]\nenabled = true\n")), 0o600)
	cmd := exec.Command(bins.Server, "serve", "--config", cfg)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := startInNetNS(ns, cmd); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err = <-done:
	case <-time.After(2 * time.Minute):
		cmd.Process.Kill()
		<-done
		t.Fatalf("noid-server did not stop next to noid-netd's TAPs:\n%s", out.String())
	}
	if err == nil || !strings.Contains(out.String(), "hint: the original noid's noid-netd left TAPs noid0, noid3") ||
		!strings.Contains(out.String(), "ip link delete noid0; ip link delete noid3") {
		t.Errorf("start next to noid-netd's TAPs: %v\n%s", err, lastLines(out.String(), 10))
	}
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	for _, name := range []string{"noid0", "noid3"} {
		if l, err := h.LinkByName(name); err != nil || l.Type() != "tuntap" {
			t.Errorf("%s after the start: %v", name, err)
		}
	}
}
