//go:build e2e

package e2e

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/noid-vm/noid/internal/chaos"
	"github.com/noid-vm/noid/internal/testutil"
)

// TestChaosBounded is the bounded form of the chaos soak (issue 16): two
// clients create, exec, checkpoint, rewind, clone and destroy VMs on a real
// noid-server while it is killed with SIGKILL 30 times (and restarted on
// the same data dir) and random VMMs 4 times; after every fault and at the
// end every invariant must hold (internal/chaos says which; a sample of
// checkpoints is restored after every fifth fault). The seed is in
// the log; `noid-chaos --seed N` replays its choices, and the long form is
// `noid-chaos --server-kills 200 --vmm-kills 50` (RELIABILITY.md).
func TestChaosBounded(t *testing.T) {
	testutil.RequireRoot(t)
	bins := testutil.Build(t)
	img := testutil.TinyImage(t)
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	res, err := chaos.Run(ctx, chaos.Options{
		ServerKills: 30,
		VMMKills:    4,
		Clients:     2,
		MaxGap:      3 * time.Second,
		SampleEvery: 5,
		ServerBin:   bins.Server,
		Image:       img,
		Out:         &testLogWriter{t: t},
	})
	if err != nil {
		t.Fatalf("chaos run: %v", err)
	}
	if res.ServerKills != 30 {
		t.Errorf("the run killed noid-server %d times, want 30", res.ServerKills)
	}
	// A run whose clients never got anything done checks nothing.
	if res.Ops["ack-write"] == 0 {
		t.Errorf("the clients acknowledged no write: %v", res.Ops)
	}
}

// testLogWriter writes each line to the test log.
type testLogWriter struct{ t *testing.T }

func (w *testLogWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}
