package scripts_test

import (
	"os"
	"testing"

	"github.com/noid-vm/noid/internal/testutil"
)

// TestMain removes the binaries the tests built when they are done.
func TestMain(m *testing.M) { os.Exit(testutil.Main(m)) }
