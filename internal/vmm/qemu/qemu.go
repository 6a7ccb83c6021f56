// Package qemu is the QEMU backend: it runs each VM as a daemonized
// qemu-system-x86_64 process on the microvm machine. Guest RAM is
// anonymous memory, or a snapshot's memory file mapped copy-on-write, and
// never a file the kernel writes back; the disk is a chain of images with a
// writable qcow2 overlay on top (see layout.go). A checkpoint is a live
// migration into noid-server itself (see splitStream), with the disk's top
// frozen in the instant the vCPUs stop.
//
// VMM processes run in their own session, outside the server's process
// group: a server restart or crash leaves them running and the next server
// re-adopts them by pid and QMP socket.
package qemu

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/noid-vm/noid/internal/errdefs"
	"github.com/noid-vm/noid/internal/procfs"
	"github.com/noid-vm/noid/internal/sandbox"
	"github.com/noid-vm/noid/internal/vmm"
)

// Name is the backend's name, as stored in VMs and snapshots.
const Name = "qemu"

// Options configure the backend.
type Options struct {
	// Binary is the qemu-system-x86_64 path; empty searches $PATH.
	Binary string
	// Cgroups, when set, puts each QEMU of a spec with a Sandbox in its own
	// cgroup (named after the VM id) with memory and pids limits.
	Cgroups *sandbox.Manager
	// UIDs, when set, runs each QEMU of a spec with a Sandbox whose UID is 0
	// as a uid of its own, leased from this pool while the QEMU runs.
	UIDs *sandbox.UIDPool
	// MemoryOverhead is added to guest RAM for the cgroup memory limit;
	// 0 means MemoryOverhead.
	MemoryOverhead int64
	// PidsLimit is the cgroup's pids.max; 0 means PidsLimit plus the vCPUs.
	PidsLimit int64
	// Logger receives warnings (sandbox clean-up, snapshots from an older
	// QEMU); nil discards them.
	Logger *slog.Logger
}

// Backend runs VMs under QEMU. It implements vmm.Backend.
type Backend struct {
	bin  string
	opts Options

	verOnce sync.Once
	fwOnce  sync.Once
	fw      Firmware
	ver     string
	verErr  error
}

var (
	_ vmm.Backend  = (*Backend)(nil)
	_ vmm.Preparer = (*Backend)(nil)
)

// New returns a QEMU backend.
func New(opts Options) *Backend {
	bin := opts.Binary
	if bin == "" {
		bin = "qemu-system-x86_64"
	}
	return &Backend{bin: bin, opts: opts}
}

// Name returns "qemu".
func (b *Backend) Name() string { return Name }

// Binary returns the resolved QEMU binary path, or an error saying what to install.
func (b *Backend) Binary() (string, error) {
	p, err := exec.LookPath(b.bin)
	if err != nil {
		return "", fmt.Errorf("%w: %s not found; install it with `apt-get install qemu-system-x86` or set qemu_binary in the config", errdefs.ErrUnavailable, b.bin)
	}
	return p, nil
}

// Version returns QEMU's version string, e.g. "7.2.22".
func (b *Backend) Version(ctx context.Context) (string, error) {
	b.verOnce.Do(func() {
		bin, err := b.Binary()
		if err != nil {
			b.verErr = err
			return
		}
		out, err := exec.CommandContext(ctx, bin, "--version").Output()
		if err != nil {
			b.verErr = fmt.Errorf("running %s --version: %w", bin, err)
			return
		}
		f := strings.Fields(string(out))
		for i, w := range f {
			if w == "version" && i+1 < len(f) {
				b.ver = f[i+1]
				return
			}
		}
		b.verErr = fmt.Errorf("cannot parse qemu version from %q", strings.SplitN(string(out), "\n", 2)[0])
	})
	return b.ver, b.verErr
}

// Check verifies the QEMU binary runs.
func (b *Backend) Check(ctx context.Context) error {
	_, err := b.Version(ctx)
	return err
}

