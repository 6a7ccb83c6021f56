package guest

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/noid-vm/noid/internal/agent/proto"
)

const testPasswd = `root:x:0:0:root:/root:/bin/bash
# a comment
+nisuser::::::
broken:x:notanumber:0::/:/bin/sh
short:x:5
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
noid:x:1000:1000:noid:/home/noid:/bin/bash
dup:x:1000:1000:second entry with uid 1000:/home/dup:/bin/sh
`

const testGroup = `root:x:0:
sudo:x:27:noid
adm:x:4:syslog,noid
users:x:100:
noid:x:1000:
bad:x:zz:noid
`

func writeEtc(t *testing.T, passwd, group string) string {
	t.Helper()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "passwd"), []byte(passwd), 0o644); err != nil {
		t.Fatal(err)
	}
	if group != "" {
		if err := os.WriteFile(filepath.Join(dir, "group"), []byte(group), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func TestLookupUser(t *testing.T) {
	etc := writeEtc(t, testPasswd, testGroup)
	u, err := lookupUser(etc, "noid")
	if err != nil {
		t.Fatal(err)
	}
	want := &guestUser{Name: "noid", UID: 1000, GID: 1000, Groups: []uint32{1000, 27, 4}, Home: "/home/noid", Shell: "/bin/bash"}
	if !reflect.DeepEqual(u, want) {
		t.Fatalf("noid = %+v, want %+v", u, want)
	}
	// A numeric name is a uid; the first entry with it wins, and a name
	// match wins over a uid match.
	if u, err := lookupUser(etc, "1000"); err != nil || u.Name != "noid" {
		t.Fatalf("uid 1000 = %+v, %v", u, err)
	}
	if u, err := lookupUser(etc, "1"); err != nil || u.Name != "daemon" || !reflect.DeepEqual(u.Groups, []uint32{1}) {
		t.Fatalf("uid 1 = %+v, %v", u, err)
	}
	for _, name := range []string{"nobody", "broken", "short", "+nisuser", "4242", ""} {
		if u, err := lookupUser(etc, name); !errors.Is(err, errNoUser) {
			t.Errorf("lookup %q = %+v, %v; want errNoUser", name, u, err)
		}
	}
	// Without /etc/group a user has its primary group only.
	etc = writeEtc(t, testPasswd, "")
	if u, err := lookupUser(etc, "noid"); err != nil || !reflect.DeepEqual(u.Groups, []uint32{1000}) {
		t.Fatalf("without /etc/group: %+v, %v", u, err)
	}
	// Without /etc/passwd nobody is known.
	if _, err := lookupUser(t.TempDir(), "root"); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("without /etc/passwd: %v", err)
	}
}

func TestMayReach(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to create directories owned by other users")
	}
	base := t.TempDir()
	// t.TempDir's parent is private (0700): open both to everyone.
	for _, d := range []string{filepath.Dir(base), base} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for _, d := range []struct {
		name     string
		mode     os.FileMode
		uid, gid int
	}{{"open", 0o755, 0, 0}, {"closed", 0o700, 0, 0}, {"group", 0o710, 0, 27}, {"own", 0o700, 1000, 1000}} {
		p := filepath.Join(base, d.name)
		if err := os.Mkdir(p, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(p, d.uid, d.gid); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p, d.mode); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Mkdir(filepath.Join(base, "closed", "inner"), 0o777); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(filepath.Join(base, "closed", "inner"), filepath.Join(base, "link")); err != nil {
		t.Fatal(err)
	}
	u := &guestUser{Name: "noid", UID: 1000, GID: 1000, Groups: []uint32{1000, 27}}
	other := &guestUser{Name: "other", UID: 2000, GID: 2000, Groups: []uint32{2000}}
	for _, c := range []struct {
		u    *guestUser
		dir  string
		want bool
	}{
		{u, "open", true}, {u, "closed", false}, {u, "closed/inner", false}, {u, "link", false},
		{u, "group", true}, {u, "own", true}, {other, "group", false}, {other, "own", false},
		{nil, "closed/inner", true}, {&guestUser{Name: "root"}, "closed", true}, {u, "missing", false},
	} {
		if got := c.u.mayReach(filepath.Join(base, c.dir)); got != c.want {
			t.Errorf("%v may reach %s = %v, want %v", c.u, c.dir, got, c.want)
		}
	}
}

func TestLookPathErrors(t *testing.T) {
	dir := t.TempDir()
	for name, mode := range map[string]os.FileMode{"prog": 0o755, "data": 0o644} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte("#!/bin/sh\n"), mode); err != nil {
			t.Fatal(err)
		}
	}
	other := t.TempDir()
	if err := os.WriteFile(filepath.Join(other, "data"), []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(dir, "adir"), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		file, path, want, reason, msg string
	}{
		{file: "prog", path: dir, want: filepath.Join(dir, "prog")},
		{file: "./prog", path: "", want: "./prog"},
		// A non-executable match is passed over for a later executable one.
		{file: "data", path: dir + ":" + other, want: filepath.Join(other, "data")},
		{file: "data", path: dir, reason: proto.ReasonNotExecutable, msg: filepath.Join(dir, "data") + ": permission denied"},
		{file: "nope", path: dir, reason: proto.ReasonNotFound, msg: "nope: command not found"},
		{file: "adir", path: dir, reason: proto.ReasonNotFound, msg: "adir: command not found"},
		{file: "./nope", reason: proto.ReasonNotFound, msg: "./nope: no such file or directory"},
		{file: "./prog/x", reason: proto.ReasonNotFound, msg: "./prog/x: no such file or directory"},
		{file: "./data", reason: proto.ReasonNotExecutable, msg: "./data: permission denied"},
		{file: "./adir", reason: proto.ReasonNotExecutable, msg: "./adir: is a directory"},
	} {
		got, err := lookPath(c.file, c.path, dir)
		var se *startError
		switch {
		case c.reason == "" && (err != nil || got != c.want):
			t.Errorf("lookPath(%q, %q) = %q, %v; want %q", c.file, c.path, got, err, c.want)
		case c.reason != "" && (!errors.As(err, &se) || se.reason != c.reason || se.msg != c.msg):
			t.Errorf("lookPath(%q, %q) = %q, %v; want %s %q", c.file, c.path, got, err, c.reason, c.msg)
		}
	}
	if e := failedStart(&startError{proto.ReasonNotFound, "x: command not found"}); e.Code != -1 || e.Reason != proto.ReasonNotFound || e.Error != "x: command not found" {
		t.Errorf("failedStart = %+v", e)
	}
	if e := failedStart(errors.New("pipe: too many open files")); e.Reason != "" || !strings.Contains(e.Error, "pipe") {
		t.Errorf("failedStart of a plain error = %+v", e)
	}
}
