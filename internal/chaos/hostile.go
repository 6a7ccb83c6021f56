package chaos

import (
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/noid-vm/noid/internal/agent/guest"
	"github.com/noid-vm/noid/internal/agent/proto"
)

// HostileModes are the ways the hostile guest program attacks the agent's
// port, in the order a hostile phase runs them:
//   - garbage: random bytes onto the port (the host reads them between the
//     agent's frames);
//   - oversize: frame headers with lengths beyond MaxPayload, unknown types
//     and reserved bits set, and marker+HELLO_ACK frames with ids the host
//     never sent;
//   - half: the header of a 1 MiB DATA frame and a few bytes of it, then
//     nothing (the host's decoder waits for the rest);
//   - steal: reads the port, taking the host's frames from the agent;
//   - stop: freezes the agent (PID 1) in a cgroup v2 freezer, so it
//     answers nothing.
var HostileModes = []string{"garbage", "oversize", "half", "steal", "stop"}

// HostileMain is `noid-chaos hostile-guest MODE SECONDS`, run inside a VM
// as root by a hostile phase: it gets a duplicate of the agent's open port
// (pidfd_getfd on PID 1, since a virtio-serial port has one opener at a
// time) and misbehaves on it for SECONDS, then exits. It writes what it did
// to stderr.
func HostileMain(args []string) int {
	if len(args) != 2 {
		fmt.Fprintf(os.Stderr, "usage: noid-chaos hostile-guest %s SECONDS\n", strings.Join(HostileModes, "|"))
		return 2
	}
	secs, err := strconv.Atoi(args[1])
	if err != nil || secs <= 0 {
		fmt.Fprintf(os.Stderr, "hostile-guest: bad duration %q\n", args[1])
		return 2
	}
	until := time.Now().Add(time.Duration(secs) * time.Second)
	if err := hostile(args[0], until); err != nil {
		fmt.Fprintf(os.Stderr, "hostile-guest %s: %v\n", args[0], err)
		return 1
	}
	fmt.Fprintf(os.Stderr, "hostile-guest %s: done\n", args[0])
	return 0
}

func hostile(mode string, until time.Time) error {
	if mode == "stop" {
		return freezeAgent(until)
	}
	port, err := stealPort()
	if err != nil {
		return err
	}
	defer port.Close()
	switch mode {
	case "garbage":
		buf := make([]byte, 64<<10)
		for time.Now().Before(until) {
			rand.Read(buf)
			if _, err := port.Write(buf); err != nil {
				return fmt.Errorf("writing garbage: %w", err)
			}
			time.Sleep(50 * time.Millisecond)
		}
	case "oversize":
		for time.Now().Before(until) {
			for _, h := range badHeaders() {
				if _, err := port.Write(h); err != nil {
					return fmt.Errorf("writing bad headers: %w", err)
				}
			}
			time.Sleep(100 * time.Millisecond)
		}
	case "half":
		h := header(proto.TypeData, proto.ChanStdout, 1, proto.MaxPayload)
		if _, err := port.Write(append(h, "only the start of a payload"...)); err != nil {
			return fmt.Errorf("writing half a frame: %w", err)
		}
		time.Sleep(time.Until(until))
	case "steal":
		// Read whatever the host sends, racing the agent for it; the
		// process exit at the end stops the read.
		go func() {
			buf := make([]byte, 64<<10)
			for {
				if _, err := port.Read(buf); err != nil {
					time.Sleep(10 * time.Millisecond)
				}
			}
		}()
		time.Sleep(time.Until(until))
	default:
		return fmt.Errorf("unknown mode %q (want one of %s)", mode, strings.Join(HostileModes, ", "))
	}
	return nil
}

// header builds a frame header; it does not check what it builds.
func header(t proto.Type, flags uint8, stream, length uint32) []byte {
	h := make([]byte, proto.HeaderSize)
	h[0], h[1] = byte(t), flags
	binary.BigEndian.PutUint32(h[4:], stream)
	binary.BigEndian.PutUint32(h[8:], length)
	return h
}

// badHeaders are frames a host must refuse without trusting their length,
// and acks it must not take for its own.
func badHeaders() [][]byte {
	ack := proto.Marshal(proto.HelloAck{ID: "not-the-hosts-id", Version: proto.Version})
	return [][]byte{
		header(proto.TypeData, proto.ChanStdout, 1, 0xffffffff),
		header(proto.TypeData, proto.ChanStdout, 1, proto.MaxPayload+1),
		header(0xee, 0, 1, 16),
		append(header(proto.TypeExit, 0, 0, 4), "null"...),
		append([]byte(proto.SyncMarker), append(header(proto.TypeHelloAck, 0, 0, uint32(len(ack))), ack...)...),
		append([]byte(proto.SyncMarker), header(proto.TypeHelloAck, 0, 0, proto.MaxPayload*4)...),
	}
}

// stealPort returns a duplicate of the agent's (PID 1's) open descriptor of
// its virtio-serial port.
func stealPort() (*os.File, error) {
	dev, err := guest.FindPort(guest.PortName)
	if err != nil {
		return nil, err
	}
	var want unix.Stat_t
	if err := unix.Stat(dev, &want); err != nil {
		return nil, fmt.Errorf("stat %s: %w", dev, err)
	}
	fds, err := os.ReadDir("/proc/1/fd")
	if err != nil {
		return nil, err
	}
	pidfd, err := unix.PidfdOpen(1, 0)
	if err != nil {
		return nil, fmt.Errorf("pidfd_open(1): %w", err)
	}
	defer unix.Close(pidfd)
	for _, e := range fds {
		var st unix.Stat_t
		if unix.Stat(filepath.Join("/proc/1/fd", e.Name()), &st) != nil || st.Mode&unix.S_IFMT != unix.S_IFCHR || st.Rdev != want.Rdev {
			continue
		}
		target, _ := strconv.Atoi(e.Name())
		fd, err := unix.PidfdGetfd(pidfd, target, 0)
		if err != nil {
			return nil, fmt.Errorf("pidfd_getfd(1, %d): %w", target, err)
		}
		return os.NewFile(uintptr(fd), dev), nil
	}
	return nil, fmt.Errorf("PID 1 has no open descriptor of %s", dev)
}

// freezeAgent moves PID 1 into a new cgroup v2 and freezes it until until,
// then thaws it and moves it back.
func freezeAgent(until time.Time) error {
	const root = "/sys/fs/cgroup"
	dir := filepath.Join(root, "noid-chaos-freeze")
	if err := os.Mkdir(dir, 0o755); err != nil && !os.IsExist(err) {
		return fmt.Errorf("making a cgroup: %w", err)
	}
	defer os.Remove(dir)
	if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte("1"), 0); err != nil {
		return fmt.Errorf("moving PID 1 into %s: %w", dir, err)
	}
	defer os.WriteFile(filepath.Join(root, "cgroup.procs"), []byte("1"), 0)
	if err := os.WriteFile(filepath.Join(dir, "cgroup.freeze"), []byte("1"), 0); err != nil {
		return fmt.Errorf("freezing PID 1: %w", err)
	}
	time.Sleep(time.Until(until))
	if err := os.WriteFile(filepath.Join(dir, "cgroup.freeze"), []byte("0"), 0); err != nil {
		return fmt.Errorf("thawing PID 1: %w", err)
	}
	return nil
}
