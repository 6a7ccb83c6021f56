package firecracker

import (
	"errors"
	"os"
	"testing"

	"github.com/noid-vm/noid/internal/testutil"
	"github.com/noid-vm/noid/internal/vmm/firecracker/fctest"
)

// TestMain lets the test binary double as the FAKE firecracker process used
// by the lifecycle tests (fctest.RunProcess): when the backend starts
// "firecracker" with ProcessEnv set, this binary serves the fake API instead
// of running tests. No real Firecracker is involved anywhere in this
// package's tests.
func TestMain(m *testing.M) {
	if os.Getenv(fctest.ProcessEnv) == "1" {
		os.Exit(fctest.RunProcess(os.Args[1:]))
	}
	os.Exit(testutil.Main(m))
}

// loadSchema returns Firecracker's pinned API schema, or skips the test
// where the file is absent (it lives outside the repository and is never
// copied into it).
func loadSchema(t *testing.T) (*fctest.Schema, string) {
	t.Helper()
	wd, _ := os.Getwd()
	path, err := fctest.FindSchemaFile(wd)
	if errors.Is(err, fctest.ErrSchemaNotFound) {
		t.Skipf("SKIP: the Firecracker API schema is absent, so the contract cannot be checked here: %v "+
			"(it is expected at ../shared/firecracker/firecracker-v1.16.1.yaml next to the repository)", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	s, err := fctest.LoadSchema(path)
	if err != nil {
		t.Fatal(err)
	}
	return s, path
}
