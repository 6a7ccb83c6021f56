package manager

import (
	"context"
	"fmt"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/noid-vm/noid/internal/config"
	"github.com/noid-vm/noid/internal/errdefs"
	"github.com/noid-vm/noid/internal/sandbox"
	"github.com/noid-vm/noid/internal/store"
	"github.com/noid-vm/noid/internal/vmm"
	"github.com/noid-vm/noid/internal/vmm/qemu"
)

// sandboxState is what the server decided at start-up about confining VMM
// processes ([sandbox] in the config, and what the host allows).
type sandboxState struct {
	// uid and gid are the shared VMM user of `user = "<name>"` (0: none).
	uid, gid int
	// perVM is set when each VMM gets a uid of its own from the pool.
	perVM bool
	// cgroupParent is the parent of VMM cgroups ("" when cgroups are off).
	cgroupParent string
	// cgroups manages the VMM cgroups (nil when cgroups are off).
	cgroups *sandbox.Manager
	// refused, when set, is why no VMM may start: confinement that
	// [sandbox] asks for is impossible here and [sandbox] require is on.
	refused error
}

// qemuOptions builds the QEMU backend's options from the config: the uid
// pool and the cgroup manager, each only where the host allows it (root,
// a data dir that supports chown, mounted memory and pids controllers).
// What cannot be had is logged; with [sandbox] require (the default) it is
// also recorded in m.sandbox.refused, and no VMM may start (see
// refusingBackend), else VMMs run without it.
func (m *Manager) qemuOptions(ctx context.Context) qemu.Options {
	var missing []string
	defer func() {
		if len(missing) > 0 && m.cfg.SandboxRequired() {
			m.sandbox.refused = errdefs.WithHint(fmt.Errorf("%w: VMMs cannot be confined as [sandbox] asks: %s; no VMM is started",
				errdefs.ErrUnavailable, strings.Join(missing, "; ")),
				"fix that (see the server log), or set [sandbox] require = false to run VMMs without it")
			m.log.Error("sandbox: refusing to start VMMs; VMs already running are kept, and can be listed and destroyed", "err", m.sandbox.refused)
		}
	}()
	opts := qemu.Options{Binary: m.cfg.QEMUBinary, Logger: m.log}
	sb := m.cfg.Sandbox
	if sb.MemoryOverhead != "" {
		opts.MemoryOverhead, _ = config.ParseSize(sb.MemoryOverhead)
	}
	opts.PidsLimit = sb.PidsMax
	if os.Geteuid() != 0 {
		m.log.Warn("noid-server is not root: VMMs run as its own user, without cgroups of their own")
		return opts
	}
	switch u := m.cfg.SandboxUser(); u {
	case "root":
		m.log.Warn("sandbox: VMMs run as root ([sandbox] user = \"root\")")
	case "auto":
		pool, err := m.openUIDPool()
		if err != nil {
			missing = append(missing, fmt.Sprintf("per-VM uids are not possible here: %v", err))
			m.log.Warn("sandbox: per-VM uids are not possible here", "err", err, "require", m.cfg.SandboxRequired())
			break
		}
		opts.UIDs = pool
		m.uids = pool
		m.sandbox.perVM = true
		m.log.Info("sandbox: each VMM runs as a uid of its own", "uid_base", sb.UIDBase, "uid_count", sb.UIDCount)
	default:
		uid, gid, err := lookupUser(u)
		if err != nil {
			missing = append(missing, fmt.Sprintf("[sandbox] user %q: %v", u, err))
			m.log.Warn("sandbox: [sandbox] user not found", "user", u, "err", err, "require", m.cfg.SandboxRequired())
			break
		}
		m.sandbox.uid, m.sandbox.gid = uid, gid
		m.log.Warn("sandbox: every VMM runs as one shared user; VMMs of one uid can reach each other (use user = \"auto\" for a uid per VM)", "user", u, "uid", uid)
	}
	if m.cfg.CgroupsEnabled() {
		l, err := sandbox.Detect(sandbox.DetectOptions{})
		var cg *sandbox.Manager
		if err == nil {
			cg, err = sandbox.NewManager(l, sb.CgroupParent)
		}
		if err != nil {
			missing = append(missing, fmt.Sprintf("cgroups are not possible here: %v", err))
			m.log.Warn("sandbox: VMMs cannot get cgroups of their own", "err", err, "require", m.cfg.SandboxRequired())
		} else {
			if n, err := cg.Prune(ctx, time.Minute); n > 0 || err != nil {
				m.log.Info("sandbox: removed cgroups of VMMs that are gone", "count", n, "err", err)
			}
			opts.Cgroups = cg
			m.sandbox.cgroups = cg
			m.sandbox.cgroupParent = cg.Parent()
			m.log.Info("sandbox: each VMM gets a cgroup with memory and pids limits", "cgroups", l.String(), "parent", cg.Parent())
		}
	}
	return opts
}

