package manager

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/noid-vm/noid/internal/procfs"
	"github.com/noid-vm/noid/internal/store"
	"github.com/noid-vm/noid/internal/vmm"
)

// adopt re-attaches to a VM's VMM process: by the pid in the DB, or by the
// pid file the backend wrote at spawn (a crash may have come between the
// spawn and the DB update).
func (m *Manager) adopt(ctx context.Context, v *store.VM) (vmm.Instance, error) {
	inst, err := m.backend.Adopt(ctx, m.spec(v), v.PID)
	if err == nil || !errors.Is(err, vmm.ErrGone) {
		return inst, err
	}
	for _, name := range []string{"qemu.pid", "firecracker.pid"} {
		b, rerr := os.ReadFile(filepath.Join(m.vmDir(v), name))
		if rerr != nil {
			continue
		}
		var pid int
		if _, serr := fmt.Sscanf(strings.TrimSpace(string(b)), "%d", &pid); serr == nil && pid > 0 && pid != v.PID {
			if inst, err2 := m.backend.Adopt(ctx, m.spec(v), pid); err2 == nil {
				v.PID = pid
				return inst, nil
			}
		}
	}
	return nil, err
}

// recover reconciles the DB with the processes and disk after a start-up:
// running VMs are re-adopted, vanished ones are marked dead, half-created
// VMs and half-written checkpoints are removed.
func (m *Manager) recover(ctx context.Context) error {
	vms, err := m.store.ListVMs(ctx, -1)
	if err != nil {
		return fmt.Errorf("listing vms: %w", err)
	}
	for _, v := range vms {
		log := m.log.With("vm", v.Name, "vm_id", v.ID, "user_id", v.UserID)
		switch v.State {
		case store.StateCreating:
			// The create never returned success; finish it off.
			log.Warn("removing vm left half-created by a crash")
			rt := m.rt(v.ID)
			if inst, err := m.adopt(ctx, v); err == nil {
				rt.setInstance(inst)
			}
			m.destroyVM(ctx, v)
			continue
		case store.StateDestroying:
			log.Warn("finishing a destroy interrupted by a crash")
			rt := m.rt(v.ID)
			if inst, err := m.adopt(ctx, v); err == nil {
				rt.setInstance(inst)
			}
			m.destroyVM(ctx, v)
			continue
		case store.StateRunning, store.StateRestoring:
			m.finishSpareMove(v)
			inst, err := m.adopt(ctx, v)
			if err != nil {
				reason := "vmm process exited while the server was down"
				if v.State == store.StateRestoring {
					reason = "server stopped during a restore; restore again or destroy"
				}
				if !errors.Is(err, vmm.ErrGone) {
					reason = "could not re-adopt vmm process: " + err.Error()
				} else {
					// Its VMM died while no server watched it.
					m.releaseSandbox(ctx, v.Runtime())
				}
				log.Warn("vm is dead", "reason", reason)
				m.store.SetVMState(ctx, v.ID, store.StateDead, reason, 0)
				continue
			}
			rt := m.rt(v.ID)
			rt.setInstance(inst)
			if v.State == store.StateRestoring {
				// The new VMM got its state and runs (the backend resumed it).
				m.store.SetVMState(ctx, v.ID, store.StateRunning, "", v.PID)
			} else if pid := inst.Pid(); pid != v.PID {
				m.store.SetVMState(ctx, v.ID, v.State, v.StateReason, pid)
			}
			log.Info("re-adopted vm", "pid", v.PID)
		case store.StateDead:
			m.rt(v.ID)
		}
	}
	// Remove checkpoint directories that never completed, and directories
	// without a DB row (a crash between rename and insert).
	users, err := os.ReadDir(filepath.Join(m.cfg.StorageDir(), "users"))
	if err == nil {
		for _, u := range users {
			m.sweepCheckpoints(ctx, filepath.Join(m.cfg.StorageDir(), "users", u.Name(), "checkpoints"))
			m.sweepVMDirs(ctx, filepath.Join(m.cfg.StorageDir(), "users", u.Name(), "vms"))
			m.sweepTmp(filepath.Join(m.cfg.StorageDir(), "users", u.Name(), "golden"))
		}
	}
	m.sweepTmp(m.systemGoldenRoot())
	m.sweepBases()
	return nil
}

func (m *Manager) sweepCheckpoints(ctx context.Context, dir string) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	cps, err := m.store.ListCheckpoints(ctx, -1, "")
	if err != nil {
		return
	}
	known := map[string]bool{}
	for _, c := range cps {
		known[c.ID] = true
	}
	for _, e := range ents {
		if known[e.Name()] {
			continue
		}
		m.log.Warn("removing incomplete or orphaned checkpoint directory", "dir", filepath.Join(dir, e.Name()))
		os.RemoveAll(filepath.Join(dir, e.Name()))
	}
}

