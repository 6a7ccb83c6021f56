package server

import (
	"context"
	"fmt"
	"net/http"
	"os"

	"github.com/noid-vm/noid/internal/errdefs"
)

// RemoveUser destroys every VM of the user (with their checkpoints), removes
// the user's storage and deletes the user, revoking their token.
func (s *Server) RemoveUser(ctx context.Context, name string) (int, error) {
	u, err := s.store.UserByName(ctx, name)
	if err != nil {
		return 0, err
	}
	vms, err := s.store.ListVMs(ctx, u.ID)
	if err != nil {
		return 0, err
	}
	for _, v := range vms {
		if _, err := s.DestroyVM(ctx, u, v.Name); err != nil {
			return 0, fmt.Errorf("destroying vm %s of %s: %w", v.Name, name, err)
		}
	}
	if err := s.removeUserGolden(ctx, u); err != nil {
		return 0, err
	}
	if err := os.RemoveAll(s.userDir(u.ID)); err != nil {
		return 0, fmt.Errorf("removing storage of %s: %w", name, err)
	}
	if err := s.store.DeleteUser(ctx, u.ID); err != nil {
		return 0, err
	}
	s.log.Info("user removed", "user", name, "vms_destroyed", len(vms))
	return len(vms), nil
}

func (s *Server) hRemoveUser(w http.ResponseWriter, r *http.Request) error {
	u := userOf(r.Context())
	if !u.IsAdmin {
		return errdefs.WithHint(fmt.Errorf("%w: removing users needs an admin", errdefs.ErrNotFound), "run it as root on the server host")
	}
	n, err := s.RemoveUser(r.Context(), r.PathValue("user"))
	if err != nil {
		return err
	}
	return writeJSON(w, 200, map[string]int{"vms_destroyed": n})
}
