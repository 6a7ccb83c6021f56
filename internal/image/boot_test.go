package image

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	agentclient "github.com/noid-vm/noid/internal/agent/client"
	"github.com/noid-vm/noid/internal/agent/proto"
	"github.com/noid-vm/noid/internal/vmm"
	"github.com/noid-vm/noid/internal/vmm/qemu"
)

// bootSpec describes one QEMU microvm boot of an image under TCG.
type bootSpec struct {
	Kernel, Initrd, Rootfs string
	Append                 string
	Timeout                time.Duration
	Extra                  []string       // extra QEMU arguments
	Marker                 *regexp.Regexp // default: the stand-in's marker line
	KeepRunning            bool           // the guest does not power off: kill QEMU at the marker
	// WhileUp, with KeepRunning, runs after the marker and before QEMU is
	// killed, with the path of the unix socket behind the noid.agent port.
	WhileUp func(agentSock string)
}

type bootResult struct {
	Marker   time.Duration // QEMU start to the marker line on the serial port
	Exit     time.Duration // QEMU start to QEMU exit (the stand-in powers off)
	Uptime   float64       // guest /proc/uptime when the marker was printed
	Line     string        // the marker line
	Serial   string        // the whole serial log
	TimedOut bool
}

var markerRE = regexp.MustCompile(`NOID-STANDIN-OK .*uptime=([0-9.]+)`)

