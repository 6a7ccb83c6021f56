package bench

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	agentclient "github.com/noid-vm/noid/internal/agent/client"
	"github.com/noid-vm/noid/internal/agent/proto"
	"github.com/noid-vm/noid/internal/vmm"
	"github.com/noid-vm/noid/internal/vmm/qemu"
)

// QEMU's own ways to checkpoint, rewind and clone, driven by the bench
// directly over QMP (no noid-server), on the same guest as the default
// section: the Debian image's kernel, initramfs (noid-agent as PID 1) and
// root filesystem, 1 vCPU and 2048 MiB, the same machine and devices (the
// command line is qemu.Args), without a NIC, under the same accelerator.
//
//   - savevm/loadvm: internal snapshots in a qcow2 copy of the root
//     filesystem (HMP through human-monitor-command). The VM is stopped for
//     the whole savevm, which writes the RAM and device state into the
//     qcow2 and snapshots its disk; loadvm rewinds the running QEMU.
//   - migrate to a file: stop, migrate into a file (an fd, no bandwidth
//     limit), cont. It saves RAM and devices but not the disk. A clone is a
//     new QEMU started with -incoming defer, given the file with
//     migrate-incoming, then cont; its disk is a qcow2 overlay over the
//     source's, whose QEMU was stopped at the migration and then killed.
//
// The guest's agent is reached the way noid reaches it (a HELLO on the
// virtio-serial port's socket; no sync of clock, entropy or identity, which
// noid does on top), so "first exec" means the same thing on both sides.

// peerFigures are the p50s the comparison with noid uses.
type peerFigures struct {
	savevm, migrate map[string]float64 // pause by touch level label
	loadvm          float64            // rewind, VMM side
	loadvmAll       float64            // rewind → first exec
	cloneVMM        float64            // spawn + load
	cloneAll        float64            // clone → first exec
}

// peerVM is one QEMU the bench runs itself.
type peerVM struct {
	name      string
	cmd       *exec.Cmd
	exited    chan struct{}
	qmp       *qemu.QMP
	agentPath string
	preconn   net.Conn
	agent     *agentclient.Client
}

// peerEnv holds the peers' files.
type peerEnv struct {
	b   *Bench
	dir string
	bin string
}

