//go:build e2e

package e2e

import (
	"os"
	"testing"

	"github.com/noid-vm/noid/internal/testutil"
)

// TestMain removes the binaries the tests built when they are done.
func TestMain(m *testing.M) { os.Exit(testutil.Main(m)) }
