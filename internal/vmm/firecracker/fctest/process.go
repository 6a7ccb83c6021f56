package fctest

import (
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
)

// Environment variables of the FAKE firecracker process (see RunProcess).
const (
	// ProcessEnv set to "1" makes a test binary act as the fake (its
	// TestMain calls RunProcess).
	ProcessEnv = "NOID_FAKE_FIRECRACKER"
	// SchemaEnv is the schema file the fake validates requests against.
	SchemaEnv = "NOID_FAKE_FIRECRACKER_SCHEMA"
	// LogEnv is the file the fake appends its requests to (JSON lines).
	LogEnv = "NOID_FAKE_FIRECRACKER_LOG"
)

// RunProcess makes the current process (a re-executed test binary) play a
// FAKE firecracker process (or, when called with --exec-file, a FAKE jailer
// that execs it; see runJailer): it understands --version, --api-sock and --id,
// serves the fake API (Server) on the API socket with the working directory
// as its root, answers CONNECT on guest vsock port 1024 with an echo, and
// runs until it is killed. It never boots anything. It returns the exit
// code.
func RunProcess(args []string) int {
	for _, a := range args {
		if a == "--exec-file" {
			return runJailer(args)
		}
	}
	var sock, id string
	for i := 0; i < len(args); i++ {
		switch a := args[i]; {
		case a == "--version":
			fmt.Printf("Firecracker v%s (FAKE: the noid test double, not Firecracker)\n", FakeVersion)
			return 0
		case a == "--api-sock" && i+1 < len(args):
			sock = args[i+1]
			i++
		case a == "--id" && i+1 < len(args):
			id = args[i+1]
			i++
		}
	}
	if sock == "" {
		fmt.Fprintln(os.Stderr, "fake firecracker: no --api-sock")
		return 2
	}
	var schema *Schema
	if p := os.Getenv(SchemaEnv); p != "" {
		s, err := LoadSchema(p)
		if err != nil {
			fmt.Fprintln(os.Stderr, "fake firecracker:", err)
			return 2
		}
		schema = s
	}
	root, _ := os.Getwd()
	srv, err := Start(sock, Options{Schema: schema, Root: root, ID: id, LogPath: os.Getenv(LogEnv), AgentPorts: []uint32{1024}})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Println("fake firecracker serial console: this is a test double, no guest runs here")
	ch := make(chan os.Signal, 1)
	signal.Notify(ch, syscall.SIGTERM, syscall.SIGINT)
	<-ch
	srv.Close()
	return 0
}

// runJailer plays a FAKE jailer: it only reproduces the jailer's path
// semantics (it creates <chroot base>/<exec name>/<id>/root, makes it the
// working directory and execs the exec file there with --id and the
// arguments after "--"). It does not chroot, switch uid, create device nodes
// or touch cgroups, so it tests noid's file layout, not confinement.
func runJailer(args []string) int {
	var id, exe, base string
	var rest []string
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a == "--" {
			rest = args[i+1:]
			break
		}
		if i+1 >= len(args) {
			continue
		}
		switch a {
		case "--id":
			id = args[i+1]
		case "--exec-file":
			exe = args[i+1]
		case "--chroot-base-dir":
			base = args[i+1]
		}
		i++
	}
	if id == "" || exe == "" || base == "" {
		fmt.Fprintln(os.Stderr, "fake jailer: --id, --exec-file and --chroot-base-dir are required")
		return 2
	}
	root := filepath.Join(base, filepath.Base(exe), id, "root")
	if err := os.MkdirAll(root, 0o755); err != nil {
		fmt.Fprintln(os.Stderr, "fake jailer:", err)
		return 1
	}
	if err := os.Chdir(root); err != nil {
		fmt.Fprintln(os.Stderr, "fake jailer:", err)
		return 1
	}
	argv := append([]string{exe, "--id", id}, rest...)
	err := syscall.Exec(exe, argv, os.Environ())
	fmt.Fprintln(os.Stderr, "fake jailer: exec:", err)
	return 1
}
