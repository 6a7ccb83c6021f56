package tarfstest

import (
	"fmt"
	"io/fs"
	"syscall"
)

// owner is a file's numeric owner and group.
func owner(fi fs.FileInfo) string {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return fmt.Sprintf("%d:%d", st.Uid, st.Gid)
	}
	return "?"
}
