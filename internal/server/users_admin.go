package server

import (
	"fmt"
	"net/http"

	"github.com/noid-vm/noid/internal/api"
	"github.com/noid-vm/noid/internal/errdefs"
	"github.com/noid-vm/noid/internal/store"
)

// User management for admins: what `noid-server add-user`, `list-users`,
// `rotate-token` and `set-quota` use while a server holds the data dir.

// requireAdmin refuses callers who are not admins with "not found", so the
// admin routes do not reveal themselves to others.
func requireAdmin(r *http.Request, what string) error {
	if u := userOf(r.Context()); u == nil || !u.IsAdmin {
		return errdefs.WithHint(fmt.Errorf("%w: %s needs an admin", errdefs.ErrNotFound, what), "run it as root on the server host")
	}
	return nil
}

// UserInfo is the API view of a stored user.
func UserInfo(u *store.User) api.User {
	out := api.User{Name: u.Name, Admin: u.IsAdmin, TokenPrefix: u.TokenPrefix, CreatedAt: u.CreatedAt,
		Quota: api.Quota{MaxVMs: u.MaxVMs, MaxVCPUs: u.MaxVCPUs, MaxMemoryMiB: u.MaxMemoryMiB, MaxCheckpointBytes: u.MaxCheckpointBytes}}
	if u.UnixUID >= 0 {
		uid := u.UnixUID
		out.UnixUID = &uid
	}
	return out
}

func (s *Server) hListUsers(w http.ResponseWriter, r *http.Request) error {
	if err := requireAdmin(r, "listing users"); err != nil {
		return err
	}
	us, err := s.store.ListUsers(r.Context())
	if err != nil {
		return err
	}
	out := make([]api.User, 0, len(us))
	for _, u := range us {
		out = append(out, UserInfo(u))
	}
	return writeJSON(w, http.StatusOK, out)
}

func (s *Server) hCreateUser(w http.ResponseWriter, r *http.Request) error {
	if err := requireAdmin(r, "adding users"); err != nil {
		return err
	}
	var req api.CreateUserRequest
	if err := decodeJSON(r, &req); err != nil {
		return err
	}
	if err := api.ValidateUserName(req.Name); err != nil {
		return err
	}
	u, tok, err := s.store.CreateUser(r.Context(), req.Name, req.Admin)
	if err != nil {
		return err
	}
	s.log.Info("user added", "user", u.Name, "admin", u.IsAdmin, "by", userOf(r.Context()).Name)
	return writeJSON(w, http.StatusCreated, api.UserToken{User: UserInfo(u), Token: tok})
}

func (s *Server) hRotateToken(w http.ResponseWriter, r *http.Request) error {
	if err := requireAdmin(r, "rotating tokens"); err != nil {
		return err
	}
	name := r.PathValue("user")
	tok, err := s.store.RotateToken(r.Context(), name)
	if err != nil {
		return err
	}
	u, err := s.store.UserByName(r.Context(), name)
	if err != nil {
		return err
	}
	s.log.Info("token rotated", "user", name, "by", userOf(r.Context()).Name)
	return writeJSON(w, http.StatusOK, api.UserToken{User: UserInfo(u), Token: tok})
}

func (s *Server) hSetQuota(w http.ResponseWriter, r *http.Request) error {
	if err := requireAdmin(r, "setting quotas"); err != nil {
		return err
	}
	var q api.Quota
	if err := decodeJSON(r, &q); err != nil {
		return err
	}
	if err := q.Validate(); err != nil {
		return err
	}
	name := r.PathValue("user")
	if err := s.store.SetQuota(r.Context(), name, q.MaxVMs, q.MaxVCPUs, q.MaxMemoryMiB, q.MaxCheckpointBytes); err != nil {
		return err
	}
	u, err := s.store.UserByName(r.Context(), name)
	if err != nil {
		return err
	}
	s.log.Info("quota set", "user", name, "by", userOf(r.Context()).Name)
	return writeJSON(w, http.StatusOK, UserInfo(u))
}
