// Package fctest is test support for noid's Firecracker backend.
//
// ##########################################################################
// #                                                                        #
// #   THIS PACKAGE CONTAINS A FAKE. Server is NOT Firecracker and runs no   #
// #   virtual machine. It exists only so that tests can check the bytes    #
// #   noid puts on the wire: it listens on a unix socket, records every     #
// #   request, validates each body against Firecracker's own API schema    #
// #   (the pinned v1.16.1 swagger file), and imitates just enough of        #
// #   Firecracker's state machine (pre-boot/running/paused, snapshot files, #
// #   the vsock CONNECT handshake) for the backend's request sequences to   #
// #   run. Its snapshot files are not Firecracker's format. Passing tests   #
// #   against it say nothing about real Firecracker behaviour; only the     #
// #   conformance suite on a host with firecracker and KVM does.            #
// #                                                                        #
// #   Never import this package outside _test.go files.                    #
// #                                                                        #
// ##########################################################################
package fctest

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
)

// PageSize is the fake guest's page size.
const PageSize = 4096

// FakeVersion is the version the fake claims to be.
const FakeVersion = "1.16.1"

// Request is one request the fake received.
type Request struct {
	// Method and Path are the request line's.
	Method string `json:"method"`
	Path   string `json:"path"`
	// Body is the request body, if any.
	Body json.RawMessage `json:"body,omitempty"`
	// Status is the status the fake answered.
	Status int `json:"status"`
	// Invalid is the schema violation, if the body did not validate.
	Invalid string `json:"invalid,omitempty"`
}

// Fault makes the fake answer matching requests with an error.
type Fault struct {
	// Method and Path select the requests to fail (exact match).
	Method string `json:"method"`
	Path   string `json:"path"`
	// Status and Message are the answer (Message as fault_message).
	Status  int    `json:"status"`
	Message string `json:"message"`
	// Times is how many requests fail (1 if zero).
	Times int `json:"times"`
}

// Options configure a fake server.
type Options struct {
	// Schema, when set, validates every request; an invalid one gets 400.
	Schema *Schema
	// Root resolves relative paths, like Firecracker's working directory.
	Root string
	// ID is the instance id reported by GET /.
	ID string
	// LogPath, when set, receives every Request as a JSON line.
	LogPath string
	// AgentPorts are the guest vsock ports with a listener (an echo
	// server); CONNECT to any other port is closed, like Firecracker does.
	AgentPorts []uint32
}

// Server is the FAKE Firecracker API server (see the package comment).
type Server struct {
	opts Options
	ln   net.Listener
	srv  *http.Server

	mu         sync.Mutex
	reqs       []Request
	faults     []Fault
	state      string
	configured map[string]bool
	machine    machineState
	bootSet    bool
	drives     map[string]string // drive id → path
	ifaces     map[string]string // iface id → host device
	vsockCID   uint32
	vsockPath  string
	vsockLn    net.Listener
	vsockConns map[net.Conn]bool
	mem        map[int64]byte // page → fill byte (absent: zero page)
	dirty      map[int64]bool
}

type machineState struct {
	VCPUs  int  `json:"vcpus"`
	MemMiB int  `json:"mem_mib"`
	Track  bool `json:"track"`
}

// vmstate is the fake's snapshot state file.
type vmstate struct {
	Fake     string            `json:"fake_firecracker_vmstate"`
	Version  string            `json:"version"`
	Machine  machineState      `json:"machine"`
	Drives   map[string]string `json:"drives"`
	Ifaces   map[string]string `json:"ifaces"`
	VsockCID uint32            `json:"vsock_cid"`
	Vsock    string            `json:"vsock"`
}

const fakeMarker = "NOT A REAL FIRECRACKER SNAPSHOT (written by the noid test fake)"

// Start serves the fake API on socketPath.
func Start(socketPath string, opts Options) (*Server, error) {
	os.Remove(socketPath)
	ln, err := net.Listen("unix", socketPath)
	if err != nil {
		return nil, fmt.Errorf("fake firecracker: %w", err)
	}
	s := &Server{
		opts: opts, ln: ln,
		state:      "Not started",
		configured: map[string]bool{},
		machine:    machineState{VCPUs: 1, MemMiB: 128},
		drives:     map[string]string{},
		ifaces:     map[string]string{},
		vsockConns: map[net.Conn]bool{},
		mem:        map[int64]byte{},
		dirty:      map[int64]bool{},
	}
	s.srv = &http.Server{Handler: s}
	go s.srv.Serve(ln)
	return s, nil
}

