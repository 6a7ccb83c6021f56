package network

import (
	"bytes"
	"context"
	"os/exec"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// TestQEMUOpensTap starts QEMU with exactly the -netdev line the VMM
// backend uses on a TAP made by AddVM, twice (as a restore would), and
// waits for the kernel to report the TAP's carrier, which only happens
// when a process has attached to it.
func TestQEMUOpensTap(t *testing.T) {
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		t.Skip("qemu-system-x86_64 not installed")
	}
	ns, h, m := setupHost(t, testConfig())
	ctx := context.Background()
	v := vmNet(t, m.Config(), "qemu-vm", "alice", 0, false)
	if err := m.AddVM(ctx, v); err != nil {
		t.Fatal(err)
	}
	tap := TapName(v.ID)

	updates := make(chan netlink.LinkUpdate, 64)
	done := make(chan struct{})
	t.Cleanup(func() { close(done) })
	if err := netlink.LinkSubscribeWithOptions(updates, done, netlink.LinkSubscribeOptions{Namespace: &ns, ListExisting: true}); err != nil {
		t.Fatal(err)
	}

	for round := 1; round <= 2; round++ {
		cmd := exec.Command(qemu,
			"-M", "microvm,x-option-roms=off", "-accel", "tcg", "-m", "32",
			"-nodefaults", "-no-user-config", "-display", "none", "-S",
			"-netdev", "tap,id=net0,ifname="+tap+",script=no,downscript=no,vnet_hdr=on",
			"-device", "virtio-net-device,netdev=net0,mac="+MACFor(v.ID).String(),
		)
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		inside(t, ns, cmd.Start)
		exited := make(chan error, 1)
		go func() { exited <- cmd.Wait() }()
		t.Cleanup(func() { _ = cmd.Process.Kill() })

		waitCarrier(t, updates, exited, &stderr, tap, true)
		t.Logf("round %d: QEMU attached to %s", round, tap)
		if err := cmd.Process.Kill(); err != nil {
			t.Fatal(err)
		}
		<-exited
		waitCarrier(t, updates, nil, nil, tap, false)
		if _, err := h.LinkByName(tap); err != nil {
			t.Fatalf("TAP gone after QEMU exited (not persistent?): %v", err)
		}
	}
	if err := m.RemoveVM(ctx, v.ID); err != nil {
		t.Fatal(err)
	}
	linkGone(t, h, tap)
}

// waitCarrier waits for a link update of name whose carrier (IFF_LOWER_UP)
// is want. It fails early if QEMU exits first.
func waitCarrier(t *testing.T, updates <-chan netlink.LinkUpdate, exited <-chan error, stderr *bytes.Buffer, name string, want bool) {
	t.Helper()
	deadline := time.After(20 * time.Second)
	for {
		select {
		case u := <-updates:
			if u.Link.Attrs().Name != name {
				continue
			}
			if (u.IfInfomsg.Flags&unix.IFF_LOWER_UP != 0) == want {
				return
			}
		case err := <-exited:
			t.Fatalf("QEMU exited before attaching (%v): %s", err, stderr)
		case <-deadline:
			t.Fatalf("timed out waiting for carrier=%v on %s", want, name)
		}
	}
}