// socket paths for a VM.
func qmpPath(spec vmm.Spec) string   { return filepath.Join(spec.RunDir, spec.ID+".qmp") }
func agentPath(spec vmm.Spec) string { return filepath.Join(spec.RunDir, spec.ID+".agent") }
func pidPath(spec vmm.Spec) string   { return filepath.Join(spec.Dir, "qemu.pid") }

// processName tags the QEMU process so Adopt can verify a pid really is ours.
func processName(spec vmm.Spec) string { return "noid-" + spec.ID }

// Args returns the QEMU command line for spec whose files are f.
// incoming adds -incoming defer. The QMP and agent sockets are listening
// sockets the server creates and passes as fds 3 and 4, so they exist
// before QEMU starts and nobody polls for them.
func Args(spec vmm.Spec, f VMFiles, incoming bool) []string {
	return args(spec, f, incoming, argOpts{tapFD: -1, firmware: qbootFirmware})
}

// VMFiles are the files QEMU opens for one VM: its disk chain and its RAM
// file. In a confined QEMU the paths are those of inherited fds.
type VMFiles struct {
	// Disks is the disk chain, bottom first; the last is the writable
	// top, the others are opened read-only.
	Disks []DiskFile
	// Mem is the file the guest RAM starts from, mapped copy-on-write;
	// "" gives the guest anonymous RAM.
	Mem string
	// MemShared maps Mem shared instead: the RAM of a VM started by noid
	// before copy-on-write RAM.
	MemShared bool
	// MemReadOnly opens Mem read-only (QEMU 8.2 and later can map a
	// read-only file privately writable).
	MemReadOnly bool
}

// DiskFile is one image of a disk chain.
type DiskFile struct {
	Path string
	// Qcow2 tells the image's format: qcow2, or raw.
	Qcow2 bool
}

// argOpts are the extras of a confined QEMU's command line.
type argOpts struct {
	// tapFD, when >= 0, is the inherited fd of the NIC's TAP.
	tapFD int
	// fdSets are the inherited fds put into fd sets (-add-fd), through
	// which the block layer opens the disk chain as /dev/fdset/N.
	fdSets []fdSet
	// filesDir, when set, names the VM directory whose files QEMU was
	// given by fd. It goes on the command line as an inert secret object,
	// so that ps and pgrep still show which VM and data dir a QEMU
	// belongs to (it never reads the value).
	filesDir string
	// tbSizeMiB, when set, bounds the TCG translation cache (QEMU 7.2
	// reserves 1 GiB by default), so that it fits the cgroup's overhead.
	tbSizeMiB int
	// firmware is what boots the kernel (see Firmware).
	firmware Firmware
}

// fdSet is an inherited fd in an fd set.
type fdSet struct {
	fd, set int
	// writable marks the read-write fd of a disk top (opaque
	// writableOpaque), which a checkpoint removes once the top is frozen.
	writable bool
}

// writableOpaque is the opaque string of the read-write fd of a disk top in
// its fd set: the fd that removeWritableFDs takes away from QEMU once a
// checkpoint has frozen that top.
const writableOpaque = "noid-rw"

// rootNode is the node name of the disk's writable top when QEMU starts;
// a checkpoint puts a new top over it, named topNodePrefix plus a number.
const (
	rootNode      = "root"
	topNodePrefix = "top-"
)

// blockdevs returns the -blockdev options of the disk chain: each layer
// read-only with the one below it as its backing, the top writable.
func blockdevs(disks []DiskFile) []string {
	var out []string
	backing := ""
	for i, d := range disks {
		node := fmt.Sprintf("layer%d", i)
		top := i == len(disks)-1
		if top {
			node = rootNode
		}
		// No image locking: noid makes sure one QEMU writes a top and no
		// one writes a layer, and QEMU's OFD locks would outlive it in
		// the fd sets of a sandboxed QEMU (an fd set keeps its own fds
		// open, so locks taken through a reopened image never go away).
		o := map[string]any{"node-name": node, "file": map[string]any{"driver": "file", "filename": d.Path, "aio": "threads", "locking": "off"}}
		if d.Qcow2 {
			o["driver"] = "qcow2"
			// The backing is always given (or none), never read from the
			// image's header: layers are linked from place to place.
			if backing != "" {
				o["backing"] = backing
			} else {
				o["backing"] = nil
			}
		} else {
			o["driver"] = "raw"
		}
		if top {
			o["discard"] = "unmap"
			o["cache"] = map[string]any{"direct": false, "no-flush": false}
		} else {
			o["read-only"] = true
			o["file"].(map[string]any)["read-only"] = true
		}
		b, _ := json.Marshal(o)
		out = append(out, "-blockdev", string(b))
		backing = node
	}
	return out
}

