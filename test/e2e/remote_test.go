//go:build e2e

package e2e

import (
	"context"
	"net"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/noid-vm/noid/internal/remote/remotetest"
)

// vethBetween links namespaces a and b with a veth pair named na (in a,
// address aCIDR) and nb (in b, address bCIDR).
func vethBetween(t *testing.T, a, b netns.NsHandle, na, nb, aCIDR, bCIDR string) {
	t.Helper()
	ha, err := netlink.NewHandleAt(a)
	if err != nil {
		t.Fatal(err)
	}
	defer ha.Close()
	hb, err := netlink.NewHandleAt(b)
	if err != nil {
		t.Fatal(err)
	}
	defer hb.Close()
	if err := ha.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: na}, PeerName: nb, PeerNamespace: netlink.NsFd(b)}); err != nil {
		t.Fatal(err)
	}
	for _, side := range []struct {
		h          *netlink.Handle
		name, cidr string
	}{{ha, na, aCIDR}, {hb, nb, bCIDR}} {
		l, err := side.h.LinkByName(side.name)
		if err != nil {
			t.Fatal(err)
		}
		nlAddr(t, side.h, l, side.cidr)
		if err := side.h.LinkSetUp(l); err != nil {
			t.Fatal(err)
		}
	}
}

// TestRemoteTwoHosts: two noid-servers, each in a network namespace of
// its own with its own data dir and NAT bridge, share one real S3 server
// (versitygw) that runs in a third namespace, reached over a veth pair
// from each. Host A creates a VM, writes a file, starts a counter,
// checkpoints and pushes it; host B clones it and finds the file, the
// counter counting on, an address of its own pool, the right clock and
// fresh entropy; a second clone downloads nothing. Host B pulls A's golden
// and `noid create` on B uses it.
func TestRemoteTwoHosts(t *testing.T) {
	nsS, nsA, nsB := newNamespace(t), newNamespace(t), newNamespace(t)
	vethBetween(t, nsS, nsA, "s3a", "ups3", "10.213.1.1/30", "10.213.1.2/30")
	vethBetween(t, nsS, nsB, "s3b", "ups3", "10.213.2.1/30", "10.213.2.2/30")
	srv := remotetest.StartWith(t, &remotetest.Server{
		Addr:     "127.0.0.1:9000",
		Extra:    []string{"10.213.1.1:9000", "10.213.2.1:9000"},
		StartCmd: func(cmd *exec.Cmd) error { return inNetNS(nsS, cmd.Start) },
		Dial: func(ctx context.Context, network, addr string) (c net.Conn, err error) {
			err = inNetNS(nsS, func() error {
				var derr error
				c, derr = (&net.Dialer{}).DialContext(ctx, network, addr)
				return derr
			})
			return c, err
		},
	})
	a := NewEnv(t, WithNetNS(nsA), WithConfig("[network]\nenabled = true\n"+srv.TOML(t, "10.213.1.1:9000", "fleet")))
	b := NewEnv(t, WithNetNS(nsB), WithConfig("[network]\nenabled = true\npool = \"10.61.0.0/24\"\n"+srv.TOML(t, "10.213.2.1:9000", "fleet")))

	src := a.Create("src")
	a.MustExec("src", "sh", "-c", "echo made-on-a > /root/mark && sync")
	a.MustExec("src", "sh", "-c", "setsid sh -c '"+counterScript+"' </dev/null >/dev/null 2>&1 &")
	waitCounter(t, a, "src", 5)
	a.MustCLI("checkpoint", "src", "one")
	c0 := counter(t, a, "src")
	out := a.MustCLI("checkpoint", "push", "src", "one")
	if !strings.Contains(out, "as remote:src/one") {
		t.Errorf("push said %q", out)
	}
	t.Logf("A: %s", strings.TrimSpace(out))
	// Let the clock run on, so that a clone with the checkpoint's clock
	// would be visibly behind.
	time.Sleep(5 * time.Second)

	restoreStart := time.Now()
	out = b.MustCLI("restore", "--from", "remote:src/one", "--as", "copy")
	t.Logf("B: %s", strings.TrimSpace(out))
	if !strings.Contains(out, "downloaded") {
		t.Errorf("the first clone on B did not download: %q", out)
	}
	guest, err := strconv.ParseInt(strings.TrimSpace(b.MustExec("copy", "date", "+%s")), 10, 64)
	execEnd := time.Now()
	if err != nil {
		t.Fatal(err)
	}
	if lo, hi := restoreStart.Unix()-1, execEnd.Unix()+1; guest < lo || guest > hi {
		t.Errorf("clone's clock %d, want within [%d, %d]", guest, lo, hi)
	}
	if got := b.MustExec("copy", "cat", "/root/mark"); got != "made-on-a\n" {
		t.Errorf("the clone on B sees /root/mark = %q", got)
	}
	n := counter(t, b, "copy")
	if n < c0-5 || n > c0+100 {
		t.Errorf("the clone's counter is %d, the checkpoint was taken at about %d", n, c0)
	}
	waitCounter(t, b, "copy", n+5)
	cp, err := b.Client.GetVM(ctx(t), "copy")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(cp.IP, "10.61.0.") || cp.IP == src.IP || cp.MAC == src.MAC {
		t.Errorf("the clone has ip %s mac %s, the original %s %s; want an address of B's pool", cp.IP, cp.MAC, src.IP, src.MAC)
	}
	if addr := b.MustExec("copy", "ip", "-4", "addr", "show", "eth0"); !strings.Contains(addr, cp.IP+"/") || strings.Contains(addr, src.IP+"/") {
		t.Errorf("the clone's eth0: %s (want %s)", addr, cp.IP)
	}
	// A second clone on B downloads nothing, and has entropy of its own.
	out = b.MustCLI("restore", "--from", "remote:src/one", "--as", "copy2")
	if !strings.Contains(out, "already on this host") {
		t.Errorf("the second clone on B: %q", out)
	}
	r1 := b.MustExec("copy", "sh", "-c", "head -c 16 /dev/urandom | od -An -tx1")
	r2 := b.MustExec("copy2", "sh", "-c", "head -c 16 /dev/urandom | od -An -tx1")
	if r1 == r2 {
		t.Errorf("two clones read the same random bytes %q", r1)
	}

	// Golden: A promotes and pushes it (root: for everyone); B pulls it
	// and a plain create on B restores it.
	a.MustCLI("golden", "promote", "src", "one")
	t.Logf("A: %s", strings.TrimSpace(a.MustCLI("golden", "push")))
	out = b.MustCLI("golden", "pull")
	t.Logf("B: %s", strings.TrimSpace(out))
	if !strings.Contains(out, "system/golden/1x256@") {
		t.Errorf("golden pull said %q", out)
	}
	g := b.Create("g1")
	if g.BootPath != "golden" {
		t.Errorf("create on B after the pull booted %s (%s)", g.BootPath, g.BootReason)
	}
	if got := b.MustExec("g1", "cat", "/root/mark"); got != "made-on-a\n" {
		t.Errorf("golden VM on B sees %q", got)
	}
	if !strings.Contains(b.MustCLI("remote", "list"), "remote:src/one") {
		t.Error("noid remote list on B does not show remote:src/one")
	}
	// A key nobody pushed: one line and a hint.
	r := b.CLI("", "restore", "--from", "remote:nope/x", "--as", "x")
	if r.Code != 1 || !strings.Contains(r.Stderr, "no checkpoint nope/x") || !strings.Contains(r.Stderr, "hint:") {
		t.Errorf("clone of a missing key: exit %d, %q", r.Code, r.Stderr)
	}
	for _, e := range []*Env{a, b} {
		if strings.Contains(e.Log(), remotetest.SecretKey) {
			t.Error("the store's secret is in a server's log")
		}
	}
}
