package server

import (
	"context"
	"fmt"
	"github.com/noid-vm/noid/internal/store"
	"net/http"

	"github.com/noid-vm/noid/internal/errdefs"
)

func notYet(what string) error {
	return fmt.Errorf("%w: %s is not available yet", errdefs.ErrNotImplemented, what)
}

func (s *Server) hPutFiles(w http.ResponseWriter, r *http.Request) error { return notYet("file copy") }
func (s *Server) hGetFiles(w http.ResponseWriter, r *http.Request) error { return notYet("file copy") }
func (s *Server) hListGolden(w http.ResponseWriter, r *http.Request) error {
	return notYet("golden snapshots")
}
func (s *Server) hPromoteGolden(w http.ResponseWriter, r *http.Request) error {
	return notYet("golden snapshots")
}
func (s *Server) hRemoveGolden(w http.ResponseWriter, r *http.Request) error {
	return notYet("golden snapshots")
}
func (s *Server) hOpenAPI(w http.ResponseWriter, r *http.Request) error { return notYet("openapi") }

func (s *Server) removeUserGolden(ctx context.Context, u *store.User) error { return nil }
