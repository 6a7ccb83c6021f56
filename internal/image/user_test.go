package image

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/noid-vm/noid/internal/errdefs"
)

// writeTree creates files (path → content) under a new directory; a path
// ending in "/" is a directory.
func writeTree(t *testing.T, files map[string]string) string {
	t.Helper()
	tree := t.TempDir()
	for p, content := range files {
		full := filepath.Join(tree, p)
		if strings.HasSuffix(p, "/") {
			if err := os.MkdirAll(full, 0o755); err != nil {
				t.Fatal(err)
			}
			continue
		}
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(full, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return tree
}

func readTree(t *testing.T, tree, p string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(tree, p))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestAddGuestUserDebian(t *testing.T) {
	tree := writeTree(t, map[string]string{
		"etc/passwd":           "root:x:0:0:root:/root:/bin/bash\n_apt:x:42:65534::/nonexistent:/usr/sbin/nologin\n",
		"etc/group":            "root:x:0:\nsudo:x:27:\nadm:x:4:\n",
		"etc/gshadow":          "root:*::\nsudo:*::\n",
		"etc/shadow":           "root:*:19000:0:99999:7:::\n",
		"etc/skel/.bashrc":     "# bashrc\n",
		"etc/skel/.config/x":   "x\n",
		"etc/sudoers.d/README": "",
		"bin/bash":             "",
	})
	os.Chmod(filepath.Join(tree, "bin/bash"), 0o755)
	os.Chmod(filepath.Join(tree, "etc/shadow"), 0o640)
	if err := addGuestUser(tree); err != nil {
		t.Fatal(err)
	}
	for file, want := range map[string]string{
		"etc/passwd":          "root:x:0:0:root:/root:/bin/bash\n_apt:x:42:65534::/nonexistent:/usr/sbin/nologin\nnoid:x:1000:1000:noid:/home/noid:/bin/bash\n",
		"etc/group":           "root:x:0:\nsudo:x:27:noid\nadm:x:4:\nnoid:x:1000:\n",
		"etc/gshadow":         "root:*::\nsudo:*::noid\nnoid:!::\n",
		"etc/shadow":          "root:*:19000:0:99999:7:::\nnoid:*::0:99999:7:::\n",
		"etc/sudoers.d/noid":  "noid ALL=(ALL:ALL) NOPASSWD: ALL\n",
		"home/noid/.bashrc":   "# bashrc\n",
		"home/noid/.config/x": "x\n",
	} {
		if got := readTree(t, tree, file); got != want {
			t.Errorf("%s:\n%s\nwant:\n%s", file, got, want)
		}
	}
	for p, mode := range map[string]os.FileMode{"etc/shadow": 0o640, "etc/sudoers.d/noid": 0o440, "home/noid": 0o700 | os.ModeDir} {
		fi, err := os.Stat(filepath.Join(tree, p))
		if err != nil || fi.Mode() != mode {
			t.Errorf("%s: mode %v (%v), want %v", p, fi.Mode(), err, mode)
		}
	}
	if os.Geteuid() == 0 {
		for _, p := range []string{"home/noid", "home/noid/.bashrc", "home/noid/.config", "home/noid/.config/x"} {
			fi, _ := os.Stat(filepath.Join(tree, p))
			if st := fi.Sys().(*syscall.Stat_t); st.Uid != GuestUID || st.Gid != GuestUID {
				t.Errorf("%s owned by %d:%d", p, st.Uid, st.Gid)
			}
		}
	}
	// A second run finds the user and changes nothing.
	before := readTree(t, tree, "etc/group")
	if err := addGuestUser(tree); err != nil || readTree(t, tree, "etc/group") != before {
		t.Fatalf("second run: %v\n%s", err, readTree(t, tree, "etc/group"))
	}
}

func TestAddGuestUserTinyAndConflicts(t *testing.T) {
	// The busybox tree: no bash, gshadow, skel, sudo or sudo group.
	tree := writeTree(t, map[string]string{
		"etc/passwd": "root:x:0:0:root:/root:/bin/sh\n",
		"etc/group":  "root:x:0:\n",
		"etc/shadow": "root:*:19000:0:99999:7:::\n",
	})
	if err := addGuestUser(tree); err != nil {
		t.Fatal(err)
	}
	if got := readTree(t, tree, "etc/passwd"); !strings.HasSuffix(got, "\nnoid:x:1000:1000:noid:/home/noid:/bin/sh\n") {
		t.Errorf("passwd: %q", got)
	}
	if got := readTree(t, tree, "etc/group"); got != "root:x:0:\nnoid:x:1000:\n" {
		t.Errorf("group: %q", got)
	}
	for _, p := range []string{"etc/gshadow", "etc/sudoers.d"} {
		if _, err := os.Stat(filepath.Join(tree, p)); !os.IsNotExist(err) {
			t.Errorf("%s created: %v", p, err)
		}
	}
	if fi, err := os.Stat(filepath.Join(tree, "home/noid")); err != nil || !fi.IsDir() {
		t.Errorf("home: %v", err)
	}
	// uid 1000 taken by someone else: an error, not a second uid 1000.
	tree = writeTree(t, map[string]string{"etc/passwd": "root:x:0:0::/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n", "etc/group": "", "etc/shadow": ""})
	if err := addGuestUser(tree); err == nil || !strings.Contains(err.Error(), `uid 1000 is taken by "alice"`) {
		t.Errorf("uid conflict: %v", err)
	}
}

func TestSlimTree(t *testing.T) {
	tree := writeTree(t, map[string]string{
		"usr/share/doc/curl/copyright":            "c",
		"usr/share/doc/curl/changelog.Debian.gz":  "x",
		"usr/share/doc/curl/examples/a.c":         "x",
		"usr/share/man/man1/curl.1.gz":            "x",
		"usr/share/locale/locale.alias":           "alias",
		"usr/share/locale/de/LC_MESSAGES/curl.mo": "x",
		"usr/share/info/":                         "",
		"usr/share/zoneinfo/UTC":                  "keep",
		"usr/share/python3/debian_defaults":       "keep",
	})
	if err := slimTree(tree); err != nil {
		t.Fatal(err)
	}
	var left []string
	filepath.Walk(filepath.Join(tree, "usr"), func(p string, fi os.FileInfo, err error) error {
		if err == nil && !fi.IsDir() {
			rel, _ := filepath.Rel(tree, p)
			left = append(left, rel)
		}
		return nil
	})
	want := "usr/share/doc/curl/copyright usr/share/locale/locale.alias usr/share/python3/debian_defaults usr/share/zoneinfo/UTC"
	if strings.Join(left, " ") != want {
		t.Errorf("left %v, want %s", left, want)
	}
	for _, gone := range []string{"usr/share/doc/curl/examples", "usr/share/man/man1", "usr/share/locale/de"} {
		if _, err := os.Stat(filepath.Join(tree, gone)); !os.IsNotExist(err) {
			t.Errorf("%s still there: %v", gone, err)
		}
	}
	if cfg := readTree(t, tree, "etc/dpkg/dpkg.cfg.d/noid-slim"); !strings.Contains(cfg, "path-exclude=/usr/share/doc/*\npath-include=/usr/share/doc/*/copyright\n") {
		t.Errorf("dpkg config: %s", cfg)
	}
}

// TestRootfsSourceKeyFollowsPackages: the debootstrap tarball and the
// rootfs key change with the package list (not with its order or
// duplicates), and bad package names are refused.
func TestRootfsSourceKeyFollowsPackages(t *testing.T) {
	src := func(pkgs []string) (*rootfsSource, error) {
		b := &builder{opts: BuildOptions{Suite: DefaultSuite, Packages: pkgs, RootfsSize: DefaultDebianRootfsSize}, root: t.TempDir()}
		return b.rootfsSource(context.Background())
	}
	def, err := src(DefaultPackages)
	if err != nil {
		t.Fatal(err)
	}
	shuffled, err := src(append([]string{"sudo", "curl"}, DefaultPackages...))
	if err != nil {
		t.Fatal(err)
	}
	more, err := src(append(append([]string{}, DefaultPackages...), "git"))
	if err != nil {
		t.Fatal(err)
	}
	if def.info.Source != shuffled.info.Source || filepath.Base(def.tarball) != filepath.Base(shuffled.tarball) {
		t.Errorf("order or duplicates changed the key: %s vs %s", def.info.Source, shuffled.info.Source)
	}
	if def.info.Source == more.info.Source || filepath.Base(def.tarball) == filepath.Base(more.tarball) {
		t.Errorf("adding git did not change the key")
	}
	if !slices.Contains(more.info.Packages, "git") || !slices.IsSorted(more.info.Packages) {
		t.Errorf("packages %v", more.info.Packages)
	}
	for _, bad := range []string{"", "Git", "a b", "a,b", "-x", "x", "pkg=1.0", "../x"} {
		if _, err := src([]string{"curl", bad}); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("package %q: %v", bad, err)
		}
	}
	if err := CheckPackageNames([]string{"g++", "libc6:amd64", "python3.11", "build-essential"}); err != nil {
		t.Error(err)
	}
}
