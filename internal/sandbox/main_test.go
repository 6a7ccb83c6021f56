package sandbox

import (
	"os"
	"strconv"
	"testing"
)

// TestMain doubles as a memory hog for TestRealMemoryLimitEnforced: with
// NOID_SANDBOX_HOG_MIB set, the test binary touches that many MiB and exits.
func TestMain(m *testing.M) {
	if s := os.Getenv("NOID_SANDBOX_HOG_MIB"); s != "" {
		n, _ := strconv.Atoi(s)
		buf := make([]byte, n<<20)
		for i := 0; i < len(buf); i += 4096 {
			buf[i] = 1
		}
		os.Exit(int(buf[len(buf)-4096]) - 1)
	}
	os.Exit(m.Run())
}
