package client_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"io"
	"net"
	"os"
	"os/exec"
	"testing"
	"time"

	"github.com/noid-vm/noid/internal/agent/client"
	"github.com/noid-vm/noid/internal/agent/proto"
)

func TestQEMUSmoke(t *testing.T) {
	dir := os.Getenv("NOID_SMOKE_DIR")
	if dir == "" {
		t.Skip("NOID_SMOKE_DIR not set")
	}
	sock := dir + "/agent.sock"
	os.Remove(sock)
	args := []string{"-M", "microvm,x-option-roms=off,rtc=on,acpi=on", "-accel", "tcg", "-cpu", "max", "-m", "256", "-smp", "1",
		"-nodefaults", "-no-user-config", "-nographic", "-serial", "file:" + dir + "/console.log",
		"-kernel", "/tmp/k/x/boot/vmlinuz-6.1.0-48-cloud-amd64", "-initrd", dir + "/initrd.gz",
		"-append", "console=ttyS0 root=/dev/vda rw noid.hostname=smoke noid.log=" + os.Getenv("NOID_SMOKE_LOG") + " " + os.Getenv("NOID_SMOKE_APPEND"),
		"-drive", "id=d0,file=" + dir + "/rootfs.ext4,format=raw,if=none", "-device", "virtio-blk-device,drive=d0",
		"-device", "virtio-serial-device", "-chardev", "socket,id=agent,path=" + sock + ",server=on,wait=off",
		"-device", "virtserialport,chardev=agent,name=noid.agent", "-device", "virtio-rng-device",
		"-netdev", "user,id=n0,restrict=on", "-device", "virtio-net-device,netdev=n0,mac=02:00:00:00:00:01", "-no-reboot"}
	q := exec.Command("qemu-system-x86_64", args...)
	q.Stderr = os.Stderr
	start := time.Now()
	if err := q.Start(); err != nil {
		t.Fatal(err)
	}
	defer q.Process.Kill()
	var conn net.Conn
	var err error
	for time.Since(start) < 10*time.Second {
		if conn, err = net.Dial("unix", sock); err == nil {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	c, err := client.Connect(ctx, conn, client.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("hello after %v: %+v", time.Since(start), c.Agent())
	info, err := c.Info(ctx)
	t.Logf("info %+v %v", info, err)
	sh := func(c *client.Client, s string) string {
		t0 := time.Now()
		p, err := c.Exec(ctx, proto.ExecRequest{Argv: []string{"sh", "-c", s}})
		if err != nil {
			t.Fatal(err)
		}
		var out bytes.Buffer
		go io.Copy(io.Discard, p.Stderr())
		io.Copy(&out, p.Stdout())
		e, err := p.Wait()
		t.Logf("$ %s  [%v, exit %d %v]\n%s", s, time.Since(t0), e.Code, err, out.String())
		return out.String()
	}
	sh(c, "cat /etc/marker; hostname; ls /; mount | head -20; cat /proc/1/cmdline; echo")
	seed := make([]byte, 64)
	rand.Read(seed)
	res, err := c.Sync(ctx, proto.Sync{TimeUnixNano: time.Now().UnixNano(), Entropy: seed, Identity: &proto.Identity{
		Hostname: "clone-1", MAC: "02:00:00:00:00:42", IPv4: "10.0.2.15/24", Gateway: "10.0.2.2", DNS: []string{"10.0.2.3"}}})
	t.Logf("sync %+v %v", res, err)
	res, err = c.Sync(ctx, proto.Sync{Identity: &proto.Identity{
		Hostname: "clone-1", MAC: "02:00:00:00:00:42", IPv4: "10.0.2.15/24", Gateway: "10.0.2.2", DNS: []string{"10.0.2.3"}}})
	t.Logf("sync again %+v %v", res, err)
	sh(c, "hostname; ip addr show eth0; ip route; cat /etc/resolv.conf /etc/hosts /etc/hostname; date")
	t0 := time.Now()
	out := sh(c, "head -c 4194304 /dev/zero")
	t.Logf("4 MiB in %v (%d bytes)", time.Since(t0), len(out))
	// Reconnect: the port sees the host leave and come back.
	c.Close()
	conn2, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t0 = time.Now()
	c2, err := client.Connect(ctx, conn2, client.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("reconnect took %v", time.Since(t0))
	sh(c2, "echo second connection; cat /proc/loadavg")
	p, err := c2.Console(ctx, proto.ExecRequest{})
	if err != nil {
		t.Fatal(err)
	}
	p.Stdin().Write([]byte("echo console $((1+2)); exit\n"))
	var cout bytes.Buffer
	io.Copy(&cout, p.Stdout())
	e, err := p.Wait()
	t.Logf("console: %q %+v %v", cout.String(), e, err)
	// Power off through init.
	sh(c2, "kill -USR2 1")
	done := make(chan error, 1)
	go func() { done <- q.Wait() }()
	select {
	case err := <-done:
		t.Logf("qemu exited: %v", err)
	case <-time.After(20 * time.Second):
		t.Logf("qemu did not exit after poweroff")
	}
}
