package client_test

import (
	"flag"
	"fmt"
	"os"
	"testing"

	"github.com/noid-vm/noid/internal/testutil"
)

// TestMain starts a real noid-server for the Example functions when it can
// (root and the e2e build tag, see main_e2e_test.go) and otherwise skips
// them with a message; the other tests run either way.
func TestMain(m *testing.M) {
	flag.Parse()
	stop, skip, err := startExampleServer()
	if err != nil {
		fmt.Fprintf(os.Stderr, "client examples: starting noid-server: %v\n", err)
		os.Exit(1)
	}
	if skip != "" {
		fmt.Fprintf(os.Stderr, "client examples: skipped (%s); run `go test -tags e2e ./client/` as root to run them against a real noid-server\n", skip)
		pat := "^Example"
		if s := flag.Lookup("test.skip").Value.String(); s != "" {
			pat = s + "|" + pat
		}
		flag.Set("test.skip", pat)
	}
	code := m.Run()
	stop()
	testutil.RemoveBinaries()
	os.Exit(code)
}
