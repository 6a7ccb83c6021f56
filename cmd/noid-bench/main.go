// Command noid-bench measures noid's performance on this host: cold create,
// exec, checkpoint, rewind, clone, golden creates and network set-up, plus a
// bounded concurrent load run. It builds what it needs, starts its own
// noid-servers on temporary data dirs and removes everything it started.
// Run it as root; see BENCHMARKS.md and internal/bench.
package main

import (
	"os"

	"github.com/noid-vm/noid/internal/bench"
)

func main() { os.Exit(bench.Main(os.Args[1:])) }