// bootQEMU boots the spec with the command line the design notes use and
// waits for the stand-in agent's marker.
func bootQEMU(t testing.TB, s bootSpec) bootResult {
	t.Helper()
	dir := t.TempDir()
	serial := filepath.Join(dir, "serial.log")
	sock := filepath.Join(dir, "agent.sock")
	fw := qemu.DetectFirmware(context.Background(), "qemu-system-x86_64")
	args := []string{
		"-M", "microvm," + fw.MachineOpts() + "rtc=on,acpi=on",
		"-accel", "tcg", "-cpu", "max", "-m", "256",
		"-nodefaults", "-no-user-config", "-nographic",
		"-serial", "file:" + serial,
		"-kernel", s.Kernel, "-initrd", s.Initrd, "-append", s.Append,
		"-device", "virtio-blk-device,drive=root",
		"-drive", "id=root,file=" + s.Rootfs + ",format=raw,if=none",
		"-chardev", "socket,id=agent,path=" + sock + ",server=on,wait=off",
		"-device", "virtio-serial-device",
		"-device", "virtserialport,chardev=agent,name=noid.agent",
		"-device", "virtio-rng-device",
	}
	args = append(args, fw.Args()...)
	args = append(args, s.Extra...)
	if s.Timeout == 0 {
		s.Timeout = 90 * time.Second
	}
	ctx, cancel := context.WithTimeout(context.Background(), s.Timeout+10*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "qemu-system-x86_64", args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	start := time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatalf("start qemu: %v", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	marker := markerRE
	if s.Marker != nil {
		marker = s.Marker
	}
	var res bootResult
	deadline := time.After(s.Timeout)
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	var exitErr error
	done := false
loop:
	for {
		select {
		case exitErr = <-exited:
			done = true
			res.Exit = time.Since(start)
			b, _ := os.ReadFile(serial)
			if m := marker.FindSubmatch(b); m != nil && res.Marker == 0 {
				res.Marker = res.Exit // marker and exit within one tick
			}
			break loop
		case <-deadline:
			res.TimedOut = true
			break loop
		case <-tick.C:
			if res.Marker != 0 {
				continue
			}
			// Only complete lines count: QEMU writes the serial file as the
			// guest prints, so a marker can be seen half written.
			b, _ := os.ReadFile(serial)
			if marker.Match(completeLines(b)) {
				res.Marker = time.Since(start)
				if s.KeepRunning {
					break loop
				}
			}
		}
	}
	if !done {
		if s.WhileUp != nil && res.Marker != 0 {
			s.WhileUp(sock)
		}
		cmd.Process.Kill()
		<-exited
	}
	b, _ := os.ReadFile(serial)
	res.Serial = string(b)
	if m := marker.FindStringSubmatch(string(completeLines(b))); m != nil {
		res.Line = m[0]
		if len(m) > 1 {
			res.Uptime, _ = strconv.ParseFloat(m[1], 64)
		}
	}
	if done && exitErr != nil && res.Marker == 0 {
		t.Logf("qemu exited: %v: %s", exitErr, stderr.String())
	}
	return res
}

// completeLines returns b up to and including its last newline.
func completeLines(b []byte) []byte {
	return b[:bytes.LastIndexByte(b, '\n')+1]
}

// tinyImageForBoot builds (or reuses) a tiny image with the stand-in agent
// and returns it with a private copy of its rootfs.
func tinyImageForBoot(t testing.TB) (*Image, string) {
	return imageForBoot(t, true, "")
}

// imageForBoot builds an image (tiny or debian) with the given agent (the
// stand-in when empty) and returns it with a private copy of its rootfs.
func imageForBoot(t testing.TB, tiny bool, agent string) (*Image, string) {
	t.Helper()
	requireRoot(t)
	requireTool(t, "qemu-system-x86_64", "mkfs.ext4")
	if os.Getenv("NOID_TEST_QEMU") == "0" {
		t.Skip("NOID_TEST_QEMU=0")
	}
	if agent == "" {
		agent = standinAgent(t)
	}
	dataDir := seedDataDir(t, !tiny)
	img, err := Build(context.Background(), BuildOptions{DataDir: dataDir, Tiny: tiny, AgentBinary: agent})
	if err != nil {
		t.Fatal(err)
	}
	disk := filepath.Join(t.TempDir(), "disk.ext4")
	if err := copyFileSparse(img.Rootfs, disk); err != nil {
		t.Fatal(err)
	}
	return img, disk
}

// TestBootTiny boots the tiny image under QEMU microvm/TCG: the stand-in
// /init loads the modules from /etc/noid/modules, finds /dev/vda, mounts the
// ext4 rootfs and finds busybox and the agent in it, and sees the
// virtio-serial port named noid.agent.
func TestBootTiny(t *testing.T) {
	img, disk := tinyImageForBoot(t)
	cmdline := strings.Join(append([]string{"console=ttyS0", "quiet"}, vmm.TCGKernelArgs()...), " ")
	res := bootQEMU(t, bootSpec{Kernel: img.Kernel, Initrd: img.Initrd, Rootfs: disk, Append: cmdline})
	if res.Line == "" {
		t.Fatalf("no marker (timed out: %v); serial log:\n%s", res.TimedOut, res.Serial)
	}
	t.Logf("cmdline %q: marker after %s wall (guest uptime %.2f s), QEMU exited after %s",
		cmdline, res.Marker.Round(time.Millisecond), res.Uptime, res.Exit.Round(time.Millisecond))
	t.Logf("marker: %s", res.Line)
	for _, want := range []string{"vda=true", "busybox=true", "agent=true", "release=" + img.KernelRelease, "noid.agent"} {
		if !strings.Contains(res.Line, want) {
			t.Errorf("marker lacks %q: %s", want, res.Line)
		}
	}
	if strings.Contains(res.Serial, "STANDIN-FAIL") {
		t.Errorf("stand-in reported failures:\n%s", res.Serial)
	}
}

// TestBootCmdlineVariants measures how kernel command-line flags and the
// initramfs compression change the TCG boot time. It boots every variant
// NOID_BOOT_BENCH_ROUNDS times (default 5), interleaved so that changes in
// host load hit all variants alike, and logs min/median. It only runs with
// NOID_BOOT_BENCH=1.
func TestBootCmdlineVariants(t *testing.T) {
	if os.Getenv("NOID_BOOT_BENCH") != "1" {
		t.Skip("set NOID_BOOT_BENCH=1 to run the boot-time comparison")
	}
	img, disk := tinyImageForBoot(t)
	k := sharedKernel(t)
	gz := filepath.Join(t.TempDir(), "initrd.gz")
	f, err := os.Create(gz)
	if err != nil {
		t.Fatal(err)
	}
	if err := buildInitramfs(f, k, standinAgent(t), "gzip"); err != nil {
		t.Fatal(err)
	}
	f.Close()
	tsc := strings.Join(vmm.TCGKernelArgs(), " ")
	type variant struct {
		name, cmdline, initrd string
		timeout               time.Duration
	}
	base := "console=ttyS0 " + tsc
	variants := []variant{
		{"base (console=ttyS0 " + tsc + ")", base, img.Initrd, 0},
		{"+quiet", base + " quiet", img.Initrd, 0},
		{"+loglevel=0", base + " loglevel=0", img.Initrd, 0},
		{"+quiet, gzip initramfs", base + " quiet", gz, 0},
		{"+quiet mitigations=off", base + " quiet mitigations=off", img.Initrd, 0},
		{"+quiet nokaslr", base + " quiet nokaslr", img.Initrd, 0},
		{"+quiet lpj=1000000", base + " quiet lpj=1000000", img.Initrd, 0},
		{"+quiet tsc=reliable no_timer_check", base + " quiet tsc=reliable no_timer_check", img.Initrd, 0},
		{"+quiet all of the above", base + " quiet mitigations=off nokaslr lpj=1000000 tsc=reliable no_timer_check", img.Initrd, 0},
		{"without tsc_early_khz (quiet)", "console=ttyS0 quiet", img.Initrd, 20 * time.Second},
	}
	rounds := 5
	if v, err := strconv.Atoi(os.Getenv("NOID_BOOT_BENCH_ROUNDS")); err == nil && v > 0 {
		rounds = v
	}
	times := make([][]float64, len(variants))
	uptimes := make([][]float64, len(variants))
	hangs := make([]int, len(variants))
	for r := 0; r < rounds; r++ {
		for i, v := range variants {
			res := bootQEMU(t, bootSpec{Kernel: img.Kernel, Initrd: v.initrd, Rootfs: disk, Append: v.cmdline, Timeout: v.timeout})
			if res.Line == "" {
				hangs[i]++
				continue
			}
			times[i] = append(times[i], res.Marker.Seconds())
			uptimes[i] = append(uptimes[i], res.Uptime)
		}
	}
	var report strings.Builder
	fmt.Fprintf(&report, "boot to marker under TCG, %d rounds; wall = seconds from QEMU start, guest = /proc/uptime at the marker:\n", rounds)
	for i, v := range variants {
		ts, us := times[i], uptimes[i]
		sort.Float64s(ts)
		sort.Float64s(us)
		if len(ts) == 0 {
			fmt.Fprintf(&report, "  %-40s no successful boot, %d hung\n", v.name, hangs[i])
			continue
		}
		fmt.Fprintf(&report, "  %-40s wall min %.2f median %.2f max %.2f | guest min %.2f median %.2f | hung %d/%d\n",
			v.name, ts[0], ts[len(ts)/2], ts[len(ts)-1], us[0], us[len(us)/2], hangs[i], rounds)
	}
	t.Log(report.String())
}

// TestBootRealAgent boots the tiny and the Debian image with the real agent
// from cmd/noid-agent (skipped if it does not build), waits for the agent's
// "init done" log line, which it prints after loading the modules and
// switching root, and then runs commands through the agent: as the noid
// user on both images, and on Debian the tools of DefaultPackages, a Python
// script using json and urllib, and sudo without a password. The Debian
// variant needs the cached debootstrap tarball (see TestBuildDebian) and is
// skipped with -short.
func TestBootRealAgent(t *testing.T) {
	requireRoot(t)
	requireTool(t, "qemu-system-x86_64")
	agent := filepath.Join(t.TempDir(), "noid-agent")
	if err := goBuildStatic("../../cmd/noid-agent", agent); err != nil {
		t.Skipf("cmd/noid-agent does not build: %v", err)
	}
	initDone := regexp.MustCompile(`msg="init done".*`)
	for _, tiny := range []bool{true, false} {
		name := map[bool]string{true: "tiny", false: "debian"}[tiny]
		t.Run(name, func(t *testing.T) {
			if !tiny && (testing.Short() || os.Getenv("NOID_TEST_DEBIAN") == "0") {
				t.Skip("debian image skipped with -short or NOID_TEST_DEBIAN=0")
			}
			img, disk := imageForBoot(t, tiny, agent)
			cmdline := strings.Join(append([]string{"console=ttyS0", "quiet"}, vmm.TCGKernelArgs()...), " ")
			ran := false
			res := bootQEMU(t, bootSpec{Kernel: img.Kernel, Initrd: img.Initrd, Rootfs: disk, Append: cmdline,
				Marker: initDone, KeepRunning: true, Timeout: 120 * time.Second, WhileUp: func(sock string) {
					ran = true
					checkGuest(t, sock, tiny)
				}})
			if res.Line == "" {
				t.Fatalf("agent never logged init done; serial:\n%s", res.Serial)
			}
			t.Logf("%s image, real agent: %q after %s wall", name, res.Line, res.Marker.Round(time.Millisecond))
			if !strings.Contains(res.Line, "root_switched=true") || !strings.Contains(res.Line, fmt.Sprintf("modules=%d", len(GuestModules))) {
				t.Errorf("init did not load every module and switch root: %s\nserial:\n%s", res.Line, res.Serial)
			}
			if !ran {
				t.Error("the guest checks did not run")
			}
		})
	}
}

// checkGuest runs commands in a booted image through its agent.
func checkGuest(t *testing.T, sock string, tiny bool) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	conn, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatalf("agent socket: %v", err)
	}
	c, err := agentclient.Connect(ctx, conn, agentclient.Options{})
	if err != nil {
		t.Fatalf("agent: %v", err)
	}
	defer c.Close()
	run := func(user string, argv ...string) (string, int) {
		t.Helper()
		p, err := c.Exec(ctx, proto.ExecRequest{Argv: argv, User: user, TimeoutMS: 60_000})
		if err != nil {
			t.Fatalf("exec %q: %v", argv, err)
		}
		var out, errb bytes.Buffer
		done := make(chan struct{})
		go func() { io.Copy(&errb, p.Stderr()); close(done) }()
		io.Copy(&out, p.Stdout())
		<-done
		ex, err := p.Wait()
		if err != nil {
			t.Errorf("exec %q as %q: %v", argv, user, err)
			return "", -1
		}
		if ex.Code != 0 {
			t.Errorf("exec %q as %q: exit %d, stdout %q, stderr %q", argv, user, ex.Code, out.String(), errb.String())
		}
		return out.String(), ex.Code
	}
	if out, _ := run(GuestUser, "sh", "-c", `id -u; id -g; echo "$HOME"; pwd`); out != "1000\n1000\n/home/noid\n/home/noid\n" {
		t.Errorf("as %s: %q", GuestUser, out)
	}
	if tiny {
		return
	}
	if out, _ := run("", "python3", "-c", "print(1)"); out != "1\n" {
		t.Errorf("python3 -c 'print(1)' printed %q", out)
	}
	script := `import json, urllib.request, urllib.parse, ssl, subprocess
print(json.dumps({"q": urllib.parse.quote("a b"), "tls": ssl.OPENSSL_VERSION.split()[0]}))`
	if out, _ := run(GuestUser, "python3", "-c", script); out != `{"q": "a%20b", "tls": "OpenSSL"}`+"\n" {
		t.Errorf("python3 script printed %q", out)
	}
	for _, tool := range []string{"curl", "ping", "ip", "ps", "less", "nano", "sudo", "python3"} {
		run("", "sh", "-c", "command -v "+tool)
	}
	run("", "curl", "--version")
	run(GuestUser, "ping", "-c", "1", "-W", "5", "127.0.0.1")
	if out, _ := run(GuestUser, "sudo", "-n", "id", "-u"); out != "0\n" {
		t.Errorf("sudo id -u as %s: %q", GuestUser, out)
	}
	run(GuestUser, "sudo", "true")
}
