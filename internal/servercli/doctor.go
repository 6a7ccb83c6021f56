package servercli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/google/nftables"
	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"github.com/noid-vm/noid/internal/config"
	"github.com/noid-vm/noid/internal/errdefs"
	"github.com/noid-vm/noid/internal/image"
	"github.com/noid-vm/noid/internal/lockfile"
	"github.com/noid-vm/noid/internal/remote"
	"github.com/noid-vm/noid/internal/sandbox"
	"github.com/noid-vm/noid/internal/storage"
	"github.com/noid-vm/noid/internal/vmm"
)

func newDoctorCmd(e *env) *cobra.Command {
	return &cobra.Command{
		Use:   "doctor",
		Short: "Check that this host can run noid, and say what to fix",
		Long: `Check what noid-server needs from the host, with the same config as serve:
root, KVM (else VMs run under TCG, much slower), the VMM binary, a built guest
image, the data dir's owner, mode and free space, how storage copies (reflink
or sparse; the loop device and mkfs.xfs for [storage] reflink_image_size),
cgroups for the VMM sandbox, and with networking on the bridge and nftables.

Each line is ok, WARN (noid runs, with less: slower, less confined) or FAIL
(noid, or part of it, cannot work), followed by what to do. doctor exits 1
when something FAILs. It changes nothing, and it can run next to a server.`,
		Example: `  noid-server doctor --config /etc/noid/config.toml`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			cfg, err := e.config()
			if err != nil {
				return err
			}
			failed := newDoctor(cfg).run(e.stdout)
			if failed > 0 {
				return fmt.Errorf("%d check(s) failed; fix them as said above and run doctor again", failed)
			}
			return nil
		},
	}
}

// status is the outcome of one doctor check.
type status int

const (
	statusOK status = iota
	statusWarn
	statusFail
)

func (s status) String() string {
	return [...]string{"ok", "WARN", "FAIL"}[s]
}

// finding is what one check found, and what to do about it.
type finding struct {
	check  string
	status status
	msg    string
	fix    string
}

// doctor runs host checks for a config. Its fields are the host as seen
// by the checks; tests replace them.
type doctor struct {
	cfg         *config.Config
	euid        func() int
	kvm         func() vmm.KVMStatus
	lookPath    func(string) (string, error)
	statfs      func(string, *unix.Statfs_t) error
	loopControl string
	cgroups     func() (string, error)
	nftables    func() error
	link        func(name string) (*net.Interface, bool, error) // the interface, whether it is a bridge
}

func newDoctor(cfg *config.Config) *doctor {
	return &doctor{
		cfg:         cfg,
		euid:        os.Geteuid,
		kvm:         vmm.ProbeKVM,
		lookPath:    exec.LookPath,
		statfs:      unix.Statfs,
		loopControl: "/dev/loop-control",
		cgroups: func() (string, error) {
			l, err := sandbox.Detect(sandbox.DetectOptions{})
			if err != nil {
				return "", err
			}
			return l.String(), nil
		},
		nftables: func() error {
			c, err := nftables.New()
			if err != nil {
				return err
			}
			_, err = c.ListTables()
			return err
		},
		link: func(name string) (*net.Interface, bool, error) {
			ifi, err := net.InterfaceByName(name)
			if err != nil {
				return nil, false, err
			}
			_, err = os.Stat(filepath.Join("/sys/class/net", name, "bridge"))
			return ifi, err == nil, nil
		},
	}
}

// run prints every finding to w and returns how many failed.
func (d *doctor) run(w io.Writer) int {
	failed, warned := 0, 0
	for _, check := range []func() []finding{d.root, d.kvmCheck, d.vmmBinary, d.guestImage, d.dataDir, d.freeSpace, d.storage, d.loop, d.cgroupsCheck, d.network, d.remoteStore, d.server} {
		for _, f := range check() {
			fmt.Fprintf(w, "%-5s %-10s %s\n", f.status, f.check, f.msg)
			if f.fix != "" {
				fmt.Fprintf(w, "%-16s fix: %s\n", "", f.fix)
			}
			switch f.status {
			case statusFail:
				failed++
			case statusWarn:
				warned++
			}
		}
	}
	fmt.Fprintf(w, "%d failed, %d warnings\n", failed, warned)
	return failed
}

