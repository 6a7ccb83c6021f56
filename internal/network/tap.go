package network

import (
	"fmt"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ifreq is the part of struct ifreq that TUNSETIFF reads and writes.
type ifreq struct {
	name  [unix.IFNAMSIZ]byte
	flags uint16
	_     [22]byte
}

// createTap creates a persistent TAP device in the calling thread's network
// namespace, the way QEMU's `-netdev tap,ifname=NAME,script=no,downscript=no`
// expects to find it: IFF_TAP|IFF_NO_PI|IFF_VNET_HDR, single queue (QEMU
// asks for IFF_MULTI_QUEUE only with queues=N>1, and the kernel refuses to
// attach when that flag differs), owned by uid (0 = root) and, if gid is
// non-zero, by that group. The creating file descriptor is closed at once;
// the device stays because it is persistent.
func createTap(name string, uid, gid uint32) error {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open /dev/net/tun: %w", err)
	}
	defer unix.Close(fd)
	var req ifreq
	copy(req.name[:unix.IFNAMSIZ-1], name)
	// IFF_TUN_EXCL makes the call fail with EBUSY instead of attaching to a
	// device of that name that already exists.
	req.flags = unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_VNET_HDR | unix.IFF_TUN_EXCL
	if err := ioctl(fd, unix.TUNSETIFF, uintptr(unsafe.Pointer(&req))); err != nil {
		return fmt.Errorf("TUNSETIFF %s: %w", name, err)
	}
	if err := ioctl(fd, unix.TUNSETOWNER, uintptr(uid)); err != nil {
		return fmt.Errorf("TUNSETOWNER %s: %w", name, err)
	}
	if gid != 0 {
		if err := ioctl(fd, unix.TUNSETGROUP, uintptr(gid)); err != nil {
			return fmt.Errorf("TUNSETGROUP %s: %w", name, err)
		}
	}
	if err := ioctl(fd, unix.TUNSETPERSIST, 1); err != nil {
		return fmt.Errorf("TUNSETPERSIST %s: %w", name, err)
	}
	return nil
}

func ioctl(fd int, req uint, arg uintptr) error {
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), uintptr(req), arg); errno != 0 {
		return os.NewSyscallError("ioctl", errno)
	}
	return nil
}