// args is Args for a confined QEMU (see argOpts).
func args(spec vmm.Spec, f VMFiles, incoming bool, o argOpts) []string {
	mem := strconv.Itoa(spec.MemoryMiB) + "M"
	cmdline := "console=ttyS0 reboot=t panic=-1 noid.transport=virtio-serial"
	if spec.Accel != vmm.AccelKVM {
		// Under TCG the guest TSC runs at the host's TSC rate. Calibrating it
		// against the emulated PIT fails on a busy host and can stall the
		// boot, so tell the kernel the rate and trust it.
		if args := vmm.TCGKernelArgs(); len(args) > 0 {
			cmdline += " " + strings.Join(args, " ")
		}
	}
	if spec.Cmdline != "" {
		cmdline += " " + spec.Cmdline
	}
	// The guest RAM never lives in a file the kernel writes back: it is
	// anonymous memory, or a snapshot's memory file mapped privately, so
	// that guest writes stay in anonymous memory.
	ram := "memory-backend-ram,id=" + ramBlockName + ",size=" + mem
	switch {
	case f.Mem != "" && f.MemShared:
		ram = "memory-backend-file,id=" + ramBlockName + ",size=" + mem + ",mem-path=" + f.Mem + ",share=on"
	case f.Mem != "" && f.MemReadOnly:
		ram = "memory-backend-file,id=" + ramBlockName + ",size=" + mem + ",mem-path=" + f.Mem + ",share=off,readonly=on,rom=off"
	case f.Mem != "":
		ram = "memory-backend-file,id=" + ramBlockName + ",size=" + mem + ",mem-path=" + f.Mem + ",share=off"
	}
	a := []string{
		"-name", processName(spec) + ",debug-threads=off",
		"-M", "microvm," + o.firmware.MachineOpts() + "rtc=on,acpi=on,pit=on,pic=on,isa-serial=on,memory-backend=" + ramBlockName,
		"-m", mem,
		"-smp", strconv.Itoa(spec.VCPUs),
		"-object", ram,
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		"-chardev", "file,id=serial0,path=" + spec.SerialLog + ",append=on",
		"-serial", "chardev:serial0",
		"-kernel", spec.Kernel,
		"-initrd", spec.Initrd,
		"-append", cmdline,
	}
	a = append(a, o.firmware.Args()...)
	for _, s := range o.fdSets {
		opt := fmt.Sprintf("fd=%d,set=%d", s.fd, s.set)
		if s.writable {
			opt += ",opaque=" + writableOpaque
		}
		a = append(a, "-add-fd", opt)
	}
	a = append(a, blockdevs(f.Disks)...)
	a = append(a,
		"-device", "virtio-blk-device,drive="+rootNode,
		"-device", "virtio-serial-device,max_ports=2",
		"-chardev", "socket,id=agent,fd=4,server=on,wait=off",
		"-device", "virtserialport,chardev=agent,name=noid.agent",
		"-object", "rng-random,id=rng0,filename=/dev/urandom",
		"-device", "virtio-rng-device,rng=rng0",
		"-chardev", "socket,id=qmp,fd=3,server=on,wait=off",
		"-mon", "chardev=qmp,mode=control",
	)
	switch spec.Accel {
	case vmm.AccelKVM:
		a = append(a, "-accel", "kvm", "-cpu", "host")
	default:
		accel := "tcg"
		if o.tbSizeMiB > 0 {
			accel += ",tb-size=" + strconv.Itoa(o.tbSizeMiB)
		}
		a = append(a, "-accel", accel, "-cpu", "max")
	}
	if spec.Net != nil {
		netdev := "tap,id=net0,ifname=" + spec.Net.Tap + ",script=no,downscript=no,vnet_hdr=on"
		if o.tapFD >= 0 {
			// vnet_hdr is probed from the fd (it was attached with IFF_VNET_HDR).
			netdev = "tap,id=net0,fd=" + strconv.Itoa(o.tapFD)
		}
		a = append(a, "-netdev", netdev, "-device", "virtio-net-device,netdev=net0,mac="+spec.Net.MAC)
	}
	if o.filesDir != "" {
		a = append(a, "-object", "secret,id=noid-files,format=raw,data="+strings.ReplaceAll(o.filesDir, ",", ",,"))
	}
	// The uid is dropped by spawn, not with -runas (see sandbox.go).
	if spec.Sandbox != nil && spec.Sandbox.Seccomp {
		a = append(a, "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny")
	}
	if incoming {
		// -S: a loaded VM stays paused until the server resumes it, even
		// where the snapshot's own run state would let it start.
		a = append(a, "-S", "-incoming", "defer")
	}
	return a
}

