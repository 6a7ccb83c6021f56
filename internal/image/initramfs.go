package image

import (
	"compress/gzip"
	"fmt"
	"io"
	"os"
	"strings"
)

// initrdCompression is how the initramfs is stored: "none" or "gzip". Under
// TCG the guest decompresses gzip slowly, while QEMU loads an uncompressed
// archive into guest RAM almost for free, so "none" boots faster (measured:
// see the package tests' boot benchmark).
const initrdCompression = "none"

// Guest paths inside the initramfs.
const (
	// GuestModulesList is the file in the initramfs that lists the modules to
	// load, one absolute path per line, in load order.
	GuestModulesList = "/etc/noid/modules"
	// GuestNewRoot is the directory in the initramfs where the agent mounts the
	// root disk before switching root.
	GuestNewRoot = "/newroot"
)

// writeInitramfs writes the initramfs for kernel k and the agent binary to dst.
func writeInitramfs(dst string, k *kernelEntry, agentPath string) error {
	f, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	if err := buildInitramfs(f, k, agentPath, initrdCompression); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// buildInitramfs writes a newc cpio archive, compressed as named, holding:
//
//	/init                         the agent (PID 1)
//	/lib/modules/<release>/...    the guest modules, uncompressed
//	/etc/noid/modules             their load order, one absolute path per line
//	/dev/console, /dev/null       device nodes, so /init has stdio before devtmpfs
//	/etc/noid/kernel-release      the kernel release, one line
//	/proc /sys /run /tmp /newroot mount points
func buildInitramfs(w io.Writer, k *kernelEntry, agentPath, compression string) error {
	agent, err := os.ReadFile(agentPath)
	if err != nil {
		return fmt.Errorf("read agent: %w", err)
	}
	var out io.Writer = w
	var gz *gzip.Writer
	switch compression {
	case "none":
	case "gzip":
		gz, err = gzip.NewWriterLevel(w, gzip.BestCompression)
		if err != nil {
			return err
		}
		out = gz
	default:
		return fmt.Errorf("unknown initramfs compression %q", compression)
	}
	c := newCpioWriter(out)
	for _, d := range []string{"dev", "proc", "sys", "run", GuestNewRoot, "etc/noid", "bin", "sbin", "usr", "lib", "mnt"} {
		if err := c.Dir(d, 0o755); err != nil {
			return err
		}
	}
	if err := c.Dir("tmp", 0o777|os.ModeSticky); err != nil {
		return err
	}
	if err := c.Dir("root", 0o700); err != nil {
		return err
	}
	if err := c.CharDev("dev/console", 0o600, 5, 1); err != nil {
		return err
	}
	if err := c.CharDev("dev/null", 0o666, 1, 3); err != nil {
		return err
	}
	if err := c.File("init", 0o755, agent); err != nil {
		return err
	}
	var list strings.Builder
	for i, m := range k.Modules {
		data, err := os.ReadFile(k.hostPath(m))
		if err != nil {
			return fmt.Errorf("read module: %w", err)
		}
		guest := k.loadPaths()[i]
		if err := c.File(strings.TrimPrefix(guest, "/"), 0o644, data); err != nil {
			return err
		}
		list.WriteString(guest + "\n")
	}
	if err := c.File(strings.TrimPrefix(GuestModulesList, "/"), 0o644, []byte(list.String())); err != nil {
		return err
	}
	if err := c.File("etc/noid/kernel-release", 0o644, []byte(k.Release+"\n")); err != nil {
		return err
	}
	if err := c.Close(); err != nil {
		return err
	}
	if gz != nil {
		if err := gz.Close(); err != nil {
			return fmt.Errorf("gzip initramfs: %w", err)
		}
	}
	return nil
}
