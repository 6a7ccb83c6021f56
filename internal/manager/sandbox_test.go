package manager

import (
	"testing"

	"github.com/noid-vm/noid/internal/config"
	"github.com/noid-vm/noid/internal/store"
)

func TestSandboxSpecAndUIDs(t *testing.T) {
	cfg := config.Default()
	s := &Manager{cfg: cfg, sandbox: sandboxState{perVM: true, cgroupParent: "noid"}}
	base := cfg.Sandbox.UIDBase
	for uid, want := range map[int64]bool{0: false, 1000: false, base - 1: false, base: true, base + cfg.Sandbox.UIDCount - 1: true, base + cfg.Sandbox.UIDCount: false} {
		if got := s.IsSandboxUID(uid); got != want {
			t.Errorf("isSandboxUID(%d) = %v", uid, got)
		}
	}
	sb := s.sandboxSpec(&store.VM{ID: "abc"})
	if sb == nil || !sb.Seccomp || sb.UID != 0 || sb.CgroupPath != "noid/abc" {
		t.Errorf("sandboxSpec = %+v", sb)
	}
	// A shared user: its uid is the VMMs' and is refused on the socket.
	s.sandbox = sandboxState{uid: 977, gid: 978}
	if sb := s.sandboxSpec(&store.VM{ID: "abc"}); sb == nil || sb.UID != 977 || sb.GID != 978 || sb.CgroupPath != "" {
		t.Errorf("sandboxSpec with a shared user = %+v", sb)
	}
	if !s.IsSandboxUID(977) || s.IsSandboxUID(base) {
		t.Error("shared-user uid check")
	}
	// Nothing on: no sandbox at all.
	off := false
	cfg.Sandbox.Seccomp = &off
	s.sandbox = sandboxState{}
	if sb := s.sandboxSpec(&store.VM{ID: "abc"}); sb != nil {
		t.Errorf("sandboxSpec with everything off = %+v", sb)
	}
}

func TestLookupUser(t *testing.T) {
	if _, _, err := lookupUser("root"); err == nil {
		t.Error("root accepted as the sandbox user")
	}
	if _, _, err := lookupUser("0"); err == nil {
		t.Error("uid 0 accepted")
	}
	if uid, gid, err := lookupUser("4321"); err != nil || uid != 4321 || gid == 0 {
		t.Errorf("lookupUser(4321) = %d %d %v", uid, gid, err)
	}
	if _, _, err := lookupUser("no-such-user-xyz"); err == nil {
		t.Error("unknown user accepted")
	}
}
