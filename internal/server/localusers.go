package server

import (
	"context"
	"fmt"
	"net/http"
	"os/user"
	"strconv"
	"strings"

	"github.com/noid-vm/noid/internal/api"
	"github.com/noid-vm/noid/internal/errdefs"
	"github.com/noid-vm/noid/internal/store"
	"github.com/noid-vm/noid/internal/unixgroup"
)

// AddLocalUser lets the local unix account unixUser use the unix socket:
// it creates group (the config's socket_group) if needed, adds the account
// to it and records the account's user, so that list-users shows it
// before its first request. It is what `noid-server add-user --local`
// does, through the server or, without one, on the database.
func AddLocalUser(ctx context.Context, st *store.Store, group, unixUser string) (*store.User, error) {
	if unixUser == "" || strings.HasPrefix(unixUser, "-") || strings.ContainsAny(unixUser, " \t\n:/") {
		return nil, fmt.Errorf("%w: %q is not a user name", errdefs.ErrInvalidArgument, unixUser)
	}
	pw, err := user.Lookup(unixUser)
	if err != nil {
		return nil, errdefs.WithHint(fmt.Errorf("%w: no local account %q on this host", errdefs.ErrNotFound, unixUser), "create it with useradd first")
	}
	uid, err := strconv.ParseInt(pw.Uid, 10, 64)
	if err != nil {
		return nil, fmt.Errorf("%w: account %s has uid %q", errdefs.ErrInvalidArgument, unixUser, pw.Uid)
	}
	if uid == 0 {
		return nil, fmt.Errorf("%w: root is always the admin on the unix socket", errdefs.ErrInvalidArgument)
	}
	if _, _, err := unixgroup.Ensure(ctx, group); err != nil {
		return nil, err
	}
	if err := unixgroup.AddMember(ctx, pw.Username, group); err != nil {
		return nil, err
	}
	return st.EnsureUnixUser(ctx, uid, pw.Username)
}

func (s *Server) hAddLocalUser(w http.ResponseWriter, r *http.Request) error {
	if err := requireAdmin(r, "adding users"); err != nil {
		return err
	}
	var req api.AddLocalUserRequest
	if err := decodeJSON(r, &req); err != nil {
		return err
	}
	u, err := AddLocalUser(r.Context(), s.store, s.cfg.SocketGroup, req.UnixUser)
	if err != nil {
		return err
	}
	// The group may have just been created: give it the socket.
	if err := s.socketAccess(); err != nil {
		return err
	}
	s.log.Info("local user added", "user", u.Name, "unix_uid", u.UnixUID, "group", s.cfg.SocketGroup, "by", userOf(r.Context()).Name)
	return writeJSON(w, http.StatusCreated, UserInfo(u))
}