// sweepTmp removes unfinished ".tmp-*" directories (golden promotions).
func (m *Manager) sweepTmp(dir string) {
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), ".tmp-") {
			m.log.Warn("removing unfinished directory", "dir", filepath.Join(dir, e.Name()))
			os.RemoveAll(filepath.Join(dir, e.Name()))
		}
	}
}

func (m *Manager) sweepVMDirs(ctx context.Context, dir string) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	for _, e := range ents {
		id := strings.TrimPrefix(e.Name(), ".tmp-")
		if _, err := m.store.GetVMByID(ctx, id); err == nil && id == e.Name() {
			// Files a rewind into a warm spare moved aside and did not
			// get to remove.
			old, _ := filepath.Glob(filepath.Join(dir, id, rewoundPrefix+"*"))
			for _, o := range old {
				os.RemoveAll(o)
			}
			continue
		}
		m.log.Warn("removing orphaned vm directory", "dir", filepath.Join(dir, e.Name()))
		os.RemoveAll(filepath.Join(dir, e.Name()))
	}
}

// sweepOrphanVMMs kills the VMM processes of this storage root that no VM
// in the store owns, and frees their sandbox. A server killed between
// starting a VMM and recording it (a cold restore's new process, a spare
// whose files had already left the pool directory) leaves one: it runs
// under its own runtime id, which no row names. A VMM is this root's when
// its command line names a path in a VM's or a spare's directory under the
// root (its files, the inert object naming its directory, its console log)
// and its process name is noid-<id>. Only one server runs per data dir
// (the data dir lock), so none of these can be another server's, and a
// server elsewhere that boots a kernel from this data dir's images does
// not match. It runs at start-up, after recovery adopted every VM and
// before any spare starts.
func (m *Manager) sweepOrphanVMMs(ctx context.Context) {
	vms, err := m.store.ListVMs(ctx, -1)
	if err != nil {
		return
	}
	owned := map[string]bool{}
	for _, v := range vms {
		// Only a VM that recovery left running owns a VMM. One it marked
		// dead (its VMM could not be adopted, say after a server killed in
		// a rewind) owns none: a VMM still carrying its id is a leftover.
		if v.State != store.StateRunning && v.State != store.StateRestoring {
			continue
		}
		owned[v.Runtime()] = true
		owned[v.ID] = true
	}
	root := filepath.Clean(m.cfg.StorageDir())
	vmsDir, poolDir := []byte(root+"/users/"), []byte(root+"/pool/")
	procs, _ := os.ReadDir("/proc")
	for _, p := range procs {
		pid, err := strconv.Atoi(p.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		cmd, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if err != nil || !(bytes.Contains(cmd, vmsDir) || bytes.Contains(cmd, poolDir)) {
			continue
		}
		id := vmmProcessID(cmd)
		if id == "" || owned[id] {
			continue
		}
		m.log.Warn("killing a vmm no vm owns (left by a server that stopped before recording it)", "runtime_id", id, "pid", pid)
		syscall.Kill(pid, syscall.SIGKILL)
		waitExit(pid, 5*time.Second)
		m.freeRuntime(ctx, id)
		owned[id] = true // freed
	}
	// A VMM the last server was still starting has no QEMU command line
	// yet: between fork and exec (which includes creating its network
	// namespace) it shows the server's. It is already in its cgroup,
	// though, and holds its uid lease, both named by its runtime id, and
	// the leases are this data dir's own. Removing the cgroup of a lease
	// no VM owns kills what is in it, at whatever stage it is.
	if m.uids == nil {
		return
	}
	for _, l := range m.uids.Leases() {
		if owned[l.ID] {
			continue
		}
		m.log.Warn("freeing the sandbox of a vmm no vm owns (left by a server that stopped while starting it)", "runtime_id", l.ID, "uid", l.UID)
		m.freeRuntime(ctx, l.ID)
	}
}

// freeRuntime frees what an orphaned VMM runtime held: its sandbox (the
// cgroup, killing what is left in it, and the uid lease) and its network.
func (m *Manager) freeRuntime(ctx context.Context, id string) {
	m.releaseSandbox(ctx, id)
	if m.net != nil {
		m.net.RemoveVM(ctx, id)
	}
}

// vmmProcessID returns the runtime id in a VMM's command line (argv
// separated by NULs): the value of -name noid-<id>[,...], or "".
func vmmProcessID(cmdline []byte) string {
	args := bytes.Split(cmdline, []byte{0})
	for i := 0; i+1 < len(args); i++ {
		if string(args[i]) != "-name" {
			continue
		}
		v, ok := bytes.CutPrefix(args[i+1], []byte("noid-"))
		if !ok {
			return ""
		}
		if j := bytes.IndexByte(v, ','); j >= 0 {
			v = v[:j]
		}
		return string(v)
	}
	return ""
}

// waitExit waits up to d for pid to be gone (or a zombie).
func waitExit(pid int, d time.Duration) {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if procfs.Exited(pid) {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}