// Close stops the server and its vsock listener.
func (s *Server) Close() error {
	s.mu.Lock()
	if s.vsockLn != nil {
		s.vsockLn.Close()
	}
	for c := range s.vsockConns {
		c.Close()
	}
	s.mu.Unlock()
	return s.srv.Close()
}

// Requests returns the requests received so far.
func (s *Server) Requests() []Request {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Request(nil), s.reqs...)
}

// InjectFault makes the next f.Times requests matching f fail.
func (s *Server) InjectFault(f Fault) {
	if f.Times == 0 {
		f.Times = 1
	}
	s.mu.Lock()
	s.faults = append(s.faults, f)
	s.mu.Unlock()
}

// Touch simulates the guest writing value into pages (it must be running).
func (s *Server) Touch(pages []int64, value byte) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.state != "Running" {
		return fmt.Errorf("fake firecracker: the guest is %s, it cannot write memory", s.state)
	}
	limit := int64(s.machine.MemMiB) << 20 / PageSize
	for _, p := range pages {
		if p < 0 || p >= limit {
			return fmt.Errorf("fake firecracker: page %d out of range", p)
		}
		if value == 0 {
			delete(s.mem, p)
		} else {
			s.mem[p] = value
		}
		s.dirty[p] = true
	}
	return nil
}

// State returns the instance state ("Not started", "Running", "Paused").
func (s *Server) State() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.state
}

// MemoryDigest returns a digest of the fake guest's whole memory.
func (s *Server) MemoryDigest() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return digest(s.mem)
}

// MemoryFileDigest returns the digest of a memory file as MemoryDigest
// computes it for the guest memory it holds.
func MemoryFileDigest(path string) (string, error) {
	mem, err := readMemory(path)
	if err != nil {
		return "", err
	}
	return digest(mem), nil
}

func digest(mem map[int64]byte) string {
	pages := make([]int64, 0, len(mem))
	for p := range mem {
		pages = append(pages, p)
	}
	sort.Slice(pages, func(i, j int) bool { return pages[i] < pages[j] })
	h := sha256.New()
	for _, p := range pages {
		binary.Write(h, binary.LittleEndian, p)
		h.Write([]byte{mem[p]})
	}
	return hex.EncodeToString(h.Sum(nil))
}

// ServeHTTP implements the fake API.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(io.LimitReader(r.Body, 1<<20))
	if strings.HasPrefix(r.URL.Path, "/fake/") {
		s.control(w, r, body)
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	rec := Request{Method: r.Method, Path: r.URL.Path}
	if len(bytes.TrimSpace(body)) > 0 {
		rec.Body = json.RawMessage(body)
	}
	status, answer := s.handle(r.Method, r.URL.Path, body, &rec)
	rec.Status = status
	s.reqs = append(s.reqs, rec)
	s.log(rec)
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	if answer != nil {
		json.NewEncoder(w).Encode(answer)
	}
}

func fault(msg string, args ...any) map[string]string {
	return map[string]string{"fault_message": fmt.Sprintf(msg, args...)}
}

func (s *Server) log(rec Request) {
	if s.opts.LogPath == "" {
		return
	}
	f, err := os.OpenFile(s.opts.LogPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return
	}
	defer f.Close()
	json.NewEncoder(f).Encode(rec)
}