// runPeers runs QEMU's own ways and returns their p50s.
func (b *Bench) runPeers(ctx context.Context) (*peerFigures, error) {
	end := b.section("peers", "QEMU's own ways on the same guest (Debian, 1 vCPU, 2048 MiB, no NIC): savevm/loadvm, migrate to a file + -incoming; on "+b.host.TmpFS)
	defer end()
	bin, err := exec.LookPath(b.opts.qemuBinary())
	if err != nil {
		return nil, err
	}
	qemuImg, err := exec.LookPath(b.opts.qemuImg())
	if err != nil {
		return nil, fmt.Errorf("qemu-img (apt-get install qemu-utils) is needed for the qcow2 copies of the peers: %w", err)
	}
	dir, err := os.MkdirTemp(b.opts.TempDir, "noid-bench-peers-")
	if err != nil {
		return nil, err
	}
	pe := &peerEnv{b: b, dir: dir, bin: bin}
	b.addCleanup("peers", pe.close)
	octx, cancel := context.WithTimeout(ctx, 60*time.Minute)
	defer cancel()
	res := &peerFigures{savevm: map[string]float64{}, migrate: map[string]float64{}}

	type pvm struct {
		label    string
		name     string
		touchMiB int
		vm       *peerVM
		disk     string
		savevm   Sample
		migrate  Sample
		svBytes  Sample // what savevm added to the qcow2, MiB
		migBytes Sample // the migration file, MiB
	}
	vms := []*pvm{{label: "idle", name: "idle"}, {label: "512 MiB touched", name: "t512", touchMiB: 512}, {label: "2 GiB touched", name: "t2g", touchMiB: -1}}
	for _, v := range vms {
		v.disk = filepath.Join(dir, v.name+".qcow2")
		t0 := time.Now()
		if out, err := exec.CommandContext(octx, qemuImg, "convert", "-O", "qcow2", b.art.Debian.Rootfs, v.disk).CombinedOutput(); err != nil {
			return nil, fmt.Errorf("qemu-img convert: %v: %s", err, out)
		}
		b.logf("peers: qcow2 copy of the rootfs for %s in %.1fs", v.name, time.Since(t0).Seconds())
		t0 = time.Now()
		vm, _, err := pe.start(octx, v.name, []qemu.DiskFile{{Path: v.disk, Qcow2: true}}, false)
		if err != nil {
			return nil, err
		}
		v.vm = vm
		if err := vm.connect(octx, 3*time.Minute); err != nil {
			return nil, fmt.Errorf("peer %s: %w\n%s", v.name, err, pe.logTail(v.name))
		}
		if _, err := vm.exec(octx, "true"); err != nil {
			return nil, err
		}
		b.logf("peers: cold boot of %s to its agent in %.1fs", v.name, time.Since(t0).Seconds())
		if v.touchMiB != 0 {
			n, err := touchRAM(func(argv ...string) (string, error) { return vm.exec(octx, argv...) }, v.name, v.touchMiB)
			if err != nil {
				return nil, fmt.Errorf("peer %s: %w", v.name, err)
			}
			b.logf("peers: %s touched %d MiB of guest RAM (tmpfs)", v.name, n)
		}
		if err := vm.setupMigration(octx); err != nil {
			return nil, err
		}
	}
	time.Sleep(2 * time.Second)

	// Checkpoint pauses, round-robin: savevm, then a migration to a file.
	for r := -b.opts.Warmup; r < b.opts.PeerRuns; r++ {
		for _, v := range vms {
			before := allocated(v.disk)
			snap := fmt.Sprintf("r%d", r+b.opts.Warmup)
			t0 := time.Now()
			if err := v.vm.hmp(octx, "savevm "+snap); err != nil {
				return nil, fmt.Errorf("peer %s: %w", v.name, err)
			}
			d := time.Since(t0)
			grown := allocated(v.disk) - before
			if err := v.vm.hmp(octx, "delvm "+snap); err != nil {
				return nil, fmt.Errorf("peer %s: %w", v.name, err)
			}
			if _, err := v.vm.exec(octx, "true"); err != nil {
				return nil, fmt.Errorf("peer %s after savevm: %w", v.name, err)
			}
			file := filepath.Join(dir, v.name+".mig")
			dm, err := v.vm.migrateToFile(octx, file, true)
			if err != nil {
				return nil, fmt.Errorf("peer %s: %w", v.name, err)
			}
			size := allocated(file)
			os.Remove(file)
			if _, err := v.vm.exec(octx, "true"); err != nil {
				return nil, fmt.Errorf("peer %s after the migration: %w", v.name, err)
			}
			b.vlogf("peer %s: savevm %v (+%d MiB), migrate %v (%d MiB)", v.name, d, grown>>20, dm, size>>20)
			if r < 0 {
				continue
			}
			v.savevm.AddDur(d)
			v.migrate.AddDur(dm)
			v.svBytes.Add(float64(grown) / (1 << 20))
			v.migBytes.Add(float64(size) / (1 << 20))
		}
	}
	for _, v := range vms {
		b.add(&Figure{Section: "peers", Name: "savevm pause, " + v.label, Unit: "ms", Stats: v.savevm.Stats(),
			Note: fmt.Sprintf("wall time of `savevm` over QMP (human-monitor-command): the vCPUs are stopped throughout; it wrote p50 %.0f MiB into the qcow2 (RAM, device state, and a disk snapshot)", v.svBytes.Stats().P50)})
		b.add(&Figure{Section: "peers", Name: "migrate to a file: pause, " + v.label, Unit: "ms", Stats: v.migrate.Stats(),
			Note: fmt.Sprintf("`stop`, `migrate fd:` into a file (no bandwidth limit) until completed, `cont`; file p50 %.0f MiB; the disk is not saved", v.migBytes.Stats().P50)})
		res.savevm[v.label] = v.savevm.Stats().P50
		res.migrate[v.label] = v.migrate.Stats().P50
	}
	// The touched VMs are done; rewinds and clones use the idle one.
	for _, v := range vms[1:] {
		v.vm.kill()
	}
	idle := vms[0]

	// Rewind: loadvm in the running QEMU, then the agent again.
	if err := idle.vm.hmp(octx, "savevm base"); err != nil {
		return nil, err
	}
	var lv, lvAll Sample
	lvParts := parts{}
	for i := -b.opts.Warmup; i < b.opts.PeerRuns; i++ {
		t0 := time.Now()
		if err := idle.vm.hmp(octx, "loadvm base"); err != nil {
			return nil, err
		}
		tl := time.Since(t0)
		t1 := time.Now()
		if err := idle.vm.reconnect(octx); err != nil {
			return nil, fmt.Errorf("peer idle after loadvm: %w", err)
		}
		ta := time.Since(t1)
		t2 := time.Now()
		if _, err := idle.vm.exec(octx, "true"); err != nil {
			return nil, err
		}
		te := time.Since(t2)
		tt := time.Since(t0)
		b.vlogf("peer loadvm %v agent %v exec %v", tl, ta, te)
		if i < 0 {
			continue
		}
		lv.AddDur(tl)
		lvAll.AddDur(tt)
		lvParts.add("load", ms(tl))
		lvParts.add("agent", ms(ta))
		lvParts.add("exec", ms(te))
	}
	b.add(&Figure{Section: "peers", Name: "rewind: loadvm, VMM side", Unit: "ms", Stats: lv.Stats(),
		Note: "wall time of `loadvm` over QMP in the running QEMU (it stops the VM, reads RAM, devices and the disk snapshot from the qcow2, resumes)"})
	b.add(&Figure{Section: "peers", Name: "rewind → first exec: loadvm + agent + exec", Unit: "ms", Stats: lvAll.Stats(), Parts: lvParts.stats(),
		Note: "load = loadvm; agent = a new connection and HELLO to the guest's agent; exec = `true`"})
	res.loadvm, res.loadvmAll = lv.Stats().P50, lvAll.Stats().P50

	// Clone: the idle VM migrated into a file and stopped for good; each
	// clone is a new QEMU with a qcow2 overlay over its disk.
	state := filepath.Join(dir, "clone-source.mig")
	if _, err := idle.vm.migrateToFile(octx, state, false); err != nil {
		return nil, err
	}
	idle.vm.kill()
	var spawn, load, vmmSide, all Sample
	clParts := parts{}
	for i := -b.opts.Warmup; i < b.opts.PeerRuns; i++ {
		name := fmt.Sprintf("clone%d", i+b.opts.Warmup)
		overlay := filepath.Join(dir, name+".qcow2")
		if out, err := exec.CommandContext(octx, qemuImg, "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", idle.disk, overlay).CombinedOutput(); err != nil {
			return nil, fmt.Errorf("qemu-img create: %v: %s", err, out)
		}
		t0 := time.Now()
		vm, ts, err := pe.start(octx, name, []qemu.DiskFile{{Path: idle.disk, Qcow2: true}, {Path: overlay, Qcow2: true}}, true)
		if err != nil {
			return nil, err
		}
		t1 := time.Now()
		if err := vm.incoming(octx, state); err != nil {
			vm.kill()
			return nil, fmt.Errorf("peer %s: %w", name, err)
		}
		tl := time.Since(t1)
		t2 := time.Now()
		if err := vm.connect(octx, time.Minute); err != nil {
			vm.kill()
			return nil, fmt.Errorf("peer %s: %w", name, err)
		}
		ta := time.Since(t2)
		t3 := time.Now()
		if _, err := vm.exec(octx, "true"); err != nil {
			vm.kill()
			return nil, err
		}
		te := time.Since(t3)
		tt := time.Since(t0)
		vm.kill()
		os.Remove(overlay)
		b.vlogf("peer clone %s: spawn %v load %v agent %v exec %v", name, ts, tl, ta, te)
		if i < 0 {
			continue
		}
		spawn.AddDur(ts)
		load.AddDur(tl)
		vmmSide.Add(ms(ts) + ms(tl))
		all.AddDur(tt)
		clParts.add("spawn", ms(ts))
		clParts.add("load", ms(tl))
		clParts.add("agent", ms(ta))
		clParts.add("exec", ms(te))
	}
	b.add(&Figure{Section: "peers", Name: "clone: new QEMU + migrate-incoming, VMM side (spawn + load)", Unit: "ms", Stats: vmmSide.Stats(),
		Note: fmt.Sprintf("spawn = exec until QMP answers (p50 %.0f ms); load = `migrate-incoming fd:` of the file until the VM is paused, then `cont` (p50 %.0f ms)", spawn.Stats().P50, load.Stats().P50)})
	b.add(&Figure{Section: "peers", Name: "clone → first exec: spawn + load + agent + exec", Unit: "ms", Stats: all.Stats(), Parts: clParts.stats()})
	res.cloneVMM, res.cloneAll = vmmSide.Stats().P50, all.Stats().P50
	return res, nil
}

