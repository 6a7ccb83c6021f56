package server

import (
	"fmt"
	"net/http"

	"github.com/noid-vm/noid/internal/errdefs"
)

func notYet(what string) error {
	return fmt.Errorf("%w: %s is not available yet", errdefs.ErrNotImplemented, what)
}

func (s *Server) hPutFiles(w http.ResponseWriter, r *http.Request) error { return notYet("file copy") }
func (s *Server) hGetFiles(w http.ResponseWriter, r *http.Request) error { return notYet("file copy") }
func (s *Server) hOpenAPI(w http.ResponseWriter, r *http.Request) error  { return notYet("openapi") }
