package qemu

import (
	"context"
	"errors"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/noid-vm/noid/internal/storage"
	"github.com/noid-vm/noid/internal/testutil"
	"github.com/noid-vm/noid/internal/vmm"
)

// TestKillClosesUnusedAgentConn: the agent connection QEMU's spawn makes
// is closed by Kill when nothing took it (a warm spare discarded unused).
// The load benchmark found the server holding one such socket, its other
// end gone, per discarded spare.
func TestKillClosesUnusedAgentConn(t *testing.T) {
	testutil.RequireRoot(t)
	img := testutil.TinyImage(t)
	b := New(Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	dir := t.TempDir()
	spec := vmm.Spec{ID: "preconn", Name: "preconn", Dir: dir, RunDir: dir, VCPUs: 1, MemoryMiB: 256,
		Kernel: img.Kernel, Initrd: img.Initrd, Accel: testAccel(t), SerialLog: filepath.Join(dir, "serial.log")}
	if err := b.NewDisk(ctx, dir, img.Rootfs, 0, &storage.Copier{}); err != nil {
		t.Fatal(err)
	}
	inst, err := b.Boot(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	defer inst.Kill(context.Background())
	qi := inst.(*Instance)
	qi.preMu.Lock()
	pre := qi.preconn
	qi.preMu.Unlock()
	if pre == nil {
		t.Fatal("the spawn made no agent connection")
	}
	if err := inst.Kill(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := pre.Write([]byte{0}); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("the unused agent connection is still open after Kill (write: %v)", err)
	}
}
