package qemu

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/noid-vm/noid/internal/agent/client"
	"github.com/noid-vm/noid/internal/agent/proto"
	"github.com/noid-vm/noid/internal/storage"
	"github.com/noid-vm/noid/internal/testutil"
	"github.com/noid-vm/noid/internal/vmm"
)

// TestResumesAfterDiskFull: a guest writes to its disk while the host
// filesystem holding the VM's directory is full. QEMU stops the guest
// (ENOSPC's default policy keeps the write for a retry); the instance
// says it waits for space, and once space is freed the guest runs again by
// itself and its write completes. Found by the chaos soak's full-disk
// phase: before the fix such a VM stayed paused forever, listed running,
// its agent silent. The second half found that a host connection dropped
// while the guest is paused leaves the next connection unanswered.
func TestResumesAfterDiskFull(t *testing.T) {
	testutil.RequireRoot(t)
	img := testutil.TinyImage(t)
	for _, tool := range []string{"mkfs.ext4", "mount"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not found (package e2fsprogs / mount)", tool)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	tmp := t.TempDir()
	image, mnt := filepath.Join(tmp, "small.img"), filepath.Join(tmp, "mnt")
	if f, err := os.Create(image); err != nil {
		t.Fatal(err)
	} else {
		f.Truncate(256 << 20)
		f.Close()
	}
	os.Mkdir(mnt, 0o755)
	for _, argv := range [][]string{{"mkfs.ext4", "-q", "-F", "-m", "0", image}, {"mount", "-o", "loop", image, mnt}} {
		if out, err := exec.Command(argv[0], argv[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%v: %v: %s", argv, err, out)
		}
	}
	t.Cleanup(func() {
		if err := unix.Unmount(mnt, 0); err != nil {
			unix.Unmount(mnt, unix.MNT_DETACH)
		}
	})

	dir := filepath.Join(mnt, "vm")
	os.Mkdir(dir, 0o700)
	b := New(Options{})
	spec := vmm.Spec{ID: "nospace", Name: "nospace", Dir: dir, RunDir: tmp, VCPUs: 1, MemoryMiB: 256,
		Kernel: img.Kernel, Initrd: img.Initrd, Accel: testAccel(t), SerialLog: filepath.Join(tmp, "serial.log")}
	if err := b.NewDisk(ctx, dir, img.Rootfs, 0, &storage.Copier{}); err != nil {
		t.Fatal(err)
	}
	inst0, err := b.Boot(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	defer inst0.Kill(context.Background())
	inst := inst0.(*Instance)
	conn, err := inst.DialAgent(ctx)
	if err != nil {
		t.Fatal(err)
	}
	c, err := client.Connect(ctx, conn, client.Options{})
	if err != nil {
		t.Fatalf("agent hello: %v", err)
	}
	defer c.Close()

	refill(t, filepath.Join(mnt, "filler"))

	p, err := c.Exec(ctx, proto.ExecRequest{Argv: []string{"sh", "-c", "dd if=/dev/urandom of=/big bs=64k count=256 2>/dev/null && sync && wc -c < /big"}})
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	done := make(chan error, 1)
	go func() {
		go io.Copy(io.Discard, p.Stderr())
		io.Copy(&out, p.Stdout())
		ex, err := p.Wait()
		if err == nil && ex.Code != 0 {
			err = errors.New("exit " + ex.Error)
		}
		done <- err
	}()
	for !inst.WaitingForSpace() {
		select {
		case err := <-done:
			t.Fatalf("the guest's write into a full filesystem finished (%v, %q) without the guest being stopped", err, out.String())
		case <-ctx.Done():
			t.Fatal("the guest was never stopped for lack of space")
		case <-time.After(100 * time.Millisecond):
		}
	}
	var st struct {
		Status string `json:"status"`
	}
	if err := inst.qmp.Execute(ctx, "query-status", nil, &st); err != nil || st.Status != "io-error" {
		t.Fatalf("waiting for space, the vm is %q (%v), want io-error", st.Status, err)
	}

	if err := os.Remove(filepath.Join(mnt, "filler")); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err != nil || string(bytes.TrimSpace(out.Bytes())) != "16777216" {
			t.Fatalf("the guest's write after space was freed: %v, output %q", err, out.String())
		}
	case <-ctx.Done():
		t.Fatal("the guest stayed stopped after space was freed")
	}
	if inst.WaitingForSpace() {
		t.Error("the instance still says it waits for space")
	}
	if err := inst.qmp.Execute(ctx, "query-status", nil, &st); err != nil || st.Status != "running" {
		t.Fatalf("after space was freed the vm is %q (%v)", st.Status, err)
	}

	// Again, but the host gives up on the agent while the guest is
	// paused (as its keepalive does) and connects anew after the resume.
	refill(t, filepath.Join(mnt, "filler"))
	p, err = c.Exec(ctx, proto.ExecRequest{Argv: []string{"sh", "-c", "dd if=/dev/urandom of=/big2 bs=64k count=256 conv=fsync 2>/dev/null"}})
	if err != nil {
		t.Fatal(err)
	}
	for !inst.WaitingForSpace() {
		select {
		case <-ctx.Done():
			t.Fatal("the guest was not stopped for lack of space the second time")
		case <-time.After(100 * time.Millisecond):
		}
	}
	c.Close()
	os.Remove(filepath.Join(mnt, "filler"))
	for inst.WaitingForSpace() {
		select {
		case <-ctx.Done():
			t.Fatal("the guest stayed stopped after space was freed the second time")
		case <-time.After(100 * time.Millisecond):
		}
	}
	// QEMU never answers the first connection made after one was dropped
	// while the guest was paused; client.Dial (what the manager uses)
	// dials again after RedialAfter, and the guest answers.
	actx, acancel := context.WithTimeout(ctx, time.Minute)
	defer acancel()
	c2, err := client.Dial(actx, func(ctx context.Context) (io.ReadWriteCloser, error) { return inst.DialAgent(ctx) },
		client.Options{RedialAfter: 5 * time.Second})
	if err != nil {
		t.Fatalf("connecting to the agent after the guest resumed: %v", err)
	}
	defer c2.Close()
	if err := c2.Ping(actx); err != nil {
		t.Fatalf("ping after the guest resumed: %v", err)
	}
}

// refill takes every free block of the filesystem of path into path.
func refill(t *testing.T, path string) {
	t.Helper()
	filler, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer filler.Close()
	var size int64
	for _, chunk := range []int64{16 << 20, 1 << 20, 4 << 10} {
		for unix.Fallocate(int(filler.Fd()), 0, size, chunk) == nil {
			size += chunk
		}
	}
	for {
		n, err := filler.WriteAt(make([]byte, 4<<10), size)
		size += int64(n)
		if errors.Is(err, unix.ENOSPC) {
			return
		} else if err != nil {
			t.Fatal(err)
		}
	}
}
