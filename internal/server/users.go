package server

import (
	"fmt"
	"net/http"

	"github.com/noid-vm/noid/internal/errdefs"
)

func (s *Server) hRemoveUser(w http.ResponseWriter, r *http.Request) error {
	u := userOf(r.Context())
	if !u.IsAdmin {
		return errdefs.WithHint(fmt.Errorf("%w: removing users needs an admin", errdefs.ErrNotFound), "run it as root on the server host")
	}
	n, err := s.mgr.RemoveUser(r.Context(), r.PathValue("user"))
	if err != nil {
		return err
	}
	return writeJSON(w, 200, map[string]int{"vms_destroyed": n})
}
