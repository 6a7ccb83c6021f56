package image

import (
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// addGuestUser adds GuestUser to the root tree: entries in etc/passwd,
// etc/group, etc/shadow and (when present) etc/gshadow, membership of the
// sudo group when there is one, a home directory filled from etc/skel, and,
// when sudo is installed (etc/sudoers.d exists), a sudoers drop-in that lets
// it run anything as root without a password. The account has no password
// ("*"): it is reached through the agent (noid exec --user), not a login.
// A tree that already has the user is left alone.
func addGuestUser(tree string) error {
	etc := filepath.Join(tree, "etc")
	passwd, err := os.ReadFile(filepath.Join(etc, "passwd"))
	if err != nil {
		return err
	}
	id := strconv.Itoa(GuestUID)
	for _, line := range strings.Split(string(passwd), "\n") {
		f := strings.Split(line, ":")
		if f[0] == GuestUser {
			return nil
		}
		if len(f) > 3 && f[2] == id {
			return fmt.Errorf("uid %d is taken by %q", GuestUID, f[0])
		}
	}
	shell := "/bin/sh"
	if fi, err := os.Stat(filepath.Join(tree, "bin/bash")); err == nil && fi.Mode()&0o111 != 0 {
		shell = "/bin/bash"
	}
	home := "/home/" + GuestUser
	if err := appendLine(filepath.Join(etc, "passwd"), fmt.Sprintf("%s:x:%d:%d:%s:%s:%s", GuestUser, GuestUID, GuestUID, GuestUser, home, shell)); err != nil {
		return err
	}
	if err := addGroup(filepath.Join(etc, "group"), GuestUser+":x:"+id+":", 3); err != nil {
		return err
	}
	if err := appendLine(filepath.Join(etc, "shadow"), GuestUser+":*::0:99999:7:::"); err != nil {
		return err
	}
	if _, err := os.Stat(filepath.Join(etc, "gshadow")); err == nil {
		if err := addGroup(filepath.Join(etc, "gshadow"), GuestUser+":!::", 3); err != nil {
			return err
		}
	}
	if err := makeHome(tree, home); err != nil {
		return err
	}
	if fi, err := os.Stat(filepath.Join(etc, "sudoers.d")); err == nil && fi.IsDir() {
		p := filepath.Join(etc, "sudoers.d", GuestUser)
		if err := os.WriteFile(p, []byte(GuestSudoersLine), 0o440); err != nil {
			return err
		}
		// WriteFile's mode is filtered by the umask; sudo wants exactly 0440.
		if err := os.Chmod(p, 0o440); err != nil {
			return err
		}
	}
	return nil
}

// addGroup appends entry to a group(5) or gshadow(5) file and adds
// GuestUser to the member list (field memberField) of its "sudo" group, if
// the file has one.
func addGroup(path, entry string, memberField int) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	for i, line := range lines {
		f := strings.Split(line, ":")
		if f[0] != "sudo" || len(f) <= memberField {
			continue
		}
		if f[memberField] == "" {
			f[memberField] = GuestUser
		} else {
			f[memberField] += "," + GuestUser
		}
		lines[i] = strings.Join(f, ":")
	}
	lines = append(lines, entry)
	return rewriteFile(path, strings.Join(lines, "\n")+"\n")
}

// appendLine adds line at the end of the file at path.
func appendLine(path, line string) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	s := string(b)
	if s != "" && !strings.HasSuffix(s, "\n") {
		s += "\n"
	}
	return rewriteFile(path, s+line+"\n")
}

// rewriteFile replaces the content of an existing file, keeping its mode
// (shadow files are not world-readable).
func rewriteFile(path, content string) error {
	fi, err := os.Stat(path)
	if err != nil {
		return err
	}
	if err := os.WriteFile(path, []byte(content), fi.Mode().Perm()); err != nil {
		return err
	}
	return os.Chmod(path, fi.Mode().Perm())
}

// makeHome creates the user's home (mode 0700) with a copy of etc/skel,
// everything owned by the user. Ownership is only set when the build runs
// as root (the tiny image can be built without root, for tests).
func makeHome(tree, home string) error {
	dst := filepath.Join(tree, home)
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return err
	}
	if err := os.Mkdir(dst, 0o700); err != nil {
		return err
	}
	skel := filepath.Join(tree, "etc/skel")
	err := filepath.WalkDir(skel, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if os.IsNotExist(err) && p == skel {
				return filepath.SkipDir
			}
			return err
		}
		rel, _ := filepath.Rel(skel, p)
		if rel == "." {
			return nil
		}
		target := filepath.Join(dst, rel)
		switch {
		case d.IsDir():
			return os.Mkdir(target, 0o755)
		case d.Type().IsRegular():
			return copyFileSparse(p, target)
		}
		return nil // skel holds no links or devices worth copying
	})
	if err != nil {
		return fmt.Errorf("home from /etc/skel: %w", err)
	}
	if os.Geteuid() != 0 {
		return nil
	}
	return filepath.WalkDir(dst, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		return os.Lchown(p, GuestUID, GuestUID)
	})
}
