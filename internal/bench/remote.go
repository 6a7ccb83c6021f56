package bench

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/noid-vm/noid/client"
	"github.com/noid-vm/noid/internal/remote/remotetest"
)

// The remote section (issue 13): a checkpoint pushed to an S3-compatible
// store (versitygw on loopback, serving a directory of --tmp) and cloned
// from it on a second server with its own data dir, idle and after
// 512 MiB of guest RAM touched.

// remoteKind is one VM of the remote section.
type remoteKind struct {
	label    string
	name     string
	touchMiB int
	touched  int
	pushMs   Sample
	pushMiB  Sample
	dataMiB  Sample
	rePushMs Sample // a later checkpoint of the same VM, store warm
	rePushMB Sample
	pullMs   Sample
	pullMiB  Sample
	cold     Sample // clone from the store → first exec, nothing on the host
	warm     Sample // the same again: the pulled checkpoint is reused
}

func (b *Bench) runRemote(ctx context.Context) error {
	img, imgName, mem, touch := b.art.Debian, "the default Debian image", defaultMemMiB, 512
	if b.opts.RemoteImage == "tiny" {
		img, imgName, mem, touch = b.art.Image, "the tiny image", 512, 200
	}
	if img == nil {
		return fmt.Errorf("the default (Debian) image was not built")
	}
	end := b.section("remote", fmt.Sprintf("remote store (issue 13): a checkpoint of %s (1 vCPU, %d MiB, no NIC) pushed to versitygw on loopback and cloned from it on a second server", imgName, mem))
	defer end()
	dir, err := os.MkdirTemp(b.opts.TempDir, "noid-bench-s3-")
	if err != nil {
		return err
	}
	b.addCleanup("store dir", func() error { return os.RemoveAll(dir) })
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	addr := l.Addr().String()
	l.Close()
	srv := &remotetest.Server{Addr: addr}
	b.addCleanup("versitygw", func() error { srv.Kill(); return nil })
	if err := os.MkdirAll(filepath.Join(dir, "store"), 0o700); err != nil {
		return err
	}
	if err := srv.Launch(filepath.Join(dir, "store")); err != nil {
		return err
	}
	rc, err := srv.ConfigIn(dir, addr, "bench")
	if err != nil {
		return err
	}
	extra := remotetest.RemoteTOML(rc)
	a, err := b.startServer(ctx, ServerOpts{Name: "remote-a", Image: img, MemoryMiB: mem, Extra: extra})
	if err != nil {
		return err
	}
	bs, err := b.startServer(ctx, ServerOpts{Name: "remote-b", Image: img, MemoryMiB: mem, Extra: extra})
	if err != nil {
		return err
	}
	octx, cancel := context.WithTimeout(ctx, 60*time.Minute)
	defer cancel()
	kinds := []*remoteKind{{label: fmt.Sprintf("%d MiB of random bytes", touch), name: "s3-touched", touchMiB: touch}, {label: "idle", name: "s3-idle"}}
	for _, k := range kinds {
		if _, err := a.Client.CreateVM(octx, client.CreateVMRequest{Name: k.name, VCPUs: 1, MemoryMiB: mem, ColdBoot: true}); err != nil {
			return fmt.Errorf("create %s: %w\n%s", k.name, err, a.LogTail(20))
		}
		if _, err := execOK(octx, a.Client, k.name, "true"); err != nil {
			return err
		}
		if k.touchMiB > 0 {
			// Random bytes, which neither the zero-block skip nor zstd can
			// shrink: what moves is then what a guest's real data costs.
			// (touchGuestRAM's text would compress to almost nothing.)
			cmd := fmt.Sprintf("mkdir -p /mnt/fill && mount -t tmpfs -o size=%dm none /mnt/fill && head -c %d /dev/urandom > /mnt/fill/f && echo ok", k.touchMiB+16, int64(k.touchMiB)<<20)
			if _, err := execOK(octx, a.Client, k.name, "sh", "-c", cmd); err != nil {
				return fmt.Errorf("filling %d MiB of %s with random bytes: %w", k.touchMiB, k.name, err)
			}
			k.touched = k.touchMiB
		}
	}
	mib := func(n int64) float64 { return float64(n) / (1 << 20) }
	for r := -b.opts.Warmup; r < b.opts.RemoteRuns; r++ {
		for _, k := range kinds {
			// Each push goes to an empty store: nothing to reuse there.
			if err := srv.Empty(octx); err != nil {
				return fmt.Errorf("emptying the store: %w", err)
			}
			cp := "r" + strconv.Itoa(r+b.opts.Warmup)
			if _, err := a.Client.Checkpoint(octx, k.name, client.CheckpointRequest{Name: cp}); err != nil {
				return fmt.Errorf("checkpoint %s: %w", k.name, err)
			}
			p, err := a.Client.PushCheckpoint(octx, k.name, cp, "")
			if err != nil {
				return fmt.Errorf("push %s/%s: %w\n%s", k.name, cp, err, a.LogTail(20))
			}
			b.vlogf("push %s/%s: %+v", k.name, cp, *p.Pushed)
			// A later checkpoint of the same VM, pushed to the store
			// that has the first: only what changed moves.
			if _, err := a.Client.Checkpoint(octx, k.name, client.CheckpointRequest{Name: cp + "b"}); err != nil {
				return err
			}
			p2, err := a.Client.PushCheckpoint(octx, k.name, cp+"b", "")
			if err != nil {
				return err
			}
			// Clone on the other server: cold (nothing on it), then
			// warm (the pulled checkpoint is reused).
			var coldD, warmD time.Duration
			var pulled *client.RemoteTransfer
			for i, name := range []string{"s3c-" + cp, "s3w-" + cp} {
				t0 := time.Now()
				vm, err := bs.Client.CloneRemote(octx, k.name+"/"+cp, name)
				if err != nil {
					return fmt.Errorf("clone from the store: %w\n%s", err, bs.LogTail(20))
				}
				fe, _, err := firstExec(octx, bs.Client, name)
				if err != nil {
					return err
				}
				d := time.Since(t0)
				b.vlogf("clone %s from the store (%d): %.0f ms to the first exec (first exec %.0f ms), pulled %+v", name, i, ms(d), ms(fe), *vm.Pulled)
				if i == 0 {
					coldD, pulled = d, vm.Pulled
				} else {
					warmD = d
				}
				b.destroy(octx, bs, name)
			}
			for _, c := range []string{cp, cp + "b"} {
				a.Client.DeleteCheckpoint(octx, k.name, c)
			}
			if r < 0 {
				continue
			}
			k.pushMs.Add(p.Pushed.Ms)
			k.pushMiB.Add(mib(p.Pushed.BytesMoved))
			k.dataMiB.Add(mib(p.DataBytes))
			k.rePushMs.Add(p2.Pushed.Ms)
			k.rePushMB.Add(mib(p2.Pushed.BytesMoved))
			k.pullMs.Add(pulled.Ms)
			k.pullMiB.Add(mib(pulled.BytesMoved))
			k.cold.AddDur(coldD)
			k.warm.AddDur(warmD)
		}
	}
	for _, k := range kinds {
		label := k.label
		if k.touched > 0 {
			label = fmt.Sprintf("%d MiB of random bytes in guest RAM", k.touched)
		}
		b.add(&Figure{Section: "remote", Name: "push to an empty store, " + label, Unit: "ms", Stats: k.pushMs.Stats(),
			Note: fmt.Sprintf("the whole checkpoint (%d MiB RAM file, disk layers with the base image, device state): p50 %.0f MiB of non-zero data, %.0f MiB sent (zstd)", mem, k.dataMiB.Stats().P50, k.pushMiB.Stats().P50)})
		b.add(&Figure{Section: "remote", Name: "push: bytes sent, " + label, Unit: "MiB", Stats: k.pushMiB.Stats()})
		b.add(&Figure{Section: "remote", Name: "push of the next checkpoint of the same VM, " + label, Unit: "ms", Stats: k.rePushMs.Stats(),
			Note: fmt.Sprintf("taken right after the first, the store holding the first: p50 %.1f MiB sent", k.rePushMB.Stats().P50)})
		b.add(&Figure{Section: "remote", Name: "pull (first clone on a host): bytes received, " + label, Unit: "MiB", Stats: k.pullMiB.Stats(),
			Note: "the base image is not downloaded when the host has the same rootfs (it is linked from its pinned copy)"})
		b.add(&Figure{Section: "remote", Name: "pull time, " + label, Unit: "ms", Stats: k.pullMs.Stats()})
		b.add(&Figure{Section: "remote", Name: "clone from the store → first exec, cold cache, " + label, Unit: "ms", Stats: k.cold.Stats(),
			Note: "the manifest, the pull of every chunk (checked), the clone, then the first exec"})
		b.add(&Figure{Section: "remote", Name: "clone from the store → first exec, warm cache, " + label, Unit: "ms", Stats: k.warm.Stats(),
			Note: "a second clone of the same pushed checkpoint on the host: the manifest is read, no data moves"})
	}
	return nil
}
