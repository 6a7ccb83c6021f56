package server

import (
	"net/http"

	"github.com/noid-vm/noid/internal/api"
)

func (s *Server) hListCheckpoints(w http.ResponseWriter, r *http.Request) error {
	out, err := s.mgr.ListCheckpoints(r.Context(), userOf(r.Context()), vmRef(r))
	if err != nil {
		return err
	}
	return writeJSON(w, 200, out)
}

func (s *Server) hCheckpoint(w http.ResponseWriter, r *http.Request) error {
	var req api.CheckpointRequest
	if err := decodeJSON(r, &req); err != nil {
		return err
	}
	out, err := s.mgr.Checkpoint(r.Context(), userOf(r.Context()), vmRef(r), req)
	if err != nil {
		return err
	}
	return writeJSON(w, http.StatusCreated, out)
}

func (s *Server) hDeleteCheckpoint(w http.ResponseWriter, r *http.Request) error {
	if err := s.mgr.DeleteCheckpoint(r.Context(), userOf(r.Context()), vmRef(r), r.PathValue("checkpoint")); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

func (s *Server) hRestore(w http.ResponseWriter, r *http.Request) error {
	var req api.RestoreRequest
	if err := decodeJSON(r, &req); err != nil {
		return err
	}
	out, err := s.mgr.Restore(r.Context(), userOf(r.Context()), vmRef(r), req)
	if err != nil {
		return err
	}
	status := http.StatusOK
	if req.As != "" {
		status = http.StatusCreated
	}
	return writeJSON(w, status, out)
}