// handle runs one API request under s.mu.
func (s *Server) handle(method, path string, body []byte, rec *Request) (int, any) {
	if s.opts.Schema != nil {
		if err := s.opts.Schema.ValidateRequest(method, path, body); err != nil {
			rec.Invalid = err.Error()
			return http.StatusBadRequest, fault("%v", err)
		}
	}
	for i, f := range s.faults {
		if f.Method == method && f.Path == path {
			s.faults[i].Times--
			if s.faults[i].Times <= 0 {
				s.faults = append(s.faults[:i], s.faults[i+1:]...)
			}
			return f.Status, fault("%s", f.Message)
		}
	}
	var v map[string]any
	if len(bytes.TrimSpace(body)) > 0 {
		if err := json.Unmarshal(body, &v); err != nil {
			return http.StatusBadRequest, fault("bad JSON: %v", err)
		}
	}
	str := func(k string) string { x, _ := v[k].(string); return x }
	num := func(k string) int { x, _ := v[k].(float64); return int(x) }
	flag := func(k string) bool { x, _ := v[k].(bool); return x }
	preBoot := func(what string) (int, any, bool) {
		if s.state != "Not started" || s.configured["snapshot"] {
			return http.StatusBadRequest, fault("The requested operation is not supported after starting the microVM (%s).", what), false
		}
		s.configured[what] = true
		return 0, nil, true
	}

	switch {
	case method == "GET" && path == "/":
		return 200, map[string]string{"app_name": "Firecracker", "id": s.opts.ID, "state": s.state, "vmm_version": FakeVersion}
	case method == "GET" && path == "/version":
		return 200, map[string]string{"firecracker_version": FakeVersion}
	case method == "GET" && path == "/machine-config":
		return 200, map[string]any{"vcpu_count": s.machine.VCPUs, "mem_size_mib": s.machine.MemMiB, "track_dirty_pages": s.machine.Track}
	case method == "PUT" && path == "/logger":
		if p := str("log_path"); p != "" {
			if _, err := os.Stat(s.abs(p)); err != nil {
				return 400, fault("Logger error: %v", err)
			}
		}
		return 204, nil
	case method == "PUT" && path == "/machine-config":
		if st, a, ok := preBoot("machine-config"); !ok {
			return st, a
		}
		s.machine = machineState{VCPUs: num("vcpu_count"), MemMiB: num("mem_size_mib"), Track: flag("track_dirty_pages")}
		return 204, nil
	case method == "PUT" && path == "/boot-source":
		if st, a, ok := preBoot("boot-source"); !ok {
			return st, a
		}
		for _, k := range []string{"kernel_image_path", "initrd_path"} {
			if p := str(k); p != "" {
				if _, err := os.Stat(s.abs(p)); err != nil {
					return 400, fault("Invalid %s: %v", k, err)
				}
			}
		}
		s.bootSet = true
		return 204, nil
	case method == "PUT" && strings.HasPrefix(path, "/drives/"):
		if st, a, ok := preBoot("drives"); !ok {
			return st, a
		}
		id := strings.TrimPrefix(path, "/drives/")
		if id != str("drive_id") {
			return 400, fault("The id from the path [%s] does not match the id from the body [%s]!", id, str("drive_id"))
		}
		if _, err := os.Stat(s.abs(str("path_on_host"))); err != nil {
			return 400, fault("Unable to create the block device: %v", err)
		}
		s.drives[id] = str("path_on_host")
		return 204, nil
	case method == "PUT" && strings.HasPrefix(path, "/network-interfaces/"):
		if st, a, ok := preBoot("network-interfaces"); !ok {
			return st, a
		}
		id := strings.TrimPrefix(path, "/network-interfaces/")
		if id != str("iface_id") {
			return 400, fault("The id from the path [%s] does not match the id from the body [%s]!", id, str("iface_id"))
		}
		s.ifaces[id] = str("host_dev_name")
		return 204, nil
	case method == "PUT" && path == "/vsock":
		if st, a, ok := preBoot("vsock"); !ok {
			return st, a
		}
		s.vsockCID, s.vsockPath = uint32(num("guest_cid")), str("uds_path")
		return 204, nil
	case method == "PUT" && path == "/entropy":
		if st, a, ok := preBoot("entropy"); !ok {
			return st, a
		}
		return 204, nil
	case method == "PUT" && path == "/actions":
		switch str("action_type") {
		case "InstanceStart":
			if s.state != "Not started" || s.configured["snapshot"] {
				return 400, fault("The microVM is already running.")
			}
			if !s.bootSet {
				return 400, fault("Cannot start microvm without kernel configuration.")
			}
			if err := s.startVsock(); err != nil {
				return 400, fault("%v", err)
			}
			s.state = "Running"
			s.mem[0] = 0x5a // the "kernel" wrote its first page
			s.dirty[0] = true
			return 204, nil
		case "FlushMetrics", "SendCtrlAltDel":
			return 204, nil
		}
		return 400, fault("unknown action")
	case method == "PATCH" && path == "/vm":
		if s.state == "Not started" {
			return 400, fault("The requested operation is not supported before starting the microVM.")
		}
		if str("state") == "Paused" {
			s.state = "Paused"
		} else {
			s.state = "Running"
		}
		return 204, nil
	case method == "PUT" && path == "/snapshot/create":
		return s.snapshotCreate(str("snapshot_type"), str("snapshot_path"), str("mem_file_path"))
	case method == "PUT" && path == "/snapshot/load":
		return s.snapshotLoad(v, body)
	}
	return 400, fault("Invalid request method and/or path: %s %s.", method, path)
}

