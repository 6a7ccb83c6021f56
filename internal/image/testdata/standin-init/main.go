// Command standin-init is a stand-in for noid-agent used by the image tests:
// as /init it loads the modules listed in /etc/noid/modules, waits for
// /dev/vda, mounts it, checks the rootfs, prints a marker line and powers off.
package main

import (
	"fmt"
	"os"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

func uptime() string {
	b, _ := os.ReadFile("/proc/uptime")
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return "?"
	}
	return f[0]
}

func main() {
	if os.Getpid() != 1 {
		fmt.Println("standin-init: not PID 1, nothing to do")
		return
	}
	fmt.Println("STANDIN: /init started")
	unix.Mount("proc", "/proc", "proc", 0, "")
	unix.Mount("sysfs", "/sys", "sysfs", 0, "")
	unix.Mount("devtmpfs", "/dev", "devtmpfs", 0, "")
	list, err := os.ReadFile("/etc/noid/modules")
	if err != nil {
		fmt.Println("STANDIN-FAIL: read module list:", err)
	}
	loaded := 0
	for _, m := range strings.Fields(string(list)) {
		f, err := os.Open(m)
		if err != nil {
			fmt.Println("STANDIN-FAIL: open", m, err)
			continue
		}
		if err := unix.FinitModule(int(f.Fd()), "", 0); err != nil && err != unix.EEXIST {
			fmt.Println("STANDIN-FAIL: load", m, err)
		} else {
			loaded++
		}
		f.Close()
	}
	fmt.Printf("STANDIN: loaded %d modules at %s s\n", loaded, uptime())
	vda := false
	for i := 0; i < 1000; i++ {
		if _, err := os.Stat("/dev/vda"); err == nil {
			vda = true
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	busybox, agent := false, false
	if vda {
		if err := unix.Mount("/dev/vda", "/newroot", "ext4", unix.MS_RDONLY, ""); err != nil {
			fmt.Println("STANDIN-FAIL: mount /dev/vda:", err)
		} else {
			_, e1 := os.Stat("/newroot/bin/busybox")
			_, e2 := os.Stat("/newroot/usr/local/bin/noid-agent")
			busybox, agent = e1 == nil, e2 == nil
		}
	}
	ports := []string{}
	if ents, err := os.ReadDir("/sys/class/virtio-ports"); err == nil {
		for _, e := range ents {
			n, _ := os.ReadFile("/sys/class/virtio-ports/" + e.Name() + "/name")
			ports = append(ports, strings.TrimSpace(string(n)))
		}
	}
	var u unix.Utsname
	unix.Uname(&u)
	fmt.Printf("NOID-STANDIN-OK vda=%v busybox=%v agent=%v release=%s ports=%v uptime=%s\n",
		vda, busybox, agent, unix.ByteSliceToString(u.Release[:]), ports, uptime())
	unix.Sync()
	unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
	select {}
}
