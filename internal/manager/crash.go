package manager

import (
	"os"
	"strings"
	"syscall"
)

// crashPoints holds the fault-injection points armed by NOID_CRASHPOINT
// (a comma-separated list). Tests use them to kill the server with SIGKILL
// at exact places inside mutating operations and then check that a restart
// reconciles everything. Unset, crashpoint is a map lookup on a nil map.
var crashPoints = parseCrashPoints(os.Getenv("NOID_CRASHPOINT"))

func parseCrashPoints(s string) map[string]bool {
	if s == "" {
		return nil
	}
	m := map[string]bool{}
	for _, p := range strings.Split(s, ",") {
		m[strings.TrimSpace(p)] = true
	}
	return m
}

// crashpoint kills the process when name is armed.
func crashpoint(name string) {
	if crashPoints[name] {
		syscall.Kill(os.Getpid(), syscall.SIGKILL)
		select {}
	}
}

// CrashPoints lists every fault-injection point, for tests.
var CrashPoints = []string{
	"create.after-insert", "create.after-boot", "create.before-running",
	"checkpoint.after-copy", "checkpoint.after-rename",
	"restore.after-kill", "restore.after-spawn",
	"clone.after-insert", "clone.after-spawn",
	"destroy.after-kill", "destroy.after-rmdir",
	"golden.after-copy", "spare.after-insert",
}
