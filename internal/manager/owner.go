package manager

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/noid-vm/noid/internal/api"
	"github.com/noid-vm/noid/internal/errdefs"
	"github.com/noid-vm/noid/internal/store"
)

// Owner resolves ref, a VM as the caller u names it, to the user who owns
// the VM and the VM's name among that user's VMs. "vm" is one of u's own
// VMs. An admin may also write "user/vm" for any user's VM, and then acts
// on it as its owner would: its checkpoints, clones and quotas are the
// owner's. For a caller who is not an admin ref is returned as it is, so
// looking it up fails exactly as a lookup of a VM the caller does not have.
func (m *Manager) Owner(ctx context.Context, u *store.User, ref string) (*store.User, string, error) {
	user, name, ok := strings.Cut(ref, "/")
	if !ok || !u.IsAdmin {
		return u, ref, nil
	}
	if user == u.Name {
		return u, name, nil
	}
	owner, err := m.store.UserByName(ctx, user)
	if errors.Is(err, errdefs.ErrNotFound) {
		// The same error as for a VM that does not exist.
		return nil, "", errdefs.WithHint(fmt.Errorf("vm %q: %w", ref, errdefs.ErrNotFound), "noid list --all")
	}
	if err != nil {
		return nil, "", fmt.Errorf("looking up the owner of vm %q: %w", ref, err)
	}
	return owner, name, nil
}

// ListAllVMs lists the VMs of every user, each with its owner; only
// admins may (others get ErrNotFound, as for the other admin operations).
func (m *Manager) ListAllVMs(ctx context.Context, u *store.User) ([]*api.VM, error) {
	if !u.IsAdmin {
		return nil, errdefs.WithHint(fmt.Errorf("%w: listing every user's VMs needs an admin", errdefs.ErrNotFound), "noid list shows your own VMs")
	}
	vms, err := m.store.ListVMs(ctx, -1)
	if err != nil {
		return nil, err
	}
	users, err := m.store.ListUsers(ctx)
	if err != nil {
		return nil, err
	}
	names := make(map[int64]string, len(users))
	for _, o := range users {
		names[o.ID] = o.Name
	}
	return m.apiVMs(ctx, -1, vms, names), nil
}
