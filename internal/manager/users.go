package manager

import (
	"context"
	"fmt"
	"os"
)

// RemoveUser destroys every VM of the user (with their checkpoints), removes
// the user's storage and deletes the user, revoking their token.
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
	m.log.Info("user removed", "user", name, "vms_destroyed", len(vms))
	return len(vms), nil
}