func (s *Server) abs(p string) string {
	if filepath.IsAbs(p) || s.opts.Root == "" {
		return p
	}
	return filepath.Join(s.opts.Root, p)
}

func (s *Server) snapshotCreate(typ, statePath, memPath string) (int, any) {
	if s.state != "Paused" {
		return 400, fault("Create snapshot error: the microVM is not paused (it is %s).", s.state)
	}
	if typ == "Diff" && !s.machine.Track {
		return 400, fault("Diff snapshots are not allowed on uVMs with dirty page tracking disabled.")
	}
	st := vmstate{Fake: fakeMarker, Version: FakeVersion, Machine: s.machine, Drives: s.drives,
		Ifaces: s.ifaces, VsockCID: s.vsockCID, Vsock: s.vsockPath}
	data, _ := json.MarshalIndent(st, "", "  ")
	if err := os.WriteFile(s.abs(statePath), data, 0o600); err != nil {
		return 400, fault("Cannot write the snapshot state: %v", err)
	}
	f, err := os.OpenFile(s.abs(memPath), os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return 400, fault("Cannot write the memory file: %v", err)
	}
	defer f.Close()
	if err := f.Truncate(int64(s.machine.MemMiB) << 20); err != nil {
		return 400, fault("Cannot size the memory file: %v", err)
	}
	page := make([]byte, PageSize)
	for p, val := range s.mem {
		if typ == "Diff" && !s.dirty[p] {
			continue
		}
		for i := range page {
			page[i] = val
		}
		if _, err := f.WriteAt(page, p*PageSize); err != nil {
			return 400, fault("Cannot write the memory file: %v", err)
		}
	}
	if typ == "Diff" {
		// A dirty page that became zero is still written, as zeros.
		for p := range s.dirty {
			if _, ok := s.mem[p]; !ok {
				clear(page)
				f.WriteAt(page, p*PageSize)
			}
		}
	}
	s.dirty = map[int64]bool{}
	// Firecracker resets vsock connections on snapshot creation.
	for c := range s.vsockConns {
		c.Close()
	}
	return 204, nil
}

func (s *Server) snapshotLoad(v map[string]any, body []byte) (int, any) {
	var p struct {
		SnapshotPath string `json:"snapshot_path"`
		MemFilePath  string `json:"mem_file_path"`
		MemBackend   *struct {
			BackendType string `json:"backend_type"`
			BackendPath string `json:"backend_path"`
		} `json:"mem_backend"`
		TrackDirtyPages  bool `json:"track_dirty_pages"`
		ResumeVM         bool `json:"resume_vm"`
		NetworkOverrides []struct {
			IfaceID     string `json:"iface_id"`
			HostDevName string `json:"host_dev_name"`
		} `json:"network_overrides"`
		VsockOverride *struct {
			UDSPath string `json:"uds_path"`
		} `json:"vsock_override"`
	}
	json.Unmarshal(body, &p)
	for k := range s.configured {
		if k != "logger" && k != "metrics" {
			return 400, fault("Loading a microVM snapshot not allowed after configuring boot-specific resources.")
		}
	}
	if s.state != "Not started" || s.configured["snapshot"] {
		return 400, fault("Loading a microVM snapshot not allowed after starting the microVM.")
	}
	if (p.MemFilePath == "") == (p.MemBackend == nil) {
		return 400, fault("exactly one of mem_file_path and mem_backend must be given")
	}
	memPath := p.MemFilePath
	if p.MemBackend != nil {
		if p.MemBackend.BackendType != "File" {
			return 400, fault("the fake supports only the File memory backend")
		}
		memPath = p.MemBackend.BackendPath
	}
	data, err := os.ReadFile(s.abs(p.SnapshotPath))
	if err != nil {
		return 400, fault("Load snapshot error: cannot open the state file: %v", err)
	}
	var st vmstate
	if json.Unmarshal(data, &st) != nil || st.Fake != fakeMarker {
		return 400, fault("Load snapshot error: %s is not a snapshot state file", p.SnapshotPath)
	}
	mem, err := readMemory(s.abs(memPath))
	if err != nil {
		return 400, fault("Load snapshot error: cannot read the memory file: %v", err)
	}
	if fi, _ := os.Stat(s.abs(memPath)); fi == nil || fi.Size() != int64(st.Machine.MemMiB)<<20 {
		return 400, fault("Load snapshot error: the memory file size does not match the snapshot's memory size")
	}
	for id, path := range st.Drives {
		// Firecracker reopens each drive at the path stored in the snapshot.
		if _, err := os.Stat(s.abs(path)); err != nil {
			return 400, fault("Load snapshot error: cannot open drive %s at %s: %v", id, path, err)
		}
	}
	for _, o := range p.NetworkOverrides {
		if _, ok := st.Ifaces[o.IfaceID]; !ok {
			return 400, fault("Load snapshot error: network override for unknown interface %s", o.IfaceID)
		}
		st.Ifaces[o.IfaceID] = o.HostDevName
	}
	if p.VsockOverride != nil {
		if st.Vsock == "" {
			return 400, fault("Load snapshot error: vsock override without a vsock device")
		}
		st.Vsock = p.VsockOverride.UDSPath
	}
	s.configured["snapshot"] = true
	s.machine = st.Machine
	s.machine.Track = p.TrackDirtyPages
	s.drives, s.ifaces, s.vsockCID, s.vsockPath = st.Drives, st.Ifaces, st.VsockCID, st.Vsock
	s.mem, s.dirty = mem, map[int64]bool{}
	if err := s.startVsock(); err != nil {
		return 400, fault("Load snapshot error: %v", err)
	}
	s.state = "Paused"
	if p.ResumeVM {
		s.state = "Running"
	}
	_ = v
	return 204, nil
}