// files finds the files QEMU opens for the VM in spec.Dir: its disk chain
// and its RAM file.
func (b *Backend) files(ctx context.Context, spec vmm.Spec) (VMFiles, error) {
	var f VMFiles
	c, err := chain(spec.Dir)
	if err != nil {
		return f, err
	}
	for _, p := range c {
		q, err := isQcow2(p)
		if err != nil {
			return f, fmt.Errorf("reading disk image %s: %w", p, err)
		}
		f.Disks = append(f.Disks, DiskFile{Path: p, Qcow2: q})
	}
	switch {
	case exists(filepath.Join(spec.Dir, vmMem)):
		f.Mem = filepath.Join(spec.Dir, vmMem)
		f.MemReadOnly = b.privateReadOnlyRAM(ctx)
	case exists(filepath.Join(spec.Dir, legacyMem)):
		f.Mem, f.MemShared = filepath.Join(spec.Dir, legacyMem), true
	}
	return f, nil
}

func exists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// listenFile creates a listening unix socket at path and returns it as a
// file to pass to QEMU. The path stays after our copy is closed.
func listenFile(path string) (*os.File, error) {
	os.Remove(path)
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("creating socket %s: %w", path, err)
	}
	l.SetUnlinkOnClose(false)
	f, err := l.File()
	l.Close()
	if err != nil {
		return nil, fmt.Errorf("creating socket %s: %w", path, err)
	}
	return f, nil
}

