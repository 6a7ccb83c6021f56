package manager

import (
	"context"
	"fmt"
	"os"
	"os/user"
	"strconv"

	"github.com/noid-vm/noid/internal/unixgroup"
)

// RemoveUser destroys every VM of the user (with their checkpoints), removes
// the user's storage and deletes the user, revoking their token; a local
// user also leaves the unix socket's group.
func (m *Manager) RemoveUser(ctx context.Context, name string) (int, error) {
	u, err := m.store.UserByName(ctx, name)
	if err != nil {
		return 0, err
	}
	vms, err := m.store.ListVMs(ctx, u.ID)
	if err != nil {
		return 0, err
	}
	for _, v := range vms {
		if _, err := m.DestroyVM(ctx, u, v.Name); err != nil {
			return 0, fmt.Errorf("destroying vm %s of %s: %w", v.Name, name, err)
		}
	}
	if err := m.removeUserGolden(ctx, u); err != nil {
		return 0, err
	}
	if err := os.RemoveAll(m.userDir(u.ID)); err != nil {
		return 0, fmt.Errorf("removing storage of %s: %w", name, err)
	}
	if err := m.store.DeleteUser(ctx, u.ID); err != nil {
		return 0, err
	}
	// A local user also leaves the socket's group, so that the socket
	// does not map it to a new user at its next request.
	if u.UnixUID > 0 {
		if pw, err := user.LookupId(strconv.FormatInt(u.UnixUID, 10)); err == nil {
			if err := unixgroup.RemoveMember(ctx, pw.Username, m.cfg.SocketGroup); err != nil {
				m.log.Warn("removed user keeps the socket group", "user", name, "group", m.cfg.SocketGroup, "err", err)
			}
		}
	}
	m.log.Info("user removed", "user", name, "vms_destroyed", len(vms))
	return len(vms), nil
}
