package bench

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
)

// What the host writes to its disks, read from the kernel's counters:
// /sys/block/*/stat per block device (what reached the device, whoever
// caused it), and /proc/<pid>/io per process (write_bytes: what a process
// caused to be written, counted when it dirties page cache, so write-back
// that happens later is still the dirtying process's).

// blockWrites maps a block device to the bytes written to it.
type blockWrites map[string]int64

// readBlockWrites reads the write counters of every block device.
func readBlockWrites() blockWrites {
	out := blockWrites{}
	ents, _ := os.ReadDir("/sys/block")
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join("/sys/block", e.Name(), "stat"))
		if err != nil {
			continue
		}
		if n, err := parseBlockStatWrites(string(b)); err == nil {
			out[e.Name()] = n
		}
	}
	return out
}

// parseBlockStatWrites returns the bytes written from the contents of a
// /sys/block/<dev>/stat file: its 7th field counts 512-byte sectors
// written (Documentation/block/stat.rst).
func parseBlockStatWrites(s string) (int64, error) {
	f := strings.Fields(s)
	if len(f) < 7 {
		return 0, fmt.Errorf("block stat has %d fields, want at least 7", len(f))
	}
	n, err := strconv.ParseInt(f[6], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("block stat sectors written %q: %w", f[6], err)
	}
	return n * 512, nil
}

// virtualBlockDevice reports whether a device's writes end up on another
// device (loop, device mapper, md) or in RAM (ram, zram), so that summing
// it with the others would count the same bytes twice or count no disk.
func virtualBlockDevice(name string) bool {
	for _, p := range []string{"loop", "dm-", "md", "ram", "zram", "nbd"} {
		if strings.HasPrefix(name, p) {
			return true
		}
	}
	return false
}

// blockDelta is what each device wrote between two readings.
type blockDelta struct {
	// Disks is the sum over devices that are not virtual: what reached the
	// host's disks.
	Disks int64
	// PerDevice lists every device that wrote, virtual ones included.
	PerDevice map[string]int64
}

func diffBlockWrites(before, after blockWrites) blockDelta {
	d := blockDelta{PerDevice: map[string]int64{}}
	for dev, a := range after {
		n := a - before[dev]
		if n <= 0 {
			continue
		}
		d.PerDevice[dev] = n
		if !virtualBlockDevice(dev) {
			d.Disks += n
		}
	}
	return d
}

// String lists the devices that wrote, in MiB.
func (d blockDelta) String() string {
	if len(d.PerDevice) == 0 {
		return "no device wrote"
	}
	var parts []string
	for _, dev := range sortedKeys(d.PerDevice) {
		parts = append(parts, fmt.Sprintf("%s %.2f MiB", dev, float64(d.PerDevice[dev])/(1<<20)))
	}
	return strings.Join(parts, ", ")
}

// procWrites maps a pid to its process's write_bytes.
type procWrites map[int]procIO

type procIO struct {
	WriteBytes int64
	Comm       string
	Cmdline    string
}

// readProcWrites reads write_bytes of every process on the host.
func readProcWrites() procWrites {
	out := procWrites{}
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/io")
		if err != nil {
			continue
		}
		n, ok := parseProcIOWrites(string(b))
		if !ok {
			continue
		}
		comm, _ := os.ReadFile("/proc/" + e.Name() + "/comm")
		cmd, _ := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		out[pid] = procIO{WriteBytes: n, Comm: strings.TrimSpace(string(comm)), Cmdline: strings.ReplaceAll(string(cmd), "\x00", " ")}
	}
	return out
}

// parseProcIOWrites returns write_bytes from a /proc/<pid>/io file.
func parseProcIOWrites(s string) (int64, bool) {
	for _, l := range strings.Split(s, "\n") {
		if v, ok := strings.CutPrefix(l, "write_bytes:"); ok {
			n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			return n, err == nil
		}
	}
	return 0, false
}

// procDelta splits what processes wrote between two readings into the
// processes ours selects and the others. A process that started in between
// counts in full; one that ended in between is not seen.
type procDelta struct {
	Ours, Others int64
	// Top lists the processes that wrote most, ours and others.
	Top []string
}

func diffProcWrites(before, after procWrites, ours func(pid int, p procIO) bool) procDelta {
	var d procDelta
	type w struct {
		name string
		n    int64
		ours bool
	}
	var ws []w
	for pid, a := range after {
		n := a.WriteBytes - before[pid].WriteBytes
		if n <= 0 {
			continue
		}
		o := ours(pid, a)
		if o {
			d.Ours += n
		} else {
			d.Others += n
		}
		ws = append(ws, w{fmt.Sprintf("%s[%d]", a.Comm, pid), n, o})
	}
	sort.Slice(ws, func(i, j int) bool { return ws[i].n > ws[j].n })
	for i, x := range ws {
		if i == 6 {
			break
		}
		tag := ""
		if x.ours {
			tag = " (noid)"
		}
		d.Top = append(d.Top, fmt.Sprintf("%s%s %.2f MiB", x.name, tag, float64(x.n)/(1<<20)))
	}
	return d
}
