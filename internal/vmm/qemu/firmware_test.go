package qemu

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/noid-vm/noid/internal/vmm"
)

// TestDetectFirmware: qboot where a directory of the binary's search path
// has it, QEMU's default firmware (and option ROMs on) where none does, and
// the host's own QEMU has it (Debian and Ubuntu ship it).
func TestDetectFirmware(t *testing.T) {
	with, without := t.TempDir(), t.TempDir()
	if err := os.WriteFile(filepath.Join(with, "qboot.rom"), make([]byte, 64<<10), 0o644); err != nil {
		t.Fatal(err)
	}
	fake := func(dirs ...string) string {
		p := filepath.Join(t.TempDir(), "qemu")
		script := "#!/bin/sh\n[ \"$1\" = -L ] && [ \"$2\" = help ] || exit 1\nprintf '%s\\n' " + strings.Join(dirs, " ") + "\n"
		if err := os.WriteFile(p, []byte(script), 0o755); err != nil {
			t.Fatal(err)
		}
		return p
	}
	ctx := context.Background()
	if fw := DetectFirmware(ctx, fake(without, with)); fw != qbootFirmware || fw.MachineOpts() != "x-option-roms=off," || !slices.Equal(fw.Args(), []string{"-bios", "qboot.rom"}) {
		t.Errorf("with qboot.rom on the path: %+v %q %q", fw, fw.MachineOpts(), fw.Args())
	}
	if fw := DetectFirmware(ctx, fake(without)); fw != (Firmware{}) || fw.MachineOpts() != "" || fw.Args() != nil {
		t.Errorf("without qboot.rom: %+v %q %q", fw, fw.MachineOpts(), fw.Args())
	}
	if fw := DetectFirmware(ctx, filepath.Join(without, "missing")); fw != (Firmware{}) {
		t.Errorf("a binary that does not run: %+v", fw)
	}
	if bin, err := exec.LookPath("qemu-system-x86_64"); err == nil {
		if fw := DetectFirmware(ctx, bin); fw != qbootFirmware {
			t.Errorf("%s: %+v, want qboot", bin, fw)
		}
	}
	spec := vmm.Spec{ID: "x", Name: "x", Dir: "/d", VCPUs: 1, MemoryMiB: 64, Kernel: "/k", Initrd: "/i"}
	a := strings.Join(args(spec, VMFiles{}, false, argOpts{tapFD: -1}), " ")
	if strings.Contains(a, "x-option-roms") || strings.Contains(a, "-bios") {
		t.Errorf("default firmware's command line: %s", a)
	}
	a = strings.Join(args(spec, VMFiles{}, false, argOpts{tapFD: -1, firmware: qbootFirmware}), " ")
	if !strings.Contains(a, "-M microvm,x-option-roms=off,") || !strings.Contains(a, "-bios qboot.rom") {
		t.Errorf("qboot's command line: %s", a)
	}
}
