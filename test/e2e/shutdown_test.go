//go:build e2e

package e2e

import (
	"errors"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/noid-vm/noid/client"
)

// lineWriter is an exec's stdout that reports when a line has come.
type lineWriter struct {
	buf   strings.Builder
	want  string
	ready chan struct{}
}

func (w *lineWriter) Write(p []byte) (int, error) {
	w.buf.Write(p)
	if w.ready != nil && strings.Contains(w.buf.String(), w.want) {
		close(w.ready)
		w.ready = nil
	}
	return len(p), nil
}

// TestShutdownIsBounded: SIGTERM with an exec stream (sleep 600), a
// checkpoint held in flight (it would never end by itself) and a create in
// flight: the server exits within shutdown_timeout plus the grace for
// cancelled requests, the exec client and the create client are told the
// server is shutting down, VM processes keep running, and the next server
// re-adopts them.
func TestShutdownIsBounded(t *testing.T) {
	e := NewEnv(t, WithConfig("[http]\nshutdown_timeout = \"2s\""))
	e.Stop()
	e.ServerEnv = []string{"NOID_HOLDPOINT=checkpoint.after-copy"}
	e.Start()
	a := e.Create("a")

	type result struct {
		err  error
		code int
	}
	execDone := make(chan result, 1)
	out := &lineWriter{want: "ready", ready: make(chan struct{})}
	started := out.ready
	go func() {
		st, err := e.Client.Exec(ctx(t), "a", client.ExecRequest{Argv: []string{"sh", "-c", "echo ready; sleep 600"}}, client.ExecIO{Stdout: out})
		execDone <- result{err, st.Code}
	}()
	select {
	case <-started:
	case r := <-execDone:
		t.Fatalf("the exec ended before the shutdown: %+v", r)
	}

	cpDone := make(chan error, 1)
	go func() {
		_, err := e.Client.Checkpoint(ctx(t), "a", client.CheckpointRequest{Name: "held"})
		cpDone <- err
	}()
	waitFor(t, "the checkpoint at its hold point", func() bool { return strings.Contains(e.Log(), "noid holdpoint: checkpoint.after-copy") })

	createDone := make(chan error, 1)
	go func() {
		_, err := e.Client.CreateVM(ctx(t), client.CreateVMRequest{Name: "b"})
		createDone <- err
	}()
	waitFor(t, "the create to begin", func() bool {
		v, err := e.Client.GetVM(ctx(t), "b")
		return err == nil && v.State == "creating"
	})

	e.cmd.Process.Signal(syscall.SIGTERM)
	sent := time.Now()
	select {
	case <-e.exited:
		t.Logf("noid-server exited %s after SIGTERM", time.Since(sent).Round(time.Millisecond))
	case <-time.After(45 * time.Second): // shutdown_timeout + the grace for cancelled requests + closing, with room
		t.Fatalf("noid-server still runs 45s after SIGTERM with a 2s shutdown_timeout:\n%s", lastLines(e.Log(), 30))
	}
	if code := e.cmd.ProcessState.ExitCode(); code != 0 {
		t.Errorf("noid-server exited with %d", code)
	}

	r := <-execDone
	if r.err == nil || !strings.Contains(r.err.Error(), "shutting down") || !errors.Is(r.err, client.ErrUnavailable) {
		t.Errorf("the exec client got %v (exit %d), want unavailable: the server is shutting down", r.err, r.code)
	}
	createErr := <-createDone
	t.Logf("the exec client got: %v; the create client got: %v", r.err, createErr)
	if createErr != nil && (!strings.Contains(createErr.Error(), "shutting down") || !errors.Is(createErr, client.ErrUnavailable)) {
		t.Errorf("the create client got %v, want unavailable: the server is shutting down", createErr)
	}
	if err := <-cpDone; err == nil {
		t.Error("the held checkpoint succeeded")
	}
	if err := syscall.Kill(a.PID, 0); err != nil {
		t.Errorf("the VMM of a (pid %d) did not outlive the server: %v", a.PID, err)
	}

	e.ServerEnv = nil
	e.Start()
	v, err := e.Client.GetVM(ctx(t), "a")
	if err != nil || v.State != "running" || v.PID != a.PID {
		t.Fatalf("a after the restart: %+v %v (pid was %d)", v, err, a.PID)
	}
	if out := e.MustExec("a", "echo", "back"); out != "back\n" {
		t.Errorf("exec in a after the restart: %q", out)
	}
	if cps, err := e.Client.ListCheckpoints(ctx(t), "a"); err != nil || len(cps) != 0 {
		t.Errorf("checkpoints of a after the held one was cut: %+v %v", cps, err)
	}
	b, err := e.Client.GetVM(ctx(t), "b")
	switch {
	case createErr == nil && (err != nil || b.State != "running"):
		t.Errorf("b, whose create succeeded, after the restart: %+v %v", b, err)
	case createErr != nil && !errors.Is(err, client.ErrNotFound):
		t.Errorf("b, whose create was cancelled, after the restart: %+v %v", b, err)
	}
}

// TestWriteTimeoutSparesLongWork: with a write_timeout far shorter than a
// create under TCG and than an exec, the create's answer arrives and the
// exec stream, silent for longer than write_timeout, runs to its end.
func TestWriteTimeoutSparesLongWork(t *testing.T) {
	e := NewEnv(t, WithConfig("[http]\nwrite_timeout = \"1s\""))
	v := e.Create("slow")
	if v.State != "running" {
		t.Fatalf("create: %+v", v)
	}
	out, _, code := e.Exec("slow", "sh", "-c", "echo start; sleep 3; echo done")
	if code != 0 || out != "start\ndone\n" {
		t.Errorf("an exec silent for 3s with a 1s write_timeout: exit %d, %q", code, out)
	}
	if r := e.CLI("", "exec", "slow", "--", "sh", "-c", "sleep 2; echo cli"); r.Code != 0 || r.Stdout != "cli\n" {
		t.Errorf("noid exec past write_timeout: exit %d %q %s", r.Code, r.Stdout, r.Stderr)
	}
}

// waitFor polls cond until it holds, or fails the test after a minute.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("waiting for %s: timed out", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
