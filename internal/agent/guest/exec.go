package guest

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/noid-vm/noid/internal/agent/proto"
)

// unignoreHangup makes sure, once, that the processes the agent starts do
// not inherit an ignored SIGHUP (see catchHangup).
var unignoreHangup sync.Once

// catchHangup has the agent catch SIGHUP (and drop it) when it was started
// with SIGHUP ignored, under nohup say: an ignored signal stays ignored
// across exec, so every process of an exec would ignore the SIGHUP that
// ends it when its host connection goes; a caught one is reset to the
// default in the child.
func catchHangup() {
	if !signal.Ignored(syscall.SIGHUP) {
		return
	}
	ch := make(chan os.Signal, 1)
	signal.Notify(ch, syscall.SIGHUP)
	go func() {
		for range ch {
		}
	}()
}

// defaultEnv is the environment every process starts from; ExecRequest.Env
// entries are added to it and override it.
var defaultEnv = []string{
	"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
	"HOME=/root",
	"LANG=C.UTF-8",
}

// buildEnv merges extra KEY=VALUE entries over the default environment.
// For a user other than the default root (u != nil), HOME is the user's
// home and USER and LOGNAME name the user.
func buildEnv(extra []string, tty bool, u *guestUser) []string {
	term := "TERM=dumb"
	if tty {
		term = "TERM=xterm-256color"
	}
	base := append(append([]string{}, defaultEnv...), term)
	if u != nil {
		extra = append([]string{"HOME=" + u.Home, "USER=" + u.Name, "LOGNAME=" + u.Name}, extra...)
	}
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

// startError says why a process could not be started; reason is the
// proto.Reason* constant sent in the EXIT.
type startError struct {
	reason string
	msg    string
}

func (e *startError) Error() string { return e.msg }

// failedStart is the EXIT of a process that could not be started.
func failedStart(err error) proto.Exit {
	e := proto.Exit{Code: -1, Error: err.Error()}
	var se *startError
	if errors.As(err, &se) {
		e.Reason = se.reason
	}
	return e
}

// lookPath finds file in the PATH of the process's environment (not the
// agent's own), like a shell would: a name with a slash is used as it is,
// others are searched in PATH, where the first executable file wins and a
// non-executable one is reported only when there is no executable one.
// Failures are startErrors: not found, or not executable.
func lookPath(file, path, cwd string) (string, error) {
	abs := func(p string) string {
		if !filepath.IsAbs(p) {
			return filepath.Join(cwd, p)
		}
		return p
	}
	if strings.Contains(file, "/") {
		fi, err := os.Stat(abs(file))
		switch {
		case errors.Is(err, os.ErrNotExist) || errors.Is(err, syscall.ENOTDIR):
			return "", &startError{proto.ReasonNotFound, file + ": no such file or directory"}
		case err != nil:
			return "", &startError{proto.ReasonNotExecutable, fmt.Sprintf("%s: %v", file, errnoText(err))}
		case fi.IsDir():
			return "", &startError{proto.ReasonNotExecutable, file + ": is a directory"}
		case fi.Mode()&0o111 == 0:
			return "", &startError{proto.ReasonNotExecutable, file + ": permission denied"}
		}
		return file, nil
	}
	denied := ""
	for _, dir := range filepath.SplitList(path) {
		if dir == "" {
			dir = "."
		}
		p := abs(filepath.Join(dir, file))
		fi, err := os.Stat(p)
		if err != nil || fi.IsDir() {
			continue
		}
		if fi.Mode()&0o111 != 0 {
			return p, nil
		}
		if denied == "" {
			denied = p
		}
	}
	if denied != "" {
		return "", &startError{proto.ReasonNotExecutable, denied + ": permission denied"}
	}
	return "", &startError{proto.ReasonNotFound, file + ": command not found"}
}

// execError classifies the error of starting path (found by lookPath): the
// errno of a failed execve, as a shell would report it.
func execError(argv0 string, err error) error {
	var errno syscall.Errno
	if !errors.As(err, &errno) {
		return fmt.Errorf("starting %s: %w", argv0, err)
	}
	switch errno {
	case syscall.ENOENT:
		// The file was there: its #! interpreter or ELF loader is not.
		return &startError{proto.ReasonNotFound, argv0 + ": bad interpreter or loader: no such file or directory"}
	case syscall.EACCES, syscall.ENOEXEC, syscall.EISDIR, syscall.ETXTBSY, syscall.ENOTDIR, syscall.ELOOP:
		return &startError{proto.ReasonNotExecutable, argv0 + ": " + errno.Error()}
	}
	// EPERM is left out: fork/exec reports a refused setuid or setgroups
	// (an agent that is not root) with it too.
	return fmt.Errorf("starting %s: %w", argv0, err)
}

// errnoText returns the errno's text when err wraps one (without the
// operation and path of an os.PathError), else err's text.
func errnoText(err error) string {
	var errno syscall.Errno
	if errors.As(err, &errno) {
		return errno.Error()
	}
	return err.Error()
}

// workDir checks the requested working directory (or picks the default:
// HOME when it is a directory the user may enter, otherwise /). Go's
// fork/exec reports a failed chdir and a failed execve alike, so the
// directory is checked before the start, as the user: every directory on
// its path must be searchable by the user's uid or groups.
func workDir(cwd, home string, u *guestUser) (string, error) {
	if cwd == "" {
		if fi, err := os.Stat(home); err == nil && fi.IsDir() && u.mayReach(home) {
			return home, nil
		}
		return "/", nil
	}
	fi, err := os.Stat(cwd)
	if err != nil {
		return "", &startError{proto.ReasonBadCwd, fmt.Sprintf("working directory %s: %s", cwd, errnoText(err))}
	}
	if !fi.IsDir() {
		return "", &startError{proto.ReasonBadCwd, fmt.Sprintf("working directory %s: not a directory", cwd)}
	}
	if !u.mayReach(cwd) {
		return "", &startError{proto.ReasonBadCwd, fmt.Sprintf("working directory %s: permission denied for user %s", cwd, u.Name)}
	}
	return cwd, nil
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
	unignoreHangup.Do(catchHangup)
	if console {
		req.Argv, req.TTY, req.Stdin = loginShell(), true, true
	}
	if len(req.Argv) == 0 || req.Argv[0] == "" {
		s.finish(h, proto.Exit{Code: -1, Error: "empty argv"})
		return
	}
	var u *guestUser
	if req.User != "" {
		var err error
		if u, err = lookupUser(a.cfg.EtcDir, req.User); err != nil {
			if errors.Is(err, errNoUser) || errors.Is(err, os.ErrNotExist) {
				err = &startError{proto.ReasonUnknownUser, fmt.Sprintf("no user %q in the guest's /etc/passwd", req.User)}
			}
			s.finish(h, failedStart(err))
			return
		}
	}
	env := buildEnv(req.Env, req.TTY, u)
	cwd, err := workDir(req.Cwd, envGet(env, "HOME"), u)
	if err != nil {
		s.finish(h, failedStart(err))
		return
	}
	path, err := lookPath(req.Argv[0], envGet(env, "PATH"), cwd)
	if err != nil {
		s.finish(h, failedStart(err))
		return
	}
	cmd := &exec.Cmd{Path: path, Args: req.Argv, Env: env, Dir: cwd,
		SysProcAttr: &syscall.SysProcAttr{Setsid: true}}
	if u != nil {
		cmd.SysProcAttr.Credential = &syscall.Credential{Uid: u.UID, Gid: u.GID, Groups: u.Groups}
	}

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
		s.finish(h, failedStart(err))
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
		if u != nil {
			// The user owns its terminal, as after login(1).
			_ = tty.Chown(int(u.UID), -1)
		}
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
		fail(execError(req.Argv[0], err))
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