// comparePeers adds the noid / peer ratios, per storage kind of noid.
func (b *Bench) comparePeers(order []string, noid map[string]*noidFigures, p *peerFigures) {
	ratio := func(st, name string, n, q float64, note string) {
		if n <= 0 || q <= 0 {
			return
		}
		f := &Figure{Section: "vs-peers", Storage: st, Name: name, Unit: "x", Value: val(n / q),
			Note: fmt.Sprintf("noid p50 %s ms / peer p50 %s ms; %s", fmtNum(n), fmtNum(q), note)}
		f.below(1, true)
		b.add(f)
	}
	for _, st := range order {
		n := noid[st]
		for _, l := range []string{"idle", "512 MiB touched", "2 GiB touched"} {
			ratio(st, "checkpoint pause, "+l+": noid / savevm", n.pause[l], p.savevm[l], "savevm also snapshots the disk, inside the pause")
			ratio(st, "checkpoint pause, "+l+": noid / migrate to a file", n.pause[l], p.migrate[l], "the peer's pause leaves the disk out")
		}
		ratio(st, "rewind, VMM side: noid (spare ready) / loadvm", n.rewindVMM, p.loadvm, "noid: spawn + load of the server's timings")
		ratio(st, "rewind → first exec: noid (spare ready) / loadvm", n.rewindAll, p.loadvmAll, "noid's agent part also syncs clock and entropy")
		ratio(st, "clone, VMM side: noid (spare ready) / new QEMU + migrate-incoming", n.cloneVMM, p.cloneVMM, "noid: spawn + load of the server's timings")
		ratio(st, "clone → first exec: noid (spare ready) / new QEMU + migrate-incoming", n.cloneAll, p.cloneAll, "noid's clone also has a NIC and applies a new identity, address and route in its sync")
	}
}

