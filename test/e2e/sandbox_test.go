//go:build e2e

package e2e

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/noid-vm/noid/client"
)

// vmmStatus returns the fields of /proc/<pid>/status of a VMM.
func vmmStatus(t *testing.T, pid int) map[string]string {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		t.Fatalf("vmm pid %d: %v", pid, err)
	}
	m := map[string]string{}
	for _, line := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok {
			m[k] = strings.Join(strings.Fields(v), " ")
		}
	}
	return m
}

// vmmUID returns the real uid of a VMM process and checks that all four
// uids (real, effective, saved, fs) and gids agree.
func vmmUID(t *testing.T, pid int) uint32 {
	t.Helper()
	st := vmmStatus(t, pid)
	uids, gids := strings.Fields(st["Uid"]), strings.Fields(st["Gid"])
	if len(uids) != 4 || len(gids) != 4 {
		t.Fatalf("pid %d: Uid %q Gid %q", pid, st["Uid"], st["Gid"])
	}
	for i := range uids {
		if uids[i] != uids[0] || gids[i] != uids[0] {
			t.Errorf("pid %d: Uid %q Gid %q, want one number everywhere", pid, st["Uid"], st["Gid"])
		}
	}
	if st["Seccomp"] != "2" {
		t.Errorf("pid %d: Seccomp %q, want 2 (filter)", pid, st["Seccomp"])
	}
	n, _ := strconv.ParseUint(uids[0], 10, 32)
	return uint32(n)
}

// cgroupLimit reads a limit file of the VMM cgroup noid/<id> in the v1
// hierarchy mounted at /sys/fs/cgroup/<ctrl> (or the v2 root).
func cgroupFile(t *testing.T, ctrl, id, file string) string {
	t.Helper()
	for _, dir := range []string{filepath.Join("/sys/fs/cgroup", ctrl, "noid", id), filepath.Join("/sys/fs/cgroup/noid", id)} {
		if b, err := os.ReadFile(filepath.Join(dir, file)); err == nil {
			return strings.TrimSpace(string(b))
		}
	}
	t.Fatalf("no %s for cgroup noid/%s", file, id)
	return ""
}

// vmDisk finds the writable top of a VM's disk under the server's data
// dir: the last image of its chain.
func (e *Env) vmDisk(t *testing.T, id string) string {
	t.Helper()
	m, _ := filepath.Glob(filepath.Join(e.Dir, "data", "users", "*", "vms", id, "disk-*"))
	if len(m) < 2 {
		t.Fatalf("disk chain of vm %s: %v", id, m)
	}
	sort.Strings(m)
	return m[len(m)-1]
}

