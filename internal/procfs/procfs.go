// Package procfs reads the few facts about processes and the host that noid
// takes from /proc: whether a process has exited, and the host's memory.
package procfs

import (
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"
)

// Exited reports whether the process pid is gone, or has exited and waits
// to be reaped (a zombie, or dead): it no longer runs, whoever its parent.
func Exited(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return true
	}
	// "pid (comm) S …": comm may hold spaces and parentheses, so the state
	// follows the last ')'.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 || i+2 >= len(b) {
		return true
	}
	return b[i+2] == 'Z' || b[i+2] == 'X'
}

// MeminfoMiB returns one field of /proc/meminfo ("MemAvailable",
// "MemTotal", …) in MiB, or -1 when it cannot be read.
func MeminfoMiB(field string) int {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return -1
	}
	for _, line := range strings.Split(string(b), "\n") {
		var kb int
		if n, _ := fmt.Sscanf(line, field+": %d kB", &kb); n == 1 {
			return kb / 1024
		}
	}
	return -1
}