// start runs a QEMU for the peer name with the disk chain disks (bottom
// first), paused waiting for a migration when incoming. It returns once
// QMP answers, and how long that took.
func (pe *peerEnv) start(ctx context.Context, name string, disks []qemu.DiskFile, incoming bool) (*peerVM, time.Duration, error) {
	b := pe.b
	spec := vmm.Spec{ID: "bench-peer-" + name, Name: name, Dir: pe.dir, RunDir: pe.dir, VCPUs: defaultVCPUs, MemoryMiB: defaultMemMiB,
		Kernel: b.art.Debian.Kernel, Initrd: b.art.Debian.Initrd, Accel: vmm.Accel(b.opts.Accel), SerialLog: filepath.Join(pe.dir, name+".serial")}
	qmpPath := filepath.Join(pe.dir, name+".qmp")
	vm := &peerVM{name: name, agentPath: filepath.Join(pe.dir, name+".agent"), exited: make(chan struct{})}
	qmpF, err := listenUnixFile(qmpPath)
	if err != nil {
		return nil, 0, err
	}
	defer qmpF.Close()
	agentF, err := listenUnixFile(vm.agentPath)
	if err != nil {
		return nil, 0, err
	}
	defer agentF.Close()
	logF, err := os.OpenFile(filepath.Join(pe.dir, name+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, 0, err
	}
	defer logF.Close()
	cmd := exec.Command(pe.bin, qemu.Args(spec, qemu.VMFiles{Disks: disks}, incoming)...)
	cmd.Stdout, cmd.Stderr = logF, logF
	cmd.Dir = pe.dir
	cmd.ExtraFiles = []*os.File{qmpF, agentF} // fds 3 and 4, as qemu.Args expects
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	t0 := time.Now()
	if err := cmd.Start(); err != nil {
		return nil, 0, fmt.Errorf("starting qemu for peer %s: %w", name, err)
	}
	vm.cmd = cmd
	go func() { cmd.Wait(); close(vm.exited) }()
	// Connect to the agent's port at once, as noid does.
	vm.preconn, _ = net.Dial("unix", vm.agentPath)
	qctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	q, err := qemu.DialQMP(qctx, qmpPath)
	if err != nil {
		vm.kill()
		log, _ := os.ReadFile(filepath.Join(pe.dir, name+".log"))
		return nil, 0, fmt.Errorf("peer %s: %w: %s", name, err, bytes.TrimSpace(log))
	}
	vm.qmp = q
	return vm, time.Since(t0), nil
}

// logTail returns the end of a peer's serial console and QEMU log.
func (pe *peerEnv) logTail(name string) string {
	var out []string
	for _, f := range []string{name + ".serial", name + ".log"} {
		b, _ := os.ReadFile(filepath.Join(pe.dir, f))
		lines := strings.Split(strings.TrimSpace(string(b)), "\n")
		if len(lines) > 15 {
			lines = lines[len(lines)-15:]
		}
		out = append(out, "--- "+f+":", strings.Join(lines, "\n"))
	}
	return strings.Join(out, "\n")
}

// listenUnixFile creates a listening unix socket at path and returns it as
// a file to hand to QEMU.
func listenUnixFile(path string) (*os.File, error) {
	os.Remove(path)
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, err
	}
	l.SetUnlinkOnClose(false)
	f, err := l.File()
	l.Close()
	return f, err
}

