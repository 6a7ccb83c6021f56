package guest

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// guestUser is an account of the guest, from its /etc/passwd and /etc/group.
type guestUser struct {
	Name   string
	UID    uint32
	GID    uint32
	Groups []uint32 // supplementary groups, the primary one included
	Home   string
	Shell  string
}

// errNoUser means the requested user is not in the guest's /etc/passwd.
var errNoUser = errors.New("no such user")

// lookupUser finds name (a user name, or a numeric uid) in etcDir/passwd and
// its groups in etcDir/group. Only the files are read: a guest with other
// name services (LDAP, systemd-homed) is not consulted, as the agent is
// static and runs before any of them.
func lookupUser(etcDir, name string) (*guestUser, error) {
	f, err := os.Open(filepath.Join(etcDir, "passwd"))
	if err != nil {
		return nil, fmt.Errorf("user %q: %w", name, err)
	}
	defer f.Close()
	u, err := findPasswd(f, name)
	if err != nil {
		return nil, fmt.Errorf("user %q: %w", name, err)
	}
	u.Groups = []uint32{u.GID}
	g, err := os.Open(filepath.Join(etcDir, "group"))
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return u, nil
		}
		return nil, fmt.Errorf("groups of %q: %w", u.Name, err)
	}
	defer g.Close()
	extra, err := memberOf(g, u.Name)
	if err != nil {
		return nil, fmt.Errorf("groups of %q: %w", u.Name, err)
	}
	for _, gid := range extra {
		if gid != u.GID {
			u.Groups = append(u.Groups, gid)
		}
	}
	return u, nil
}

// findPasswd returns the first passwd(5) entry whose name (or, for a
// numeric name, uid) is name. Malformed lines and NIS "+"/"-" lines are
// skipped.
func findPasswd(r io.Reader, name string) (*guestUser, error) {
	uid, numErr := strconv.ParseUint(name, 10, 32)
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	var byUID *guestUser
	for sc.Scan() {
		f := strings.Split(sc.Text(), ":")
		if len(f) < 7 || f[0] == "" || strings.HasPrefix(f[0], "+") || strings.HasPrefix(f[0], "-") {
			continue
		}
		u, err1 := strconv.ParseUint(f[2], 10, 32)
		g, err2 := strconv.ParseUint(f[3], 10, 32)
		if err1 != nil || err2 != nil {
			continue
		}
		e := &guestUser{Name: f[0], UID: uint32(u), GID: uint32(g), Home: f[5], Shell: f[6]}
		if f[0] == name {
			return e, nil
		}
		if numErr == nil && u == uid && byUID == nil {
			byUID = e
		}
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	if byUID != nil {
		return byUID, nil
	}
	return nil, errNoUser
}

// memberOf returns the gids of the group(5) entries that list user as a
// member.
func memberOf(r io.Reader, user string) ([]uint32, error) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	var gids []uint32
	for sc.Scan() {
		f := strings.Split(sc.Text(), ":")
		if len(f) < 4 {
			continue
		}
		gid, err := strconv.ParseUint(f[2], 10, 32)
		if err != nil {
			continue
		}
		for _, m := range strings.Split(f[3], ",") {
			if strings.TrimSpace(m) == user {
				gids = append(gids, uint32(gid))
				break
			}
		}
	}
	return gids, sc.Err()
}

// mayReach reports whether u may enter the directory dir: whether every
// directory from / down to dir (symlinks resolved) grants u search
// permission by its mode bits (ACLs are not consulted). A nil user is root,
// who may enter anything.
func (u *guestUser) mayReach(dir string) bool {
	if u == nil || u.UID == 0 {
		return true
	}
	real, err := filepath.EvalSymlinks(dir)
	if err != nil {
		return false
	}
	p := "/"
	for _, el := range append([]string{""}, strings.Split(strings.Trim(real, "/"), "/")...) {
		p = filepath.Join(p, el)
		var st syscall.Stat_t
		if err := syscall.Stat(p, &st); err != nil || !u.mayEnter(st.Mode, st.Uid, st.Gid) {
			return false
		}
	}
	return true
}

// mayEnter reports whether u may search a directory with the given mode
// bits and owner.
func (u *guestUser) mayEnter(mode, uid, gid uint32) bool {
	switch {
	case uid == u.UID:
		return mode&0o100 != 0
	case u.inGroup(gid):
		return mode&0o010 != 0
	default:
		return mode&0o001 != 0
	}
}

func (u *guestUser) inGroup(gid uint32) bool {
	for _, g := range u.Groups {
		if g == gid {
			return true
		}
	}
	return false
}