// openUIDPool opens the per-VM uid pool and checks that the storage dir
// lets files be given to those uids.
func (m *Manager) openUIDPool() (*sandbox.UIDPool, error) {
	base, count := m.cfg.Sandbox.UIDBase, m.cfg.Sandbox.UIDCount
	pool, err := sandbox.OpenUIDPool(filepath.Join(m.cfg.DataDir, "sandbox", "uids"), uint32(base), uint32(count))
	if err != nil {
		return nil, err
	}
	f, err := os.CreateTemp(m.cfg.StorageDir(), ".chown-probe-")
	if err != nil {
		return nil, err
	}
	defer os.Remove(f.Name())
	defer f.Close()
	if err := f.Chown(int(base), int(base)); err != nil {
		return nil, fmt.Errorf("the storage dir %s does not let files be given to other uids: %w", m.cfg.StorageDir(), err)
	}
	return pool, nil
}

// lookupUser resolves a user name or numeric uid to a uid and gid.
func lookupUser(name string) (int, int, error) {
	if n, err := strconv.Atoi(name); err == nil {
		if n <= 0 {
			return 0, 0, fmt.Errorf("uid %d is not an unprivileged uid", n)
		}
		if u, err := user.LookupId(name); err == nil {
			gid, _ := strconv.Atoi(u.Gid)
			return n, gid, nil
		}
		return n, n, nil
	}
	u, err := user.Lookup(name)
	if err != nil {
		return 0, 0, err
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	if uid == 0 {
		return 0, 0, fmt.Errorf("user %s is root", name)
	}
	return uid, gid, nil
}

// IsSandboxUID reports whether uid belongs to VMM processes. The API
// refuses such callers on the unix socket: a compromised VMM must not get
// an account of its own through peer credentials.
func (m *Manager) IsSandboxUID(uid int64) bool {
	if m.sandbox.uid != 0 && uid == int64(m.sandbox.uid) {
		return true
	}
	base, count := m.cfg.Sandbox.UIDBase, m.cfg.Sandbox.UIDCount
	return m.sandbox.perVM && uid >= base && uid < base+count
}

// sandboxSpec is the confinement of v's VMM, or nil when there is none.
func (m *Manager) sandboxSpec(v *store.VM) *vmm.Sandbox {
	sb := &vmm.Sandbox{Seccomp: m.cfg.SeccompEnabled(), UID: m.sandbox.uid, GID: m.sandbox.gid}
	if m.sandbox.cgroupParent != "" {
		sb.CgroupPath = m.sandbox.cgroupParent + "/" + v.Runtime()
	}
	if !sb.Seccomp && sb.UID == 0 && sb.CgroupPath == "" && !m.sandbox.perVM {
		return nil
	}
	return sb
}

// refusingBackend is the backend while m.sandbox.refused is set: it adopts
// and drives the VMMs that already run (so they can be listed, used and
// destroyed) and refuses to start any: Check, and so every create, fails
// with the reason, and so do Boot and Restore.
type refusingBackend struct {
	vmm.Backend
	err error
}

// Check returns why no VMM may start.
func (b refusingBackend) Check(context.Context) error { return b.err }

// Boot refuses.
func (b refusingBackend) Boot(context.Context, vmm.Spec) (vmm.Instance, error) { return nil, b.err }

// Restore refuses.
func (b refusingBackend) Restore(context.Context, vmm.Spec, string, vmm.Copier) (vmm.Instance, vmm.Timings, error) {
	return nil, vmm.Timings{}, b.err
}

// refusingPreparer is a refusingBackend for a backend that can prepare
// VMMs: a rewind then fails while preparing, before it stops the VM.
type refusingPreparer struct{ refusingBackend }

// Prepare refuses.
func (b refusingPreparer) Prepare(context.Context, vmm.Spec) (vmm.Prepared, error) { return nil, b.err }

// refuseVMMs wraps b so that it starts no VMM, failing with err.
func refuseVMMs(b vmm.Backend, err error) vmm.Backend {
	if _, ok := b.(vmm.Preparer); ok {
		return refusingPreparer{refusingBackend{b, err}}
	}
	return refusingBackend{b, err}
}

// releaseSandbox removes the cgroup of the VMM runtime id (killing what is
// left in it) and releases its uid lease, for a VMM that has no instance
// to do it: one that died or was started by an earlier server and could
// not be re-adopted, or a spare an earlier server left. Both are no-ops
// when there is nothing.
func (m *Manager) releaseSandbox(ctx context.Context, id string) {
	if m.sandbox.cgroups != nil {
		if cg, err := m.sandbox.cgroups.Open(id); err == nil {
			if err := cg.Remove(ctx); err != nil {
				m.log.Warn("removing the cgroup of a vmm that is gone", "runtime_id", id, "err", err)
			}
		}
	}
	if m.uids != nil {
		if err := m.uids.Release(id); err != nil {
			m.log.Warn("releasing the uid of a vmm that is gone", "runtime_id", id, "err", err)
		}
	}
}
