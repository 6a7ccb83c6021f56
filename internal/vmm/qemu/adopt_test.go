package qemu

import (
	"context"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/noid-vm/noid/internal/agent/client"
	"github.com/noid-vm/noid/internal/agent/proto"
	"github.com/noid-vm/noid/internal/storage"
	"github.com/noid-vm/noid/internal/testutil"
	"github.com/noid-vm/noid/internal/vmm"
)

// TestAdoptResumesAbandonedCheckpoint: a server that dies in the middle of
// a checkpoint leaves QEMU migrating into a pipe nobody reads, or stopped
// in pre-switchover waiting for a continue. The next server's Adopt
// cancels that migration and the guest runs (and answers) again.
func TestAdoptResumesAbandonedCheckpoint(t *testing.T) {
	testutil.RequireRoot(t)
	img := testutil.TinyImage(t)
	b := New(Options{})
	for _, stage := range []string{"pre-switchover", "active"} {
		t.Run(stage, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			dir := t.TempDir()
			spec := vmm.Spec{ID: "abandon", Name: "abandon", Dir: dir, RunDir: dir, VCPUs: 1, MemoryMiB: 256,
				Kernel: img.Kernel, Initrd: img.Initrd, Accel: testAccel(t), SerialLog: filepath.Join(dir, "serial.log")}
			if err := b.NewDisk(ctx, dir, img.Rootfs, 0, &storage.Copier{}); err != nil {
				t.Fatal(err)
			}
			inst0, err := b.Boot(ctx, spec)
			if err != nil {
				t.Fatal(err)
			}
			defer inst0.Kill(context.Background())
			inst := inst0.(*Instance)
			agentAnswers(t, ctx, inst)

			if err := inst.setMigrationCaps(ctx, map[string]bool{"pause-before-switchover": stage == "pre-switchover", "events": true}); err != nil {
				t.Fatal(err)
			}
			// A slow stream keeps the migration active.
			inst.qmp.Execute(ctx, "migrate-set-parameters", map[string]any{"max-bandwidth": 1 << 20}, nil)
			pr, pw, _ := os.Pipe()
			if err := inst.qmp.SendFD(ctx, "abandoned", pw); err != nil {
				t.Fatal(err)
			}
			pw.Close()
			go io.Copy(io.Discard, pr)
			want := inst.qmp.WaitEvent(func(ev Event) bool { return migrationEvent(ev, stage) })
			if stage == "pre-switchover" {
				inst.qmp.Execute(ctx, "migrate-set-parameters", map[string]any{"max-bandwidth": int64(1) << 40, "downtime-limit": 2000}, nil)
			}
			if err := inst.qmp.Execute(ctx, "migrate", map[string]any{"uri": "fd:abandoned"}, nil); err != nil {
				t.Fatal(err)
			}
			if _, err := want(ctx); err != nil {
				t.Fatalf("waiting for %s: %v", stage, err)
			}
			// The server dies: its QMP connection goes, the reader too.
			pid := inst.Pid()
			inst.Close()
			pr.Close()

			adopted, err := b.Adopt(ctx, spec, pid)
			if err != nil {
				t.Fatalf("adopt after an abandoned checkpoint (%s): %v", stage, err)
			}
			defer adopted.Close()
			var st struct {
				Status string `json:"status"`
			}
			adopted.(*Instance).qmp.Execute(ctx, "query-status", nil, &st)
			if st.Status != "running" {
				t.Fatalf("vm after adopt is %s", st.Status)
			}
			agentAnswers(t, ctx, adopted.(*Instance))
		})
	}
}

// agentAnswers checks that the guest's agent runs a command.
func agentAnswers(t *testing.T, ctx context.Context, inst *Instance) {
	t.Helper()
	conn, err := inst.DialAgent(ctx)
	if err != nil {
		t.Fatal(err)
	}
	c, err := client.Connect(ctx, conn, client.Options{})
	if err != nil {
		t.Fatalf("agent hello: %v", err)
	}
	defer c.Close()
	p, err := c.Exec(ctx, proto.ExecRequest{Argv: []string{"true"}})
	if err != nil {
		t.Fatal(err)
	}
	go io.Copy(io.Discard, p.Stderr())
	io.Copy(io.Discard, p.Stdout())
	if ex, err := p.Wait(); err != nil || ex.Code != 0 {
		t.Fatalf("exec in the guest: %+v %v", ex, err)
	}
}