// readMemory reads a memory file's non-zero pages.
func readMemory(path string) (map[int64]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	mem := map[int64]byte{}
	r := bufio.NewReaderSize(f, 1<<20)
	page := make([]byte, PageSize)
	for p := int64(0); ; p++ {
		if _, err := io.ReadFull(r, page); err != nil {
			if errors.Is(err, io.EOF) {
				return mem, nil
			}
			return nil, err
		}
		if page[0] != 0 {
			mem[p] = page[0]
		}
	}
}

// startVsock listens on the vsock socket and plays the host side of
// Firecracker's vsock muxer with an echo "guest" on AgentPorts.
func (s *Server) startVsock() error {
	if s.vsockPath == "" {
		return nil
	}
	path := s.abs(s.vsockPath)
	os.Remove(path)
	ln, err := net.Listen("unix", path)
	if err != nil {
		return fmt.Errorf("cannot bind the vsock socket: %w", err)
	}
	s.vsockLn = ln
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.mu.Lock()
			s.vsockConns[c] = true
			s.mu.Unlock()
			go s.vsockConn(c)
		}
	}()
	return nil
}

func (s *Server) vsockConn(c net.Conn) {
	defer func() {
		c.Close()
		s.mu.Lock()
		delete(s.vsockConns, c)
		s.mu.Unlock()
	}()
	br := bufio.NewReader(c)
	line, err := br.ReadString('\n')
	if err != nil {
		return
	}
	port, err := strconv.ParseUint(strings.TrimPrefix(strings.TrimSpace(line), "CONNECT "), 10, 32)
	if err != nil || !strings.HasPrefix(line, "CONNECT ") {
		return
	}
	listening := false
	for _, p := range s.opts.AgentPorts {
		if uint32(port) == p {
			listening = true
		}
	}
	if !listening {
		return
	}
	fmt.Fprintf(c, "OK %d\n", 1073741824+port)
	io.Copy(c, br) // the echo "guest"
}

// control serves the fake's own /fake/ endpoints (not part of Firecracker's
// API): fault injection and guest memory writes for out-of-process fakes.
func (s *Server) control(w http.ResponseWriter, r *http.Request, body []byte) {
	switch r.URL.Path {
	case "/fake/fault":
		var f Fault
		if err := json.Unmarshal(body, &f); err != nil {
			http.Error(w, err.Error(), 400)
			return
		}
		s.InjectFault(f)
	case "/fake/touch":
		var t struct {
			Pages []int64 `json:"pages"`
			Value byte    `json:"value"`
		}
		if err := json.Unmarshal(body, &t); err != nil {
			http.Error(w, err.Error(), 400)
			return
		}
		if err := s.Touch(t.Pages, t.Value); err != nil {
			http.Error(w, err.Error(), 400)
			return
		}
	case "/fake/state":
		json.NewEncoder(w).Encode(map[string]any{
			"state": s.State(), "memory_digest": s.MemoryDigest(), "requests": s.Requests(),
		})
		return
	default:
		http.NotFound(w, r)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}