// remoteStore checks the [remote] store: its credentials, that it answers
// and that the bucket exists.
func (d *doctor) remoteStore() []finding {
	rc := d.cfg.Remote
	if !rc.Enabled() {
		return []finding{ok("remote", "no remote store ([remote] endpoint is empty): checkpoints and goldens stay on this host")}
	}
	creds, err := rc.LoadRemoteCredentials()
	if err != nil {
		return []finding{{check: "remote", status: statusFail, msg: err.Error(),
			fix: "write the store's key to a file of mode 0600 named by [remote] credentials_file (access_key_id, secret_access_key), or set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for noid-server"}}
	}
	st, err := remote.NewS3(rc, creds)
	if err == nil {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		err = st.Check(ctx)
		cancel()
	}
	if err != nil {
		return []finding{{check: "remote", status: statusFail, msg: err.Error(), fix: errdefs.HintOf(err)}}
	}
	return []finding{ok("remote", "%s answers with %s, and the bucket exists", st, creds)}
}

func ok(check, format string, a ...any) finding {
	return finding{check: check, status: statusOK, msg: fmt.Sprintf(format, a...)}
}

func (d *doctor) root() []finding {
	if d.euid() == 0 {
		return []finding{ok("root", "noid-server runs as root")}
	}
	return []finding{{check: "root", status: statusWarn, msg: "not root: VMMs run as this user without per-VM uids or cgroups, and networking cannot be set up",
		fix: "run noid-server as root (the systemd unit does)"}}
}

func (d *doctor) kvmCheck() []finding {
	k := d.kvm()
	if k.Usable {
		return []finding{ok("kvm", "/dev/kvm is usable")}
	}
	f := finding{check: "kvm", status: statusWarn, msg: k.Reason + ": VMs run under TCG (software emulation), many times slower",
		fix: "enable virtualisation (VT-x/AMD-V) in the firmware and load kvm_intel or kvm_amd; on a cloud VM, choose an instance type with nested virtualisation"}
	if d.cfg.Accel == "kvm" || d.cfg.VMM == "firecracker" {
		f.status = statusFail
		f.msg = k.Reason + ": the config needs KVM (accel = \"kvm\" or vmm = \"firecracker\"), so the server will not start"
		f.fix += `; or set accel = "auto" and vmm = "qemu"`
	}
	return []finding{f}
}

func (d *doctor) vmmBinary() []finding {
	if d.cfg.VMM == "firecracker" {
		if _, err := os.Stat(d.cfg.FirecrackerBinary); err != nil {
			return []finding{{check: "vmm", status: statusFail, msg: fmt.Sprintf("firecracker_binary %s: %v", d.cfg.FirecrackerBinary, err),
				fix: `install Firecracker v1.16.1+ there, or set vmm = "qemu"`}}
		}
		return []finding{ok("vmm", "firecracker at %s", d.cfg.FirecrackerBinary)}
	}
	bin := d.cfg.QEMUBinary
	if bin == "" {
		bin = "qemu-system-x86_64"
	}
	p, err := d.lookPath(bin)
	if err != nil {
		return []finding{{check: "vmm", status: statusFail, msg: fmt.Sprintf("QEMU (%s) not found: creates fail", bin),
			fix: "apt-get install qemu-system-x86, or set qemu_binary in the config"}}
	}
	return []finding{ok("vmm", "QEMU at %s", p)}
}

func (d *doctor) guestImage() []finding {
	if d.cfg.Kernel != "" && d.cfg.Initrd != "" && d.cfg.Rootfs != "" {
		for _, p := range []string{d.cfg.Kernel, d.cfg.Initrd, d.cfg.Rootfs} {
			if _, err := os.Stat(p); err != nil {
				return []finding{{check: "image", status: statusFail, msg: fmt.Sprintf("boot file %s: %v", p, err), fix: "fix kernel, initrd and rootfs in the config"}}
			}
		}
		return []finding{ok("image", "boot files from the config")}
	}
	for _, tiny := range []bool{false, true} {
		if d.cfg.Image == map[bool]string{false: "tiny", true: "debian"}[tiny] {
			continue
		}
		if img, err := image.Load(d.cfg.DataDir, tiny); err == nil {
			return []finding{ok("image", "guest image in %s", filepath.Dir(img.Kernel))}
		}
	}
	return []finding{{check: "image", status: statusWarn, msg: "no guest image is built in " + d.cfg.DataDir + ": creates fail until there is one",
		fix: "run `noid-server image build` (or `image build --tiny`) with this config"}}
}

