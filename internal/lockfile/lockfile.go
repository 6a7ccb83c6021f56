// Package lockfile provides exclusive locks on files with flock(2) that
// record who holds them.
//
// A lock belongs to an open file description: the kernel releases it when
// the holder closes the file or exits, however it exits, so a lock file
// left behind by a killed process never blocks anyone. The holder writes
// its pid and a note into the file; another process that fails to take the
// lock reads them to say who is in the way. The file itself is never
// removed (removing it would let two processes lock two different files of
// one name).
//
// Files are opened close-on-exec, so child processes (VMMs that outlive
// noid-server) do not inherit the lock.
package lockfile

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// ErrHeld is what a *HeldError unwraps to: another open file description
// holds the lock.
var ErrHeld = errors.New("lock is held")

// Holder is what the process holding a lock recorded in the lock file.
type Holder struct {
	// PID is the holder's process id; 0 when the file records none (the
	// holder has not written it yet, or it is not a lockfile holder).
	PID int
	// Note is the text the holder passed to TryLock.
	Note string
}

// Alive reports whether a process with the holder's pid exists. A false
// answer for a held lock means the holder has just taken it and not yet
// written its own pid over its predecessor's.
func (h Holder) Alive() bool {
	if h.PID <= 0 {
		return false
	}
	err := unix.Kill(h.PID, 0)
	return err == nil || errors.Is(err, unix.EPERM)
}

// HeldError is returned by TryLock when the lock is held elsewhere.
type HeldError struct {
	// Path is the lock file.
	Path string
	// Holder is who holds it, as recorded in the file.
	Holder Holder
}

// Error names the lock file and the holder's pid.
func (e *HeldError) Error() string {
	if e.Holder.PID <= 0 {
		return fmt.Sprintf("%s is locked by another process", e.Path)
	}
	return fmt.Sprintf("%s is locked by pid %d", e.Path, e.Holder.PID)
}

// Unwrap returns ErrHeld.
func (e *HeldError) Unwrap() error { return ErrHeld }

// Lock is a held lock. Close releases it.
type Lock struct {
	f    *os.File
	path string
}

// TryLock takes the exclusive lock on path without waiting, creating the
// file (mode 0644) if needed, and records the caller's pid and note (one
// line) in it. When another open file description holds the lock, even one
// of this process, it returns a *HeldError naming the holder.
func TryLock(path, note string) (*Lock, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("opening lock file: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		defer f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, &HeldError{Path: path, Holder: readHolder(f)}
		}
		return nil, fmt.Errorf("locking %s: %w", path, err)
	}
	l := &Lock{f: f, path: path}
	if err := l.record(note); err != nil {
		f.Close()
		return nil, err
	}
	return l, nil
}

// Acquire is TryLock that keeps trying, every poll interval, while the lock
// is held and wait returns true for the *HeldError; it returns the last
// *HeldError once wait returns false, and ctx's error wrapped with it when
// ctx ends first.
func Acquire(ctx context.Context, path, note string, poll time.Duration, wait func(*HeldError) bool) (*Lock, error) {
	t := time.NewTicker(poll)
	defer t.Stop()
	for {
		l, err := TryLock(path, note)
		var held *HeldError
		if err == nil || !errors.As(err, &held) || !wait(held) {
			return l, err
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("%w; gave up waiting: %w", held, ctx.Err())
		case <-t.C:
		}
	}
}

// ReadHolder returns who holds, or last held, the lock at path, as recorded
// in the file. It does not tell whether the lock is held now; TryLock does.
func ReadHolder(path string) (Holder, error) {
	f, err := os.Open(path)
	if err != nil {
		return Holder{}, fmt.Errorf("reading lock file: %w", err)
	}
	defer f.Close()
	return readHolder(f), nil
}

// record replaces the file's content with "<pid>\n<note>\n".
func (l *Lock) record(note string) error {
	note = strings.ReplaceAll(note, "\n", " ")
	if err := l.f.Truncate(0); err != nil {
		return fmt.Errorf("writing lock file %s: %w", l.path, err)
	}
	if _, err := l.f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"+note+"\n"), 0); err != nil {
		return fmt.Errorf("writing lock file %s: %w", l.path, err)
	}
	return nil
}

func readHolder(f *os.File) Holder {
	b, err := io.ReadAll(io.NewSectionReader(f, 0, 4096))
	if err != nil {
		return Holder{}
	}
	pid, note, _ := strings.Cut(string(b), "\n")
	var h Holder
	if n, err := strconv.Atoi(strings.TrimSpace(pid)); err == nil && n > 0 {
		h.PID = n
	}
	h.Note = strings.TrimSuffix(note, "\n")
	return h
}

// Path returns the lock file's path.
func (l *Lock) Path() string { return l.path }

// Close empties the lock file (so it names no holder) and releases the
// lock. It is safe to call more than once.
func (l *Lock) Close() error {
	if l == nil || l.f == nil {
		return nil
	}
	f := l.f
	l.f = nil
	// Empty it while still holding the lock: nobody reads a stale holder.
	terr := f.Truncate(0)
	if err := f.Close(); err != nil {
		return fmt.Errorf("releasing lock %s: %w", l.path, err)
	}
	if terr != nil {
		return fmt.Errorf("releasing lock %s: %w", l.path, terr)
	}
	return nil
}