// spawn starts QEMU in its own session, detached from the server: a server
// restart or crash leaves it running, and the next server re-adopts it.
func (b *Backend) spawn(ctx context.Context, spec vmm.Spec, incoming bool) (*Instance, error) {
	bin, err := b.Binary()
	if err != nil {
		return nil, err
	}
	for _, f := range []struct{ what, path string }{{"kernel", spec.Kernel}, {"initrd", spec.Initrd}} {
		if _, err := os.Stat(f.path); err != nil {
			return nil, fmt.Errorf("%w: %s %s: %v", errdefs.ErrUnavailable, f.what, f.path, err)
		}
	}
	files, err := b.files(ctx, spec)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", errdefs.ErrUnavailable, err)
	}
	if err := os.MkdirAll(spec.RunDir, 0o700); err != nil {
		return nil, fmt.Errorf("creating run dir: %w", err)
	}
	qmpF, err := listenFile(qmpPath(spec))
	if err != nil {
		return nil, err
	}
	defer qmpF.Close()
	agentF, err := listenFile(agentPath(spec))
	if err != nil {
		return nil, err
	}
	defer agentF.Close()
	logPath := filepath.Join(spec.Dir, "qemu.log")
	logF, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("opening qemu log: %w", err)
	}
	defer logF.Close()
	conf, err := b.confine(spec, files)
	if err != nil {
		return nil, err
	}
	defer conf.close()
	logStart, _ := logF.Seek(0, io.SeekEnd)
	o := conf.argOpts(spec)
	o.firmware = b.firmware(ctx)
	cmd := exec.Command(bin, args(conf.args, conf.vmFiles, incoming, o)...)
	cmd.Stdin = nil
	cmd.Stdout = logF
	cmd.Stderr = logF
	cmd.Dir = spec.Dir
	if conf.uid != 0 {
		cmd.Dir = "/" // the VM's dir is not reachable by the sandbox uid
	}
	cmd.ExtraFiles = append([]*os.File{qmpF, agentF}, conf.files...)
	// A new session: terminal signals and the server's exit don't reach it.
	cmd.SysProcAttr = conf.sysProcAttr()
	if conf.cg != nil {
		err = conf.cg.Start(cmd)
	} else {
		err = cmd.Start()
	}
	if err != nil {
		b.undo(conf, spec)
		return nil, fmt.Errorf("starting %s for vm %s: %w", bin, spec.Name, err)
	}
	conf.close()
	pid := cmd.Process.Pid
	// Reap it if it exits while we are its parent.
	go cmd.Wait()
	if err := os.WriteFile(pidPath(spec), []byte(strconv.Itoa(pid)+"\n"), 0o600); err != nil {
		killPid(pid)
		b.undo(conf, spec)
		return nil, fmt.Errorf("writing pid file: %w", err)
	}
	// Connect to the agent's port right away: QEMU accepts the connection
	// while it sets up the chardev, so a restored guest never sees its host
	// side go away and the first HELLO is delivered the moment it runs.
	pre, preErr := net.Dial("unix", agentPath(spec))
	inst, err := attach(ctx, spec, pid, b, conf.cg)
	if err == nil && preErr == nil {
		inst.preconn = pre
	} else if pre != nil {
		pre.Close()
	}
	if err != nil {
		killPid(pid)
		b.undo(conf, spec)
		if msg := qemuLog(logPath, logStart); msg != "" {
			return nil, fmt.Errorf("starting qemu for vm %s: %s", spec.Name, msg)
		}
		return nil, err
	}
	return inst, nil
}

// qemuLog returns what QEMU wrote to its log since offset.
func qemuLog(path string, offset int64) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	f.Seek(offset, io.SeekStart)
	b, _ := io.ReadAll(io.LimitReader(f, 4096))
	return strings.TrimSpace(string(b))
}

// Boot cold-boots spec.
func (b *Backend) Boot(ctx context.Context, spec vmm.Spec) (vmm.Instance, error) {
	inst, err := b.spawn(ctx, spec, false)
	if err != nil {
		return nil, err
	}
	return inst, nil
}

// Restore starts spec from the snapshot in dir: it prepares a VMM for it
// (Prepare) and loads the snapshot's device state.
func (b *Backend) Restore(ctx context.Context, spec vmm.Spec, dir string, cp vmm.Copier) (vmm.Instance, vmm.Timings, error) {
	var t vmm.Timings
	start := time.Now()
	p, err := b.Prepare(ctx, spec, dir, cp)
	if err != nil {
		return nil, t, err
	}
	inst := p.(*Instance)
	t.Copy, t.Spawn = inst.prepTimings.Copy, inst.prepTimings.Spawn
	lt, err := inst.Load(ctx)
	if err != nil {
		inst.Kill(context.Background())
		return nil, t, err
	}
	t.Load = lt.Load
	t.Total = time.Since(start)
	return inst, t, nil
}

