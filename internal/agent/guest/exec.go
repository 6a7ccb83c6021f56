package guest

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/noid-vm/noid/internal/agent/proto"
)

// defaultEnv is the environment every process starts from; ExecRequest.Env
// entries are added to it and override it.
var defaultEnv = []string{
	"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
	"HOME=/root",
	"LANG=C.UTF-8",
}

// buildEnv merges extra KEY=VALUE entries over the default environment.
func buildEnv(extra []string, tty bool) []string {
	term := "TERM=dumb"
	if tty {
		term = "TERM=xterm-256color"
	}
	base := append(append([]string{}, defaultEnv...), term)
	idx := map[string]int{}
	for i, kv := range base {
		k, _, _ := strings.Cut(kv, "=")
		idx[k] = i
	}
	for _, kv := range extra {
		k, _, ok := strings.Cut(kv, "=")
		if !ok || k == "" || strings.ContainsRune(kv, 0) {
			continue
		}
		if i, ok := idx[k]; ok {
			base[i] = kv
		} else {
			idx[k] = len(base)
			base = append(base, kv)
		}
	}
	return base
}

func envGet(env []string, key string) string {
	for _, kv := range env {
		if k, v, ok := strings.Cut(kv, "="); ok && k == key {
			return v
		}
	}
	return ""
}

