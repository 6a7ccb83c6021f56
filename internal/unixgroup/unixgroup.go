// Package unixgroup manages the host group that may use noid-server's unix
// socket (config socket_group): it creates the group and adds and removes
// members with the host's own tools (groupadd, gpasswd from the passwd
// package), which lock and update /etc/group and /etc/gshadow as every
// other account tool does.
package unixgroup

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os/exec"
	"os/user"
	"slices"
	"strconv"
	"strings"

	"github.com/noid-vm/noid/internal/errdefs"
)

// Lookup returns the gid of group, and false when there is no such group.
func Lookup(group string) (int, bool) {
	g, err := user.LookupGroup(group)
	if err != nil {
		return 0, false
	}
	gid, err := strconv.Atoi(g.Gid)
	return gid, err == nil
}

// Ensure creates group as a system group unless it exists, and returns its
// gid and whether it was created.
func Ensure(ctx context.Context, group string) (gid int, created bool, err error) {
	if gid, ok := Lookup(group); ok {
		return gid, false, nil
	}
	if err := run(ctx, "groupadd", "--system", group); err != nil {
		return 0, false, fmt.Errorf("creating group %s: %w", group, err)
	}
	gid, ok := Lookup(group)
	if !ok {
		return 0, true, fmt.Errorf("%w: group %s does not exist after groupadd", errdefs.ErrInternal, group)
	}
	return gid, true, nil
}

// IsMember reports whether the user name is a member of group, as its
// primary group or a supplementary one.
func IsMember(name, group string) bool {
	u, err := user.Lookup(name)
	if err != nil {
		return false
	}
	gid, ok := Lookup(group)
	if !ok {
		return false
	}
	ids, _ := u.GroupIds()
	return slices.Contains(ids, strconv.Itoa(gid))
}

// AddMember adds the user name to group's members (a no-op when it is one).
func AddMember(ctx context.Context, name, group string) error {
	if IsMember(name, group) {
		return nil
	}
	if err := run(ctx, "gpasswd", "--add", name, group); err != nil {
		return fmt.Errorf("adding %s to group %s: %w", name, group, err)
	}
	return nil
}

// RemoveMember removes the user name from group's members (a no-op when it
// is not one, or the group does not exist).
func RemoveMember(ctx context.Context, name, group string) error {
	if _, ok := Lookup(group); !ok {
		return nil
	}
	u, err := user.Lookup(name)
	if err != nil {
		return nil
	}
	if gid, _ := Lookup(group); u.Gid == strconv.Itoa(gid) {
		return fmt.Errorf("%w: %s is the primary group of %s; change that with usermod", errdefs.ErrConflict, group, name)
	}
	if !IsMember(name, group) {
		return nil
	}
	if err := run(ctx, "gpasswd", "--delete", name, group); err != nil {
		return fmt.Errorf("removing %s from group %s: %w", name, group, err)
	}
	return nil
}

func run(ctx context.Context, name string, args ...string) error {
	path, err := exec.LookPath(name)
	if err != nil {
		for _, dir := range []string{"/usr/sbin", "/sbin", "/usr/bin"} {
			if p := dir + "/" + name; fileExists(p) {
				path, err = p, nil
				break
			}
		}
	}
	if err != nil {
		return errdefs.WithHint(fmt.Errorf("%w: %s not found", errdefs.ErrUnavailable, name), "install the passwd package (groupadd, gpasswd)")
	}
	var out bytes.Buffer
	cmd := exec.CommandContext(ctx, path, args...)
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return fmt.Errorf("%s %s: %v: %s", name, strings.Join(args, " "), err, strings.TrimSpace(out.String()))
		}
		return fmt.Errorf("%s %s: %w", name, strings.Join(args, " "), err)
	}
	return nil
}

func fileExists(p string) bool {
	_, err := exec.LookPath(p)
	return err == nil
}
