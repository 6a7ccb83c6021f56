//go:build !unix

package client

import "io/fs"

// processUmask is 0 where there is no umask: modes come as the VM sent
// them, less setuid and setgid.
func processUmask() fs.FileMode { return 0 }
