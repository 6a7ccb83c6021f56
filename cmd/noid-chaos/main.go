// Command noid-chaos runs a chaos soak against a real noid-server: several
// clients create, exec, checkpoint, rewind, clone and destroy VMs while the
// server and random VMMs are killed with SIGKILL at random moments, and the
// invariants of issue 16 are checked after every fault and at the end. It
// exits 1 when an invariant broke (printing the seed and the fault
// history), 2 when it could not run. Run it as root; see RELIABILITY.md and
// internal/chaos.
package main

import (
	"os"

	"github.com/noid-vm/noid/internal/chaos"
)

func main() { os.Exit(chaos.Main(os.Args[1:])) }