// existing is path, or its nearest ancestor that exists.
func existing(path string) string {
	for {
		if _, err := os.Stat(path); err == nil || filepath.Dir(path) == path {
			return path
		}
		path = filepath.Dir(path)
	}
}

func (d *doctor) dataDir() []finding {
	dir := d.cfg.DataDir
	fi, err := os.Stat(dir)
	if errors.Is(err, fs.ErrNotExist) {
		parent := existing(dir)
		if unix.Access(parent, unix.W_OK) != nil {
			return []finding{{check: "data dir", status: statusFail, msg: fmt.Sprintf("%s does not exist and %s is not writable", dir, parent),
				fix: "create it: install -d -m 0700 " + dir}}
		}
		return []finding{ok("data dir", "%s does not exist yet; serve creates it (mode 0700)", dir)}
	}
	if err != nil {
		return []finding{{check: "data dir", status: statusFail, msg: err.Error(), fix: "check the path and its parents' permissions"}}
	}
	if !fi.IsDir() {
		return []finding{{check: "data dir", status: statusFail, msg: dir + " is not a directory", fix: "point data_dir at a directory"}}
	}
	mode := fi.Mode().Perm()
	st, _ := fi.Sys().(*syscall.Stat_t)
	switch {
	case mode&0o002 != 0:
		return []finding{{check: "data dir", status: statusFail, msg: fmt.Sprintf("%s is writable by everyone (mode %04o)", dir, mode),
			fix: "chmod 700 " + dir}}
	case st != nil && int(st.Uid) != d.euid():
		return []finding{{check: "data dir", status: statusFail, msg: fmt.Sprintf("%s belongs to uid %d, not to the server's (uid %d)", dir, st.Uid, d.euid()),
			fix: fmt.Sprintf("chown %d %s", d.euid(), dir)}}
	case mode&0o077 != 0:
		return []finding{{check: "data dir", status: statusWarn, msg: fmt.Sprintf("%s has mode %04o: other accounts can look at VM disks, memory and checkpoints", dir, mode),
			fix: "chmod 700 " + dir}}
	}
	return []finding{ok("data dir", "%s (mode %04o)", dir, mode)}
}

// The free space doctor asks for: below lowSpace it fails, below
// warnSpace or warnFraction of the filesystem it warns.
const (
	lowSpace     = 1 << 30
	warnSpace    = 10 << 30
	warnFraction = 0.10
)

func (d *doctor) freeSpace() []finding {
	var out []finding
	dirs := [][2]string{{"data dir", d.cfg.DataDir}}
	if d.cfg.StorageDir() != d.cfg.DataDir {
		dirs = append(dirs, [2]string{"storage", d.cfg.StorageDir()})
	}
	for _, dd := range dirs {
		check, dir := "disk", existing(dd[1])
		var st unix.Statfs_t
		if err := d.statfs(dir, &st); err != nil {
			out = append(out, finding{check: check, status: statusFail, msg: fmt.Sprintf("statfs %s: %v", dir, err)})
			continue
		}
		free, size := int64(st.Bavail)*st.Bsize, int64(st.Blocks)*st.Bsize
		f := ok(check, "%s: %s free of %s", dd[0], humanBytes(free), humanBytes(size))
		switch {
		case free < lowSpace:
			f.status, f.fix = statusFail, "free space on "+dir+": creates, checkpoints and golden snapshots fail when it is full (noid checkpoint rm, noid destroy)"
		case free < warnSpace || float64(free) < warnFraction*float64(size):
			f.status, f.fix = statusWarn, "free space on "+dir+", or move data_dir to a larger filesystem"
		}
		out = append(out, f)
	}
	return out
}

