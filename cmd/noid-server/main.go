// Command noid-server is the noid daemon. See internal/servercli.
package main

import (
	"os"

	"github.com/noid-vm/noid/internal/servercli"
)

func main() { os.Exit(servercli.Main()) }
