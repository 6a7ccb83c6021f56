package firecracker

import (
	"fmt"
	"net"
	"os"

	"golang.org/x/sys/unix"
)

func mkdirAll(p string) error { return os.MkdirAll(p, 0o755) }

// listenUnixIn binds a unix socket named name in dir, however long dir's
// path is, through /proc/self/fd (the way a process binds relative to its
// working directory).
func listenUnixIn(dir, name string) (net.Listener, error) {
	fd, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	defer unix.Close(fd)
	return net.Listen("unix", fmt.Sprintf("/proc/self/fd/%d/%s", fd, name))
}
