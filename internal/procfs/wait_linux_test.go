package procfs

import "golang.org/x/sys/unix"

// waitNoReap waits until the child pid exits, leaving it a zombie.
func waitNoReap(pid int) error {
	var info unix.Siginfo
	return unix.Waitid(unix.P_PID, pid, &info, unix.WEXITED|unix.WNOWAIT, nil)
}
