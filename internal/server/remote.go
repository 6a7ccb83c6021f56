package server

import (
	"net/http"

	"github.com/noid-vm/noid/internal/api"
)

func (s *Server) hPushCheckpoint(w http.ResponseWriter, r *http.Request) error {
	var req api.RemotePushRequest
	if err := decodeJSON(r, &req); err != nil {
		return err
	}
	out, err := s.mgr.PushCheckpoint(r.Context(), userOf(r.Context()), vmRef(r), r.PathValue("checkpoint"), req)
	if err != nil {
		return err
	}
	return writeJSON(w, http.StatusCreated, out)
}

func (s *Server) hCloneRemote(w http.ResponseWriter, r *http.Request) error {
	var req api.RemoteCloneRequest
	if err := decodeJSON(r, &req); err != nil {
		return err
	}
	out, err := s.mgr.CloneRemote(r.Context(), userOf(r.Context()), req)
	if err != nil {
		return err
	}
	return writeJSON(w, http.StatusCreated, out)
}

func (s *Server) hListRemote(w http.ResponseWriter, r *http.Request) error {
	out, err := s.mgr.ListRemote(r.Context(), userOf(r.Context()))
	if err != nil {
		return err
	}
	return writeJSON(w, http.StatusOK, out)
}

func (s *Server) hPushGolden(w http.ResponseWriter, r *http.Request) error {
	var req api.GoldenRemoteRequest
	if err := decodeJSON(r, &req); err != nil {
		return err
	}
	out, err := s.mgr.PushGolden(r.Context(), userOf(r.Context()), req)
	if err != nil {
		return err
	}
	return writeJSON(w, http.StatusCreated, out)
}

func (s *Server) hPullGolden(w http.ResponseWriter, r *http.Request) error {
	var req api.GoldenRemoteRequest
	if err := decodeJSON(r, &req); err != nil {
		return err
	}
	out, err := s.mgr.PullGolden(r.Context(), userOf(r.Context()), req)
	if err != nil {
		return err
	}
	return writeJSON(w, http.StatusCreated, out)
}