// connect says HELLO to the guest's agent (on the connection made at
// start, or a new one) and waits for its answer.
func (vm *peerVM) connect(ctx context.Context, timeout time.Duration) error {
	conn := vm.preconn
	vm.preconn = nil
	if conn == nil {
		var err error
		if conn, err = net.Dial("unix", vm.agentPath); err != nil {
			return err
		}
	}
	cctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	c, err := agentclient.Connect(cctx, conn, agentclient.Options{})
	if err != nil {
		conn.Close()
		return fmt.Errorf("connecting to the agent: %w", err)
	}
	vm.agent = c
	return nil
}

// reconnect drops the agent connection and makes a new one, as a host
// does after the guest's memory went back in time.
func (vm *peerVM) reconnect(ctx context.Context) error {
	if vm.agent != nil {
		vm.agent.Close()
		vm.agent = nil
	}
	return vm.connect(ctx, time.Minute)
}

// exec runs argv in the guest and fails unless it exits 0.
func (vm *peerVM) exec(ctx context.Context, argv ...string) (string, error) {
	if vm.agent == nil {
		return "", errors.New("no agent connection")
	}
	p, err := vm.agent.Exec(ctx, proto.ExecRequest{Argv: argv})
	if err != nil {
		return "", err
	}
	var out, errb bytes.Buffer
	done := make(chan struct{})
	go func() { io.Copy(&errb, p.Stderr()); close(done) }()
	io.Copy(&out, p.Stdout())
	<-done
	ex, err := p.Wait()
	if err == nil && ex.Code != 0 {
		err = fmt.Errorf("%v exited %d: %s", argv, ex.Code, strings.TrimSpace(errb.String()))
	}
	return out.String(), err
}

// hmp runs a human monitor command; HMP reports errors as text.
func (vm *peerVM) hmp(ctx context.Context, line string) error {
	var out string
	if err := vm.qmp.Execute(ctx, "human-monitor-command", map[string]any{"command-line": line}, &out); err != nil {
		return fmt.Errorf("%s: %w", line, err)
	}
	if out = strings.TrimSpace(out); out != "" {
		return fmt.Errorf("%s: %s", line, out)
	}
	return nil
}

// setupMigration turns on MIGRATION events and lifts the bandwidth
// limit (QEMU's default of 32 MiB/s is meant for networks).
func (vm *peerVM) setupMigration(ctx context.Context) error {
	if err := vm.qmp.Execute(ctx, "migrate-set-capabilities", map[string]any{"capabilities": []map[string]any{{"capability": "events", "state": true}}}, nil); err != nil {
		return err
	}
	return vm.qmp.Execute(ctx, "migrate-set-parameters", map[string]any{"max-bandwidth": int64(1) << 40}, nil)
}

