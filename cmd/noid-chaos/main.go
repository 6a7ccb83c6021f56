// Command noid-chaos runs a chaos soak against a real noid-server: several
// clients create, exec, checkpoint, rewind, clone, copy files, promote
// golden snapshots and destroy VMs while the server and random VMMs are
// killed with SIGKILL at random moments, the data dir's filesystem runs
// full and a process inside a VM attacks the agent's port; the invariants
// of issue 16 are checked after every fault and at the end. It exits 1
// when an invariant broke (printing the seed and the fault history), 2
// when it could not run. Run it as root; see RELIABILITY.md and
// internal/chaos.
//
// `noid-chaos hostile-guest MODE SECONDS` is the program the hostile phase
// copies into a VM and runs there (build noid-chaos with CGO_ENABLED=0 so
// that it runs in the guest).
package main

import (
	"os"

	"github.com/noid-vm/noid/internal/chaos"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == "hostile-guest" {
		os.Exit(chaos.HostileMain(os.Args[2:]))
	}
	os.Exit(chaos.Main(os.Args[1:]))
}
