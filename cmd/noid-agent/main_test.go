package main

import (
	"context"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/noid-vm/noid/internal/agent/client"
	"github.com/noid-vm/noid/internal/agent/proto"
)

func TestMain(m *testing.M) {
	if os.Getenv("NOID_AGENT_RUN_MAIN") == "1" {
		os.Args = append([]string{"noid-agent"}, strings.Fields(os.Getenv("NOID_AGENT_ARGS"))...)
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// The binary's wiring: --listen unix:, exec, and sync refused outside init.
func TestAgentBinaryListenUnix(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "agent.sock")
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "NOID_AGENT_RUN_MAIN=1", "NOID_AGENT_ARGS=--listen unix:"+sock+" --log-level debug")
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()

	var conn net.Conn
	deadline := time.Now().Add(20 * time.Second)
	for {
		var err error
		if conn, err = net.Dial("unix", sock); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("agent never listened: %v", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := client.Connect(ctx, conn, client.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if ack := c.Agent(); ack.PID != cmd.Process.Pid {
		t.Fatalf("ack pid %d, want %d", ack.PID, cmd.Process.Pid)
	}
	p, err := c.Exec(ctx, proto.ExecRequest{Argv: []string{"echo", "hi"}})
	if err != nil {
		t.Fatal(err)
	}
	out, _ := io.ReadAll(p.Stdout())
	if e, err := p.Wait(); err != nil || e.Code != 0 || string(out) != "hi\n" {
		t.Fatalf("exec: %q %+v %v", out, e, err)
	}
	before := time.Now()
	res, err := c.Sync(ctx, proto.Sync{TimeUnixNano: 1, Entropy: make([]byte, 32), Identity: &proto.Identity{Hostname: "must-not-change"}})
	if err == nil || res.ClockSet || res.EntropyBytes != 0 || len(res.Changed) != 0 {
		t.Fatalf("sync outside init was applied: %+v %v", res, err)
	}
	// Wall clocks (Round(0) drops the monotonic reading, which a clock step
	// does not move): the sync asked for 1 ns after the epoch.
	if now := time.Now().Round(0); now.Before(before.Round(0).Add(-time.Minute)) || now.Year() < 2000 {
		t.Fatalf("the clock moved: %v before the sync, %v after", before.Round(0), now)
	}
	if h, _ := os.Hostname(); h == "must-not-change" {
		t.Fatal("hostname changed")
	}
}