// checkSnapshot refuses a snapshot that this backend cannot restore into
// spec, and returns its metadata.
func (b *Backend) checkSnapshot(ctx context.Context, spec vmm.Spec, dir string) (*vmm.SnapshotMeta, error) {
	meta, err := vmm.ReadMeta(dir)
	if err != nil {
		return nil, err
	}
	if meta.Backend != Name {
		return nil, fmt.Errorf("%w: snapshot was taken by the %s backend and cannot be restored under qemu", errdefs.ErrInvalidArgument, meta.Backend)
	}
	if meta.Format != 0 && meta.Format != snapshotFormat {
		return nil, fmt.Errorf("%w: snapshot has format %d, this noid reads formats 0 and %d", errdefs.ErrInvalidArgument, meta.Format, snapshotFormat)
	}
	if meta.VCPUs != spec.VCPUs || meta.MemoryMiB != spec.MemoryMiB {
		return nil, fmt.Errorf("%w: snapshot needs %d vCPUs and %d MiB, the VM has %d vCPUs and %d MiB",
			errdefs.ErrInvalidArgument, meta.VCPUs, meta.MemoryMiB, spec.VCPUs, spec.MemoryMiB)
	}
	if meta.HasNet != (spec.Net != nil) {
		return nil, fmt.Errorf("%w: snapshot and VM differ in network devices (snapshot has NIC: %v)", errdefs.ErrInvalidArgument, meta.HasNet)
	}
	if meta.Accel != "" && meta.Accel != spec.Accel {
		return nil, fmt.Errorf("%w: snapshot was taken under %s and cannot be restored under %s", errdefs.ErrInvalidArgument, meta.Accel, spec.Accel)
	}
	if ver, err := b.Version(ctx); err == nil && meta.VMMVersion != "" && meta.VMMVersion != ver {
		// QEMU reads the migration streams of its earlier releases, not
		// of later ones. A snapshot from an older QEMU is tried: if its
		// state does not load, the restore fails before anything of the
		// VM is touched (the old VMM keeps running on a rewind).
		if compareVersions(meta.VMMVersion, ver) > 0 {
			return nil, fmt.Errorf("%w: snapshot was taken by qemu %s, newer than this host's qemu %s", errdefs.ErrInvalidArgument, meta.VMMVersion, ver)
		}
		if b.opts.Logger != nil {
			b.opts.Logger.Warn("restoring a snapshot taken by an older qemu", "vm", spec.Name, "dir", dir, "snapshot_qemu", meta.VMMVersion, "qemu", ver)
		}
	}
	return meta, nil
}

// Prepare lays out in spec.Dir the files of a VM restored from the
// snapshot in dir (its disk as a new top over the snapshot's chain, its
// copy-on-write memory file) and starts QEMU for them, waiting for the
// snapshot's device state (see vmm.Preparer).
func (b *Backend) Prepare(ctx context.Context, spec vmm.Spec, dir string, cp vmm.Copier) (vmm.Prepared, error) {
	meta, err := b.checkSnapshot(ctx, spec, dir)
	if err != nil {
		return nil, err
	}
	copyStart := time.Now()
	if err := b.layoutFromSnapshot(ctx, dir, spec.Dir, cp); err != nil {
		return nil, fmt.Errorf("preparing the files of vm %s: %w", spec.Name, err)
	}
	spawnStart := time.Now()
	inst, err := b.spawn(ctx, spec, true)
	if err != nil {
		return nil, err
	}
	inst.prepared = &preparedState{dir: dir, ignoreShared: meta.Format == 0}
	inst.prepTimings = vmm.Timings{Copy: spawnStart.Sub(copyStart), Spawn: time.Since(spawnStart)}
	return inst, nil
}

// privateReadOnlyRAM reports whether this QEMU maps a read-only memory
// file privately writable (memory-backend-file readonly=on,rom=off: QEMU
// 8.2 and later). Older ones open the file for writing even to map it
// privately, so each VM gets a copy of its snapshot's memory file.
func (b *Backend) privateReadOnlyRAM(ctx context.Context) bool {
	return b.versionAtLeast(ctx, 8, 2)
}

// Adopt reattaches to a QEMU started by an earlier server.
func (b *Backend) Adopt(ctx context.Context, spec vmm.Spec, pid int) (vmm.Instance, error) {
	if pid <= 0 || !isOurs(pid, spec) {
		return nil, vmm.ErrGone
	}
	inst, err := attach(ctx, spec, pid, b, b.sandboxOf(spec))
	if err != nil {
		if !isOurs(pid, spec) {
			return nil, vmm.ErrGone
		}
		return nil, err
	}
	if err := inst.ensureRunning(ctx); err != nil {
		inst.Kill(context.Background())
		return nil, err
	}
	return inst, nil
}

// isOurs reports whether pid is alive and is the QEMU of spec (guards against pid reuse).
func isOurs(pid int, spec vmm.Spec) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	if err != nil {
		return false
	}
	return bytes.Contains(b, []byte(processName(spec)+",")) && !procfs.Exited(pid)
}
