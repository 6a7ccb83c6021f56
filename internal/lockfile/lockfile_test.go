package lockfile

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// A child process started with this variable set takes the lock at its
// value, prints "locked" and waits for stdin to close.
const holdEnv = "LOCKFILE_TEST_HOLD"

func TestMain(m *testing.M) {
	if p := os.Getenv(holdEnv); p != "" {
		l, err := TryLock(p, "child")
		if err != nil {
			fmt.Println("error:", err)
			os.Exit(1)
		}
		fmt.Println("locked")
		bufio.NewReader(os.Stdin).ReadString('\n')
		l.Close()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func lockPath(t *testing.T) string {
	return filepath.Join(t.TempDir(), "test.lock")
}

// TestSecondLockFails: a second open file description of the same file,
// even in the same process, cannot take the lock, and learns the holder's
// pid and note.
func TestSecondLockFails(t *testing.T) {
	p := lockPath(t)
	l, err := TryLock(p, "serve /run/noid/noid.sock")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	l2, err := TryLock(p, "second")
	if err == nil {
		l2.Close()
		t.Fatal("a second TryLock on a held lock succeeded")
	}
	var held *HeldError
	if !errors.As(err, &held) || !errors.Is(err, ErrHeld) {
		t.Fatalf("error %v (%T) is not a *HeldError / ErrHeld", err, err)
	}
	if held.Holder.PID != os.Getpid() || held.Holder.Note != "serve /run/noid/noid.sock" {
		t.Errorf("holder %+v, want pid %d and the first note", held.Holder, os.Getpid())
	}
	if !strings.Contains(err.Error(), p) || !strings.Contains(err.Error(), "pid "+strconv.Itoa(os.Getpid())) {
		t.Errorf("error %q does not name the file and the pid", err)
	}
	if !held.Holder.Alive() {
		t.Error("the holder (this process) is not alive")
	}
}

// TestCloseReleases: after Close the lock can be taken again, and the file
// no longer names a holder.
func TestCloseReleases(t *testing.T) {
	p := lockPath(t)
	l, err := TryLock(p, "first")
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if err := l.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if h, err := ReadHolder(p); err != nil || h.PID != 0 || h.Note != "" {
		t.Errorf("after Close the file records %+v (%v), want nobody", h, err)
	}
	l2, err := TryLock(p, "second")
	if err != nil {
		t.Fatalf("TryLock after Close: %v", err)
	}
	defer l2.Close()
	if h, err := ReadHolder(p); err != nil || h.PID != os.Getpid() || h.Note != "second" {
		t.Errorf("the file records %+v (%v), want this pid and \"second\"", h, err)
	}
}

// TestStaleFile: a lock file left by a process that died (its pid is
// gone) is no obstacle: the flock, not the file, is the lock.
func TestStaleFile(t *testing.T) {
	p := lockPath(t)
	dead := exec.Command("true")
	if err := dead.Run(); err != nil {
		t.Fatal(err)
	}
	pid := dead.Process.Pid
	if err := os.WriteFile(p, []byte(fmt.Sprintf("%d\nserve /old.sock\n", pid)), 0o644); err != nil {
		t.Fatal(err)
	}
	if h, _ := ReadHolder(p); h.PID != pid || h.Alive() {
		t.Fatalf("stale holder %+v: want pid %d, not alive", h, pid)
	}
	l, err := TryLock(p, "new")
	if err != nil {
		t.Fatalf("TryLock over a stale file: %v", err)
	}
	defer l.Close()
	if h, _ := ReadHolder(p); h.PID != os.Getpid() || h.Note != "new" {
		t.Errorf("the file records %+v, want this process", h)
	}
}

// TestOtherProcess: a lock held by another process is refused with that
// process's pid, and is free again as soon as the process is killed,
// without it closing anything.
func TestOtherProcess(t *testing.T) {
	p := lockPath(t)
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), holdEnv+"="+p)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	defer stdin.Close()
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	if line, _ := bufio.NewReader(out).ReadString('\n'); line != "locked\n" {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("child said %q", line)
	}
	_, err = TryLock(p, "parent")
	var held *HeldError
	if !errors.As(err, &held) || held.Holder.PID != cmd.Process.Pid || held.Holder.Note != "child" {
		t.Errorf("TryLock while the child holds it: %v (holder %+v), want the child's pid %d", err, held, cmd.Process.Pid)
	}
	cmd.Process.Kill()
	cmd.Wait()
	l, err := TryLock(p, "parent")
	if err != nil {
		t.Fatalf("TryLock after the holder was killed: %v", err)
	}
	l.Close()
}

// TestNotInherited: a child started while the lock is held does not keep
// it: once the parent closes it, it is free although the child still runs.
// (VMMs outlive noid-server and must not pin its locks.)
func TestNotInherited(t *testing.T) {
	p := lockPath(t)
	l, err := TryLock(p, "parent")
	if err != nil {
		t.Fatal(err)
	}
	child := exec.Command("sleep", "60")
	if err := child.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { child.Process.Kill(); child.Wait() }()
	l.Close()
	l2, err := TryLock(p, "again")
	if err != nil {
		t.Fatalf("TryLock while a child of the old holder runs: %v", err)
	}
	l2.Close()
}

// TestAcquire: Acquire waits while wait says so and takes the lock once it
// is released; it gives up at once when wait says no, and when ctx ends.
func TestAcquire(t *testing.T) {
	p := lockPath(t)
	l, err := TryLock(p, "offline add-user")
	if err != nil {
		t.Fatal(err)
	}
	// wait says no: the *HeldError comes back at once.
	_, err = Acquire(context.Background(), p, "serve", time.Millisecond, func(*HeldError) bool { return false })
	var held *HeldError
	if !errors.As(err, &held) || held.Holder.Note != "offline add-user" {
		t.Fatalf("Acquire with wait=false: %v", err)
	}
	// ctx ends while waiting.
	ctx, cancel := context.WithCancel(context.Background())
	asked := 0
	_, err = Acquire(ctx, p, "serve", time.Millisecond, func(*HeldError) bool {
		if asked++; asked == 3 {
			cancel()
		}
		return true
	})
	if !errors.Is(err, context.Canceled) || !errors.Is(err, ErrHeld) {
		t.Fatalf("Acquire after ctx ended: %v, want context.Canceled and ErrHeld", err)
	}
	// Released while Acquire waits: Acquire gets it.
	waiting := make(chan struct{})
	got := make(chan error, 1)
	go func() {
		first := true
		l2, err := Acquire(context.Background(), p, "serve", time.Millisecond, func(h *HeldError) bool {
			if first {
				first = false
				close(waiting)
			}
			return true
		})
		if err == nil {
			if h, _ := ReadHolder(p); h.Note != "serve" {
				err = fmt.Errorf("after Acquire the file records %+v", h)
			}
			l2.Close()
		}
		got <- err
	}()
	<-waiting
	l.Close()
	select {
	case err := <-got:
		if err != nil {
			t.Fatalf("Acquire after release: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Acquire did not take the released lock")
	}
}
