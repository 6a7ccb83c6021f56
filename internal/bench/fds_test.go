package bench

import (
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// TestNewFDsNamesSockets checks that the load run's leak report names a new
// socket by what it is: a unix listener opened between two fd tables shows
// with its path, and fds open in both tables are not reported.
func TestNewFDsNamesSockets(t *testing.T) {
	pid := os.Getpid()
	before := fdTable(pid)
	if before == nil {
		t.Fatal("no fd table for this process")
	}
	path := filepath.Join(t.TempDir(), "leak.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	got := newFDs(pid, before, fdTable(pid))
	found := false
	for _, d := range got {
		if strings.Contains(d, "unix "+path) {
			found = true
		}
	}
	if !found {
		t.Fatalf("new fds %v do not name the unix listener %s", got, path)
	}
	// A connection names the process at its other end (this one).
	before = fdTable(pid)
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	s, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	me := "[" + strconv.Itoa(pid) + "]"
	got = newFDs(pid, before, fdTable(pid))
	peers := 0
	for _, d := range got {
		if strings.Contains(d, " peer ") && strings.HasSuffix(d, me) {
			peers++
		}
	}
	if peers != 2 {
		t.Fatalf("new fds %v: want both ends of the connection to name their peer, this process %s", got, me)
	}
	if again := newFDs(pid, fdTable(pid), fdTable(pid)); len(again) != 0 {
		t.Fatalf("the same table reported new fds: %v", again)
	}
}