// TestSandbox runs noid-server with the default [sandbox] settings and
// checks every QEMU it starts (boot, rewind, clone): its own unprivileged
// uid, seccomp, its cgroup with the memory and pids limits, no access to
// another VM's disk, and the cgroup gone after destroy.
func TestSandbox(t *testing.T) {
	e := NewEnv(t, WithSocketGroup(t))
	if !strings.Contains(e.Log(), "each VMM runs as a uid of its own") || !strings.Contains(e.Log(), "each VMM gets a cgroup") {
		t.Fatalf("the server did not turn the sandbox on:\n%s", e.Log())
	}
	a := e.Create("sba")
	b := e.Create("sbb")
	ua, ub := vmmUID(t, a.PID), vmmUID(t, b.PID)
	if ua < 2_000_000_000 || ub < 2_000_000_000 || ua == ub {
		t.Fatalf("vmm uids %d and %d: want two distinct uids from the sandbox range", ua, ub)
	}

	t.Run("cgroup limits", func(t *testing.T) {
		cg, err := os.ReadFile("/proc/" + strconv.Itoa(a.PID) + "/cgroup")
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Contains(cg, []byte("memory:/noid/"+a.ID+"\n")) && !bytes.Contains(cg, []byte("0::/noid/"+a.ID+"\n")) {
			t.Errorf("vmm of a is not in cgroup noid/%s:\n%s", a.ID, cg)
		}
		want := strconv.Itoa(a.MemoryMiB<<20 + 384<<20)
		if got := cgroupFile(t, "memory", a.ID, "memory.limit_in_bytes"); got != want {
			t.Errorf("memory limit %s, want %s (guest RAM + 384 MiB)", got, want)
		}
		if got := cgroupFile(t, "pids", a.ID, "pids.max"); got != strconv.Itoa(128+a.VCPUs) {
			t.Errorf("pids.max %s, want %d", got, 128+a.VCPUs)
		}
	})

	t.Run("no access to another vm's disk", func(t *testing.T) {
		disk := e.vmDisk(t, b.ID)
		var st syscall.Stat_t
		if err := syscall.Stat(disk, &st); err != nil {
			t.Fatal(err)
		}
		if st.Uid != ub || st.Mode&0o777 != 0o600 {
			t.Errorf("b's disk: owner %d mode %o, want %d 0600", st.Uid, st.Mode&0o777, ub)
		}
		cmd := exec.Command("cat", disk)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: ua, Gid: ua}}
		out, err := cmd.CombinedOutput()
		if err == nil || !strings.Contains(string(out), "Permission denied") {
			t.Errorf("a's uid reading b's disk: err %v, %q", err, out)
		}
	})

	t.Run("checkpoint restore clone", func(t *testing.T) {
		e.MustExec("sba", "sh", "-c", "echo one > /root/mark && sync")
		if _, err := e.Client.Checkpoint(ctx(t), "sba", client.CheckpointRequest{Name: "c1"}); err != nil {
			t.Fatal(err)
		}
		e.MustExec("sba", "sh", "-c", "echo two > /root/mark")
		r, err := e.Client.Restore(ctx(t), "sba", "c1")
		if err != nil {
			t.Fatal(err)
		}
		if out := e.MustExec("sba", "cat", "/root/mark"); out != "one\n" {
			t.Errorf("after rewind: %q", out)
		}
		if u := vmmUID(t, r.PID); u < 2_000_000_000 {
			t.Errorf("rewound vmm runs as %d", u)
		}
		c, err := e.Client.Clone(ctx(t), "sba", "c1", "sbc")
		if err != nil {
			t.Fatal(err)
		}
		if out := e.MustExec("sbc", "cat", "/root/mark"); out != "one\n" {
			t.Errorf("in the clone: %q", out)
		}
		uc := vmmUID(t, c.PID)
		if uc < 2_000_000_000 || uc == vmmUID(t, r.PID) || uc == ub {
			t.Errorf("clone's vmm uid %d (a %d, b %d): want its own", uc, vmmUID(t, r.PID), ub)
		}
	})

	t.Run("vmm uids may not use the api", func(t *testing.T) {
		// Let other uids reach the socket (the test's dir is 0700).
		if err := os.Chmod(e.Dir, 0o711); err != nil {
			t.Fatal(err)
		}
		// The socket is root's and its group's: a VMM uid cannot connect.
		if out, err := e.curlAs(t, ua, nil, "/v1/whoami"); err == nil {
			t.Errorf("the vmm uid %d connected to the socket: %s", ua, out)
		}
		// Control: an ordinary local account that the admin let in (it
		// joins the socket's group, which its next login carries).
		if r := e.ServerCLI("add-user", "--local", "nobody"); r.Code != 0 {
			t.Fatalf("add-user --local nobody: %d %s%s", r.Code, r.Stdout, r.Stderr)
		}
		if out, err := e.curlAs(t, 65534, loginGroups(t, "nobody"), "/v1/whoami"); err != nil || !strings.Contains(out, `"user"`) || strings.Contains(out, "unauthenticated") {
			t.Errorf("whoami as nobody after add-user --local: %v %s", err, out)
		}
		// A VMM uid given the socket's group (by mistake) is still refused.
		if out, _ := e.curlAs(t, ua, []uint32{socketGID(t, e)}, "/v1/whoami"); !strings.Contains(out, "unauthenticated") || !strings.Contains(out, "sandbox") {
			t.Errorf("whoami as the vmm uid %d in the socket's group: %s", ua, out)
		}
	})

	t.Run("destroy removes the cgroup", func(t *testing.T) {
		if _, err := e.Client.DestroyVM(ctx(t), "sbb"); err != nil {
			t.Fatal(err)
		}
		for _, d := range []string{"/sys/fs/cgroup/memory/noid/" + b.ID, "/sys/fs/cgroup/pids/noid/" + b.ID, "/sys/fs/cgroup/noid/" + b.ID} {
			if _, err := os.Stat(d); err == nil {
				t.Errorf("%s left after destroy", d)
			}
		}
	})
}