// migrateToFile stops the VM, migrates it into file and, with resume,
// resumes it. It returns how long the VM was stopped (until cont returned),
// or the time to the end of the migration without resume.
func (vm *peerVM) migrateToFile(ctx context.Context, file string, resume bool) (time.Duration, error) {
	f, err := os.Create(file)
	if err != nil {
		return 0, err
	}
	err = vm.qmp.SendFD(ctx, "mig", f)
	f.Close()
	if err != nil {
		return 0, err
	}
	done := vm.qmp.WaitEvent(func(ev qemu.Event) bool {
		return ev.Name == "MIGRATION" && (bytes.Contains(ev.Data, []byte(`"completed"`)) || bytes.Contains(ev.Data, []byte(`"failed"`)) || bytes.Contains(ev.Data, []byte(`"cancelled"`)))
	})
	t0 := time.Now()
	if err := vm.qmp.Execute(ctx, "stop", nil, nil); err != nil {
		return 0, err
	}
	if err := vm.qmp.Execute(ctx, "migrate", map[string]any{"uri": "fd:mig"}, nil); err != nil {
		return 0, err
	}
	ev, err := done(ctx)
	if err != nil {
		return 0, err
	}
	if !bytes.Contains(ev.Data, []byte(`"completed"`)) {
		var st struct {
			Status    string `json:"status"`
			ErrorDesc string `json:"error-desc"`
		}
		vm.qmp.Execute(ctx, "query-migrate", nil, &st)
		return 0, fmt.Errorf("migration to %s: %s %s", file, st.Status, st.ErrorDesc)
	}
	if !resume {
		return time.Since(t0), nil
	}
	// QEMU announces the completion a moment before it accepts cont.
	for {
		err := vm.qmp.Execute(ctx, "cont", nil, nil)
		var qe *qemu.QMPError
		if err == nil || !errors.As(err, &qe) || !strings.Contains(qe.Desc, "not finalized") {
			return time.Since(t0), err
		}
		time.Sleep(200 * time.Microsecond)
	}
}

// incoming loads the migration in file into a QEMU started with
// -incoming defer and resumes it.
func (vm *peerVM) incoming(ctx context.Context, file string) error {
	f, err := os.Open(file)
	if err != nil {
		return err
	}
	err = vm.qmp.SendFD(ctx, "in", f)
	f.Close()
	if err != nil {
		return err
	}
	if err := vm.qmp.Execute(ctx, "migrate-incoming", map[string]any{"uri": "fd:in"}, nil); err != nil {
		return err
	}
	// Poll as noid does (qemu.Instance.waitIncoming).
	delay := 200 * time.Microsecond
	for {
		var st struct {
			Status string `json:"status"`
		}
		if err := vm.qmp.Execute(ctx, "query-status", nil, &st); err != nil {
			return err
		}
		if st.Status == "paused" || st.Status == "postmigrate" || st.Status == "running" {
			break
		}
		if st.Status != "inmigrate" {
			return fmt.Errorf("incoming migration ended in state %s", st.Status)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-vm.exited:
			return errors.New("qemu exited while loading the migration")
		case <-time.After(delay):
		}
		if delay < 5*time.Millisecond {
			delay *= 2
		}
	}
	return vm.qmp.Execute(ctx, "cont", nil, nil)
}

// kill stops the QEMU and waits for it.
func (vm *peerVM) kill() {
	if vm.agent != nil {
		vm.agent.Close()
	}
	if vm.preconn != nil {
		vm.preconn.Close()
	}
	if vm.qmp != nil {
		vm.qmp.Close()
	}
	if vm.cmd != nil && vm.cmd.Process != nil {
		vm.cmd.Process.Kill()
		select {
		case <-vm.exited:
		case <-time.After(10 * time.Second):
		}
	}
}

// close kills every QEMU still running from the peers' dir and removes it.
func (pe *peerEnv) close() error {
	var errs []error
	for _, pid := range pidsUsing(pe.dir) {
		syscall.Kill(pid, syscall.SIGKILL)
	}
	waitGone(pidsUsing(pe.dir), 10*time.Second)
	if pe.b.opts.Keep {
		pe.b.logf("kept %s (--keep)", pe.dir)
	} else if err := os.RemoveAll(pe.dir); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}
