package manager

import (
	"fmt"
	"os"
	"strings"
	"syscall"
)

// crashPoints holds the fault-injection points armed by NOID_CRASHPOINT
// (a comma-separated list). Tests use them to kill the process with SIGKILL
// at exact places inside mutating operations and then check that a restart
// reconciles everything. Unset, crashpoint is a map lookup on a nil map.
// The points are the names passed to crashpoint in this package; the crash
// test reads them from the source, so a new one cannot go untested.
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

// crashpoint kills the process when name is armed, after saying so on
// stderr (unbuffered), so a test can tell the point fired.
func crashpoint(name string) {
	if crashPoints[name] {
		fmt.Fprintf(os.Stderr, "noid crashpoint: %s\n", name)
		syscall.Kill(os.Getpid(), syscall.SIGKILL)
		select {}
	}
}
