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

// holdPoints, armed by NOID_HOLDPOINT, make the same points block forever
// instead: a test holds an operation in flight there (to stop the server
// under it, say) and learns that it is there from stderr.
var holdPoints = parseCrashPoints(os.Getenv("NOID_HOLDPOINT"))

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
// stderr (unbuffered), so a test can tell the point fired; a held point
// blocks the calling goroutine for good instead.
func crashpoint(name string) {
	if holdPoints[name] {
		fmt.Fprintf(os.Stderr, "noid holdpoint: %s\n", name)
		select {}
	}
	if crashPoints[name] {
		fmt.Fprintf(os.Stderr, "noid crashpoint: %s\n", name)
		syscall.Kill(os.Getpid(), syscall.SIGKILL)
		select {}
	}
}
