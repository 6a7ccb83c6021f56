package client_test

import (
	"bytes"
	"context"
	"fmt"
	"log"
	"os"
	"strings"
	"time"

	"github.com/noid-vm/noid/client"
)

// These examples run as tests against a real noid-server: `go test -tags
// e2e ./client/` as root starts one with the tiny test image (see
// main_e2e_test.go) and points NOID_URL at it. Without the tag or root they
// are compiled but skipped.

// Create a VM, and destroy it when done.
func ExampleClient_CreateVM() {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	c, err := client.New(os.Getenv("NOID_URL"), os.Getenv("NOID_TOKEN"))
	if err != nil {
		log.Fatal(err)
	}
	vm, err := c.CreateVM(ctx, client.CreateVMRequest{Name: "example-create", VCPUs: 1})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(vm.Name, vm.State, vm.VCPUs, "vCPU")

	res, err := c.DestroyVM(ctx, vm.Name)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("destroyed", res.Name)
	// Output:
	// example-create running 1 vCPU
	// destroyed example-create
}

// Run a command, streaming its output as it is produced, and feed it stdin.
func ExampleClient_Exec() {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	c, err := client.New(os.Getenv("NOID_URL"), os.Getenv("NOID_TOKEN"))
	if err != nil {
		log.Fatal(err)
	}
	if _, err := c.CreateVM(ctx, client.CreateVMRequest{Name: "example-exec"}); err != nil {
		log.Fatal(err)
	}
	defer c.DestroyVM(ctx, "example-exec")

	// stdout goes straight to ours as it arrives; stderr is kept apart.
	var stderr bytes.Buffer
	st, err := c.Exec(ctx, "example-exec",
		client.ExecRequest{Argv: []string{"sh", "-c", "for i in 1 2 3; do echo line $i; done; echo oops >&2; exit 3"}},
		client.ExecIO{Stdout: os.Stdout, Stderr: &stderr})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("stderr: %q, exit code %d\n", stderr.String(), st.Code)

	// stdin is forwarded until EOF.
	st, err = c.Exec(ctx, "example-exec",
		client.ExecRequest{Argv: []string{"sh", "-c", "read name; echo hello, $name"}, Env: map[string]string{"LANG": "C"}},
		client.ExecIO{Stdin: strings.NewReader("noid\n"), Stdout: os.Stdout})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("exit code", st.Code)
	// Output:
	// line 1
	// line 2
	// line 3
	// stderr: "oops\n", exit code 3
	// hello, noid
	// exit code 0
}

// Checkpoint a VM, break it, and rewind it in place.
func ExampleClient_Checkpoint() {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	c, err := client.New(os.Getenv("NOID_URL"), os.Getenv("NOID_TOKEN"))
	if err != nil {
		log.Fatal(err)
	}
	if _, err := c.CreateVM(ctx, client.CreateVMRequest{Name: "example-cp"}); err != nil {
		log.Fatal(err)
	}
	defer c.DestroyVM(ctx, "example-cp")
	run := func(cmd string) {
		var out bytes.Buffer
		if _, err := c.Exec(ctx, "example-cp", client.ExecRequest{Argv: []string{"sh", "-c", cmd}}, client.ExecIO{Stdout: &out}); err != nil {
			log.Fatal(err)
		}
		fmt.Print(out.String())
	}

	run("echo good > /root/state")
	cp, err := c.Checkpoint(ctx, "example-cp", client.CheckpointRequest{Name: "clean", Label: "known good"})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("checkpoint", cp.Name, "of", cp.VM)

	run("echo broken > /root/state; cat /root/state")
	if _, err := c.Restore(ctx, "example-cp", "clean"); err != nil {
		log.Fatal(err)
	}
	run("cat /root/state")

	cps, err := c.ListCheckpoints(ctx, "example-cp")
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(len(cps), "checkpoint:", cps[0].Name, cps[0].Label)
	// Output:
	// checkpoint clean of example-cp
	// broken
	// good
	// 1 checkpoint: clean known good
}

// Clone a checkpoint into a new, independent VM with its own identity.
func ExampleClient_Clone() {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	c, err := client.New(os.Getenv("NOID_URL"), os.Getenv("NOID_TOKEN"))
	if err != nil {
		log.Fatal(err)
	}
	if _, err := c.CreateVM(ctx, client.CreateVMRequest{Name: "example-src"}); err != nil {
		log.Fatal(err)
	}
	defer c.DestroyVM(ctx, "example-src")
	if _, err := c.Exec(ctx, "example-src", client.ExecRequest{Argv: []string{"sh", "-c", "echo prepared > /root/setup"}}, client.ExecIO{}); err != nil {
		log.Fatal(err)
	}
	if _, err := c.Checkpoint(ctx, "example-src", client.CheckpointRequest{Name: "ready"}); err != nil {
		log.Fatal(err)
	}

	clone, err := c.Clone(ctx, "example-src", "ready", "example-clone")
	if err != nil {
		log.Fatal(err)
	}
	defer c.DestroyVM(ctx, clone.Name)
	fmt.Println("clone", clone.Name, "boot path", clone.BootPath)

	// The clone has the source's files and its own hostname.
	if _, err := c.Exec(ctx, clone.Name, client.ExecRequest{Argv: []string{"sh", "-c", "cat /root/setup; hostname"}}, client.ExecIO{Stdout: os.Stdout}); err != nil {
		log.Fatal(err)
	}
	// Output:
	// clone example-clone boot path clone
	// prepared
	// example-clone
}
