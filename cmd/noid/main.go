// Command noid is the noid CLI. See internal/cli.
package main

import (
	"os"

	"github.com/noid-vm/noid/internal/cli"
)

func main() { os.Exit(cli.Main()) }
