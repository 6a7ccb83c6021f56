package bench

import (
	"strings"
	"testing"
)

func TestParseBlockStatWrites(t *testing.T) {
	// A real /sys/block/vda/stat line: 17 fields, the 7th is sectors written.
	line := "  123690     1876 11398494    67021  2114532  1599468 64931264  6233440        0  1563556  6353672        0        0        0        0    71386   53209\n"
	n, err := parseBlockStatWrites(line)
	if err != nil || n != 64931264*512 {
		t.Fatalf("parseBlockStatWrites = %d, %v; want %d", n, err, 64931264*512)
	}
	if _, err := parseBlockStatWrites("1 2 3"); err == nil {
		t.Error("short line: no error")
	}
	if _, err := parseBlockStatWrites("1 2 3 4 5 6 x 8"); err == nil {
		t.Error("bad number: no error")
	}
}

func TestDiffBlockWrites(t *testing.T) {
	before := blockWrites{"vda": 1000, "loop3": 0, "vdb": 5}
	after := blockWrites{"vda": 1000 + 3<<20, "loop3": 2 << 20, "vdb": 5, "loop9": 1 << 20}
	d := diffBlockWrites(before, after)
	if d.Disks != 3<<20 {
		t.Errorf("Disks = %d, want only vda's 3 MiB (loop devices write through to vda)", d.Disks)
	}
	if len(d.PerDevice) != 3 || d.PerDevice["loop9"] != 1<<20 {
		t.Errorf("PerDevice = %v", d.PerDevice)
	}
	if s := d.String(); s != "loop3 2.00 MiB, loop9 1.00 MiB, vda 3.00 MiB" {
		t.Errorf("String = %q", s)
	}
	if s := diffBlockWrites(before, before).String(); s != "no device wrote" {
		t.Errorf("no writes: %q", s)
	}
	for dev, virt := range map[string]bool{"vda": false, "sda": false, "nvme0n1": false, "loop0": true, "dm-1": true, "md0": true, "zram0": true, "ram0": true} {
		if virtualBlockDevice(dev) != virt {
			t.Errorf("virtualBlockDevice(%s) = %v", dev, !virt)
		}
	}
}

func TestParseProcIOWrites(t *testing.T) {
	io := "rchar: 323934931\nwchar: 323929600\nsyscr: 632687\nsyscw: 632675\nread_bytes: 0\nwrite_bytes: 323932160\ncancelled_write_bytes: 0\n"
	if n, ok := parseProcIOWrites(io); !ok || n != 323932160 {
		t.Fatalf("parseProcIOWrites = %d, %v", n, ok)
	}
	if _, ok := parseProcIOWrites("rchar: 1\n"); ok {
		t.Error("no write_bytes: ok")
	}
}

func TestDiffProcWrites(t *testing.T) {
	before := procWrites{1: {WriteBytes: 100, Comm: "noid-server"}, 2: {WriteBytes: 0, Comm: "qemu"}, 3: {WriteBytes: 50, Comm: "go"}}
	after := procWrites{
		1: {WriteBytes: 100 + 1<<20, Comm: "noid-server"},
		2: {WriteBytes: 0, Comm: "qemu"},
		3: {WriteBytes: 50 + 4<<20, Comm: "go"},
		4: {WriteBytes: 2 << 20, Comm: "qemu-system-x86", Cmdline: "qemu /tmp/noid-bench-x/vm"},
	}
	d := diffProcWrites(before, after, func(pid int, p procIO) bool {
		return p.Comm == "noid-server" || strings.Contains(p.Cmdline, "/tmp/noid-bench-x/")
	})
	if d.Ours != 3<<20 || d.Others != 4<<20 {
		t.Errorf("ours %d others %d", d.Ours, d.Others)
	}
	if len(d.Top) != 3 || d.Top[0] != "go[3] 4.00 MiB" || d.Top[1] != "qemu-system-x86[4] (noid) 2.00 MiB" {
		t.Errorf("Top = %q", d.Top)
	}
}

func TestSpareSnapshot(t *testing.T) {
	line := `time=2026-12-03T09:22:33.398Z level=DEBUG msg="warm pool: spare prepared" spare=36937a855e27 snapshot=checkpoints/e8157ba4`
	if got := spareSnapshot(line); got != "checkpoints/e8157ba4" {
		t.Errorf("spareSnapshot = %q", got)
	}
	if got := spareSnapshot(`time=… level=DEBUG msg="warm pool: golden spare running" spare=x golden=1x2048`); got != "golden/1x2048" {
		t.Errorf("a golden's running spare counts as %q", got)
	}
	for _, l := range []string{
		`time=… level=INFO msg="checkpoint taken" snapshot=checkpoints/x`,
		`time=… level=DEBUG msg="warm pool: spare prepared" spare=x`,
	} {
		if got := spareSnapshot(l); got != "" {
			t.Errorf("spareSnapshot(%q) = %q, want none", l, got)
		}
	}
	s := &Server{prepared: map[string]int{"checkpoints/ab": 2, "golden/1x2048": 1}}
	if s.SparesPrepared("ab") != 2 || s.SparesPrepared("cd") != 0 || s.GoldenSparesRunning("1x2048") != 1 || s.SparesPrepared("1x2048") != 0 {
		t.Error("SparesPrepared")
	}
}