func humanBytes(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%d MiB", n>>20)
	}
	return fmt.Sprintf("%d bytes", n)
}

// storage reports what [storage] mode resolves to, as `noid-server
// storage` and the server's start-up do.
func (d *doctor) storage() []finding {
	if d.cfg.Storage.ReflinkImageSize != "" {
		if _, err := os.Stat(d.cfg.Storage.ReflinkImage); err != nil {
			if _, err := d.lookPath("mkfs.xfs"); err != nil {
				return []finding{{check: "storage", status: statusFail, msg: "[storage] reflink_image_size is set but mkfs.xfs is missing to create " + d.cfg.Storage.ReflinkImage,
					fix: "apt-get install xfsprogs"}}
			}
		}
	}
	dec, err := decideStorage(d.cfg)
	switch {
	case err != nil && d.cfg.Storage.Mode == storage.SettingReflink:
		return []finding{{check: "storage", status: statusFail, msg: err.Error(), fix: errdefs.HintOf(err)}}
	case err != nil:
		return []finding{{check: "storage", status: statusWarn, msg: fmt.Sprintf("%v; the server makes sparse copies", err)}}
	}
	return []finding{ok("storage", "mode %s resolves to %s: %s", dec.Setting, dec.Resolved(), dec)}
}

func (d *doctor) loop() []finding {
	_, err := os.Stat(d.loopControl)
	switch {
	case err == nil:
		return []finding{ok("loop", "%s is there", d.loopControl)}
	case d.cfg.Storage.ReflinkImageSize != "":
		return []finding{{check: "loop", status: statusFail, msg: fmt.Sprintf("%s: %v; [storage] reflink_image_size needs a loop device", d.loopControl, err),
			fix: "modprobe loop (and give a container access to the loop devices), or unset reflink_image_size"}}
	}
	return []finding{{check: "loop", status: statusWarn, msg: fmt.Sprintf("%s: %v; needed only for [storage] reflink_image_size", d.loopControl, err), fix: "modprobe loop"}}
}

func (d *doctor) cgroupsCheck() []finding {
	if !d.cfg.CgroupsEnabled() {
		return []finding{ok("cgroups", "off in the config ([sandbox] cgroups = false)")}
	}
	l, err := d.cgroups()
	if err != nil {
		return []finding{{check: "cgroups", status: statusWarn, msg: fmt.Sprintf("VMMs will run without memory and pids limits: %v", err),
			fix: "mount cgroup v2 with the memory and pids controllers enabled (or v1 memory and pids hierarchies); under systemd point [sandbox] cgroup_parent inside a delegated subtree"}}
	}
	return []finding{ok("cgroups", "%s", l)}
}

func (d *doctor) network() []finding {
	if !d.cfg.NetworkEnabled() {
		return []finding{ok("network", "off in the config ([network] enabled = false): VMs get no NIC")}
	}
	var out []finding
	if err := d.nftables(); err != nil {
		out = append(out, finding{check: "nftables", status: statusFail, msg: fmt.Sprintf("nftables does not answer: %v", err),
			fix: "run as root on a kernel with nf_tables (modprobe nf_tables), or set [network] enabled = false"})
	} else {
		out = append(out, ok("nftables", "nf_tables answers"))
	}
	br := d.cfg.Network.Bridge
	ifi, isBridge, err := d.link(br)
	switch {
	case err != nil:
		out = append(out, ok("bridge", "%s does not exist yet; serve creates it", br))
	case !isBridge:
		out = append(out, finding{check: "bridge", status: statusFail, msg: fmt.Sprintf("%s exists and is not a bridge", br),
			fix: "set [network] bridge to another name, or remove that interface"})
	default:
		out = append(out, ok("bridge", "%s (index %d)", br, ifi.Index))
	}
	return out
}

func (d *doctor) server() []finding {
	h, err := lockfile.ReadHolder(filepath.Join(d.cfg.DataDir, lockFileName))
	if err == nil && h.Alive() && strings.HasPrefix(h.Note, noteServe) {
		return []finding{ok("server", "noid-server pid %d serves this data dir", h.PID)}
	}
	return []finding{ok("server", "no noid-server serves this data dir now")}
}
