package server

import (
	"fmt"
	"net/http"
	"strconv"

	"github.com/noid-vm/noid/internal/api"
	"github.com/noid-vm/noid/internal/errdefs"
)

func (s *Server) hListGolden(w http.ResponseWriter, r *http.Request) error {
	out, err := s.mgr.ListGolden(r.Context(), userOf(r.Context()))
	if err != nil {
		return err
	}
	return writeJSON(w, 200, out)
}

func (s *Server) hPromoteGolden(w http.ResponseWriter, r *http.Request) error {
	var req api.GoldenPromoteRequest
	if err := decodeJSON(r, &req); err != nil {
		return err
	}
	g, err := s.mgr.PromoteGolden(r.Context(), userOf(r.Context()), req)
	if err != nil {
		return err
	}
	return writeJSON(w, http.StatusCreated, g)
}

func (s *Server) hRemoveGolden(w http.ResponseWriter, r *http.Request) error {
	q := r.URL.Query()
	vcpus, mem := s.cfg.DefaultVCPUs, s.cfg.DefaultMemoryMiB
	var err error
	if v := q.Get("vcpus"); v != "" {
		if vcpus, err = strconv.Atoi(v); err != nil || vcpus < 1 {
			return fmt.Errorf("%w: vcpus must be a positive number", errdefs.ErrInvalidArgument)
		}
	}
	if m := q.Get("memory_mib"); m != "" {
		if mem, err = strconv.Atoi(m); err != nil || mem < 1 {
			return fmt.Errorf("%w: memory_mib must be a positive number", errdefs.ErrInvalidArgument)
		}
	}
	if err := s.mgr.RemoveGolden(r.Context(), userOf(r.Context()), vcpus, mem); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}
