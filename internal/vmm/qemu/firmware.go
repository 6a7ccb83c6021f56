package qemu

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// Firmware is how a microvm QEMU gets to the guest kernel.
//
// noid boots with qboot (qboot.rom, 64 KiB, shipped with QEMU), which loads
// the kernel from fw_cfg itself, so option ROMs stay off. Debian 12's
// QEMU made qboot the microvm default (bios-microvm.bin was a link to
// qboot.rom); later packages use SeaBIOS's bios-microvm.bin, which boots a
// kernel only through the linuxboot_dma.bin option ROM and spins forever
// with option ROMs off. Naming qboot keeps every QEMU version on the same
// firmware, which also keeps snapshots loadable across versions (a
// snapshot's firmware region must match the restoring QEMU's in size).
type Firmware struct {
	// BIOS is the -bios file, resolved by QEMU on its firmware search
	// path, or "" for QEMU's default firmware.
	BIOS string
}

// qbootFirmware is the firmware noid uses wherever QEMU has qboot.
var qbootFirmware = Firmware{BIOS: "qboot.rom"}

// MachineOpts returns the -M microvm options the firmware needs: option
// ROMs off with qboot, on with QEMU's default.
func (fw Firmware) MachineOpts() string {
	if fw.BIOS == "" {
		return ""
	}
	return "x-option-roms=off,"
}

// Args returns the firmware's command-line arguments.
func (fw Firmware) Args() []string {
	if fw.BIOS == "" {
		return nil
	}
	return []string{"-bios", fw.BIOS}
}

// DetectFirmware returns qboot for the QEMU binary bin when a directory of
// its firmware search path (`bin -L help`) has qboot.rom, and QEMU's
// default firmware otherwise.
func DetectFirmware(ctx context.Context, bin string) Firmware {
	out, err := exec.CommandContext(ctx, bin, "-L", "help").Output()
	if err != nil {
		return Firmware{}
	}
	for _, dir := range strings.Split(string(out), "\n") {
		dir = strings.TrimSpace(dir)
		if dir == "" {
			continue
		}
		if fi, err := os.Stat(filepath.Join(dir, qbootFirmware.BIOS)); err == nil && fi.Mode().IsRegular() {
			return qbootFirmware
		}
	}
	return Firmware{}
}

// firmware returns the backend's firmware, detected once.
func (b *Backend) firmware(ctx context.Context) Firmware {
	b.fwOnce.Do(func() {
		bin, err := b.Binary()
		if err != nil {
			return
		}
		b.fw = DetectFirmware(ctx, bin)
		if b.fw.BIOS == "" && b.opts.Logger != nil {
			b.opts.Logger.Warn("qemu has no qboot.rom on its firmware path: booting with its default firmware and option ROMs (slower boots; snapshots from hosts with qboot will not load)", "qemu", bin)
		}
	})
	return b.fw
}
