package config

import (
	"strings"
	"testing"
)

func TestSandboxSection(t *testing.T) {
	c, err := Parse(nil)
	if err != nil {
		t.Fatal(err)
	}
	if c.SandboxUser() != "auto" || c.Sandbox.UIDBase != DefaultUIDBase || c.Sandbox.UIDCount != DefaultUIDCount || !c.SeccompEnabled() || !c.CgroupsEnabled() {
		t.Errorf("defaults: %+v user %q", c.Sandbox, c.SandboxUser())
	}
	c, err = Parse([]byte("[sandbox]\nuser = \"qemu\"\nuid_base = 100000\ncgroup_parent = \"machine.slice/noid\"\nmemory_overhead = \"1G\"\npids_max = 300\n"))
	if err != nil {
		t.Fatal(err)
	}
	if c.SandboxUser() != "qemu" || c.Sandbox.UIDBase != 100000 || c.Sandbox.UIDCount != DefaultUIDCount || c.Sandbox.PidsMax != 300 {
		t.Errorf("parsed %+v", c.Sandbox)
	}
	for _, bad := range []string{
		"uid_base = -1", "uid_count = -5", "uid_base = 4294967290", "uid_count = 4294967296",
		"cgroup_parent = \"../x\"", "cgroup_parent = \"a//b\"", "cgroup_parent = \"cgroup.procs\"", "cgroup_parent = \"a b\"",
		"memory_overhead = \"lots\"", "pids_max = -1", "user = \"a:b\"",
	} {
		if _, err := Parse([]byte("[sandbox]\n" + bad + "\n")); err == nil || !strings.Contains(err.Error(), "sandbox") {
			t.Errorf("%s: err = %v", bad, err)
		}
	}
}