// lookPath finds file in the PATH of the process's environment (not the
// agent's own), like a shell would.
func lookPath(file, path, cwd string) (string, error) {
	isExec := func(p string) error {
		fi, err := os.Stat(p)
		if err != nil {
			return err
		}
		if fi.IsDir() || fi.Mode()&0o111 == 0 {
			return fmt.Errorf("%s: permission denied", p)
		}
		return nil
	}
	if strings.Contains(file, "/") {
		p := file
		if !filepath.IsAbs(p) {
			p = filepath.Join(cwd, p)
		}
		if err := isExec(p); err != nil {
			return "", err
		}
		return file, nil
	}
	for _, dir := range filepath.SplitList(path) {
		if dir == "" {
			dir = "."
		}
		p := filepath.Join(dir, file)
		if !filepath.IsAbs(p) {
			p = filepath.Join(cwd, p)
		}
		if isExec(p) == nil {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s: executable file not found in PATH", file)
}

// loginShell returns the argv of the console's shell.
func loginShell() []string {
	if fi, err := os.Stat("/bin/bash"); err == nil && fi.Mode()&0o111 != 0 {
		return []string{"/bin/bash", "-l"}
	}
	return []string{"/bin/sh", "-l"}
}

// runExec runs one process for an exec or console stream and streams its
// I/O until it exits, then sends EOF on the output channels and EXIT.
func (s *session) runExec(h *handler, req proto.ExecRequest, console bool) {
	a := s.a
	st := h.st
	start := time.Now()
	if console {
		req.Argv, req.TTY, req.Stdin = loginShell(), true, true
	}
	if len(req.Argv) == 0 || req.Argv[0] == "" {
		s.finish(h, proto.Exit{Code: -1, Error: "empty argv"})
		return
	}
	env := buildEnv(req.Env, req.TTY)
	cwd := req.Cwd
	if cwd == "" {
		cwd = envGet(env, "HOME")
		if fi, err := os.Stat(cwd); err != nil || !fi.IsDir() {
			cwd = "/"
		}
	}
	path, err := lookPath(req.Argv[0], envGet(env, "PATH"), cwd)
	if err != nil {
		s.finish(h, proto.Exit{Code: -1, Error: err.Error()})
		return
	}
	cmd := &exec.Cmd{Path: path, Args: req.Argv, Env: env, Dir: cwd,
		SysProcAttr: &syscall.SysProcAttr{Setsid: true}}

	var (
		stdinW  io.WriteCloser // where host stdin goes
		outs    []*os.File     // output sources, index = channel-1
		ptmx    *os.File
		closers []*os.File // child ends, closed after start
	)
	fail := func(err error) {
		for _, f := range closers {
			f.Close()
		}
		for _, f := range outs {
			f.Close()
		}
		if stdinW != nil {
			stdinW.Close()
		}
		s.finish(h, proto.Exit{Code: -1, Error: err.Error()})
	}
	if req.TTY {
		var tty *os.File
		ptmx, tty, err = openPTY()
		if err != nil {
			fail(fmt.Errorf("allocating a terminal: %w", err))
			return
		}
		rows, cols := req.Rows, req.Cols
		if rows == 0 || cols == 0 {
			rows, cols = 24, 80
		}
		_ = setWinsize(ptmx, rows, cols)
		cmd.Stdin, cmd.Stdout, cmd.Stderr = tty, tty, tty
		cmd.SysProcAttr.Setctty = true
		cmd.SysProcAttr.Ctty = 0
		closers = append(closers, tty)
		outs = []*os.File{ptmx}
		if req.Stdin {
			stdinW = ptmx
		}
	} else {
		if req.Stdin {
			r, w, err := os.Pipe()
			if err != nil {
				fail(fmt.Errorf("creating stdin pipe: %w", err))
				return
			}
			cmd.Stdin, stdinW = r, w
			closers = append(closers, r)
		}
		for i := 0; i < 2; i++ {
			r, w, err := os.Pipe()
			if err != nil {
				fail(fmt.Errorf("creating output pipe: %w", err))
				return
			}
			outs = append(outs, r)
			closers = append(closers, w)
		}
		cmd.Stdout, cmd.Stderr = closers[len(closers)-2], closers[len(closers)-1]
	}

	pid, waitCh, err := a.reaper.Start(cmd)
	for _, f := range closers {
		f.Close()
	}
	closers = nil
	if err != nil {
		fail(fmt.Errorf("starting %s: %w", req.Argv[0], err))
		return
	}
	a.log.Debug("exec started", "session", s.n, "stream", st.ID(), "argv0", req.Argv[0], "pid", pid, "tty", req.TTY)

	var reaped atomic.Bool
	signalGroup := func(sig syscall.Signal) {
		if reaped.Load() {
			return
		}
		_ = unix.Kill(-pid, sig)
	}
	h.setHangup(func() {
		signalGroup(syscall.SIGHUP)
		signalGroup(syscall.SIGCONT)
	})

	// Controls: signals and resizes, in order, until the stream ends.
	ctlDone := make(chan struct{})
	go func() {
		for {
			select {
			case c := <-h.ctl:
				if c.Signal > 0 && c.Signal < 65 {
					signalGroup(syscall.Signal(c.Signal))
				}
				if c.Rows > 0 && c.Cols > 0 && ptmx != nil {
					_ = setWinsize(ptmx, c.Rows, c.Cols)
				}
			case <-st.Done():
				return
			case <-ctlDone:
				return
			}
		}
	}()

	// Host stdin.
	if stdinW != nil {
		go func() {
			_, _ = io.Copy(stdinW, st.Reader(proto.ChanStdin))
			if ptmx != nil {
				_, _ = ptmx.Write([]byte{4}) // ^D: end of input on a terminal
			} else {
				stdinW.Close()
			}
		}()
	}

	// Output.
	var outWG sync.WaitGroup
	for i, f := range outs {
		outWG.Add(1)
		go func() {
			defer outWG.Done()
			copyOutput(st, uint8(i+1), f)
		}()
	}

	var timedOut atomic.Bool
	var timer *time.Timer
	if req.TimeoutMS > 0 {
		timer = time.AfterFunc(time.Duration(req.TimeoutMS)*time.Millisecond, func() {
			timedOut.Store(true)
			signalGroup(syscall.SIGKILL)
		})
	}

	ws := <-waitCh
	if timer != nil {
		timer.Stop()
	}
	reaped.Store(true)
	// Children that inherited the output keep it open: read what is there
	// for at most DrainTimeout, then stop.
	for _, f := range outs {
		_ = f.SetReadDeadline(time.Now().Add(a.cfg.DrainTimeout))
	}
	outWG.Wait()
	for _, f := range outs {
		f.Close()
	}
	close(ctlDone)

	code, sig := exitFromStatus(ws)
	e := proto.Exit{Code: code, Signal: sig}
	if timedOut.Load() {
		e.Code, e.TimedOut = 124, true
	}
	_ = st.CloseWrite(proto.ChanStdout)
	if !req.TTY {
		_ = st.CloseWrite(proto.ChanStderr)
	}
	a.log.Debug("exec exited", "session", s.n, "stream", st.ID(), "pid", pid, "code", e.Code, "signal", e.Signal,
		"timed_out", e.TimedOut, "duration", time.Since(start).Round(time.Millisecond))
	s.finish(h, e)
}

// copyOutput copies f to channel ch of st until EOF, until the stream dies
// (then f is closed, so the writer gets EPIPE), or until a read deadline set
// after the process exited expires; then it drains whatever is immediately
// available (bounded to one second) and returns.
func copyOutput(st *proto.Stream, ch uint8, f *os.File) {
	buf := make([]byte, 128<<10)
	var drainEnd time.Time
	for {
		if !drainEnd.IsZero() {
			if time.Now().After(drainEnd) {
				return
			}
			_ = f.SetReadDeadline(time.Now().Add(5 * time.Millisecond))
		}
		n, err := f.Read(buf)
		if n > 0 {
			if _, werr := st.Write(ch, buf[:n]); werr != nil {
				f.Close()
				return
			}
		}
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) && drainEnd.IsZero() {
				drainEnd = time.Now().Add(time.Second)
				continue
			}
			return // EOF, EIO from a terminal whose slave closed, deadline in drain
		}
	}
}
