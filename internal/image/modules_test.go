package image

import (
	"os"
	"path"
	"reflect"
	"strings"
	"testing"
)

// TestModuleOrderFromModinfo checks the load order computed from the real
// kernel package: every module comes after everything its .modinfo depends=
// names, and the orderings the guest relies on hold.
func TestModuleOrderFromModinfo(t *testing.T) {
	k := sharedKernel(t)
	pos := map[string]int{}
	deps := map[string][]string{}
	for i, rel := range k.Modules {
		data, err := os.ReadFile(k.hostPath(rel))
		if err != nil {
			t.Fatal(err)
		}
		m, err := newModInfo(rel, data)
		if err != nil {
			t.Fatal(err)
		}
		if _, dup := pos[m.Name]; dup {
			t.Errorf("%s listed twice", m.Name)
		}
		pos[m.Name] = i
		deps[m.Name] = m.Depends
	}
	t.Logf("load order: %s", strings.Join(k.Modules, " "))
	for _, w := range GuestModules {
		if _, ok := pos[w]; !ok {
			t.Errorf("wanted module %s not in the load order", w)
		}
	}
	for name, ds := range deps {
		for _, d := range ds {
			p, ok := pos[d]
			if !ok {
				t.Errorf("%s depends on %s, which is not loaded", name, d)
			} else if p > pos[name] {
				t.Errorf("%s (position %d) loads before its dependency %s (position %d)", name, pos[name], d, p)
			}
		}
	}
	// Real dependencies, from modinfo.
	for _, pair := range [][2]string{
		{"virtio", "virtio_mmio"}, {"virtio_ring", "virtio_mmio"},
		{"virtio", "virtio_blk"}, {"virtio_ring", "virtio_blk"},
		{"virtio", "virtio_console"}, {"virtio", "virtio_rng"},
		{"failover", "net_failover"}, {"net_failover", "virtio_net"}, {"virtio", "virtio_net"},
		{"vsock", "vmw_vsock_virtio_transport_common"},
		{"vmw_vsock_virtio_transport_common", "vmw_vsock_virtio_transport"},
	} {
		if !contains(deps[pair[1]], pair[0]) {
			t.Errorf("modinfo of %s does not list %s in depends= (kernel changed?)", pair[1], pair[0])
		}
		if pos[pair[0]] > pos[pair[1]] {
			t.Errorf("%s must load before %s", pair[0], pair[1])
		}
	}
	// virtio_ring and virtio do not depend on each other (modinfo says so);
	// they come out in GuestModules order, which is the order the design
	// notes recorded.
	if pos["virtio_ring"] > pos["virtio"] || pos["virtio"] > pos["virtio_mmio"] {
		t.Errorf("want virtio_ring < virtio < virtio_mmio, got %d %d %d", pos["virtio_ring"], pos["virtio"], pos["virtio_mmio"])
	}
	// The guest paths are absolute and under the right release.
	for _, p := range k.loadPaths() {
		if !strings.HasPrefix(p, "/lib/modules/"+k.Release+"/") || path.Ext(p) != ".ko" {
			t.Errorf("bad guest path %s", p)
		}
	}
}

func contains(ss []string, s string) bool {
	for _, x := range ss {
		if x == s {
			return true
		}
	}
	return false
}

func TestModuleLoadOrderSynthetic(t *testing.T) {
	mk := func(name string, deps ...string) *modInfo {
		return &modInfo{Name: name, Path: "kernel/" + name + ".ko", Depends: deps}
	}
	names := func(ms []*modInfo) []string {
		var out []string
		for _, m := range ms {
			out = append(out, m.Name)
		}
		return out
	}
	avail := map[string]*modInfo{
		"a": mk("a", "b", "c"), "b": mk("b", "c"), "c": mk("c"),
		"d": mk("d", "builtin_x"), "e": mk("e"),
	}
	avail["e"].SoftPre = []string{"c", "missing_soft"}
	got, err := moduleLoadOrder([]string{"a", "d", "e", "builtin_y"}, avail, map[string]bool{"builtin_x": true, "builtin_y": true})
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"c", "b", "a", "d", "e"}; !reflect.DeepEqual(names(got), want) {
		t.Errorf("order %v, want %v", names(got), want)
	}
	// Names are canonicalised: virtio-rng and virtio_rng are one module.
	avail["virtio_rng"] = mk("virtio_rng", "c")
	got, err = moduleLoadOrder([]string{"virtio-rng"}, avail, nil)
	if err != nil || !reflect.DeepEqual(names(got), []string{"c", "virtio_rng"}) {
		t.Errorf("virtio-rng: %v %v", names(got), err)
	}
	// Missing hard dependency.
	avail["f"] = mk("f", "nope")
	if _, err := moduleLoadOrder([]string{"f"}, avail, nil); err == nil || !strings.Contains(err.Error(), "nope") {
		t.Errorf("missing dependency: err = %v", err)
	}
	// Cycle.
	avail["x"] = mk("x", "y")
	avail["y"] = mk("y", "x")
	if _, err := moduleLoadOrder([]string{"x"}, avail, nil); err == nil || !strings.Contains(err.Error(), "cycle") {
		t.Errorf("cycle: err = %v", err)
	}
	// A soft-dependency cycle is not an error.
	avail["s1"] = mk("s1")
	avail["s1"].SoftPre = []string{"s2"}
	avail["s2"] = mk("s2")
	avail["s2"].SoftPre = []string{"s1"}
	if got, err := moduleLoadOrder([]string{"s1"}, avail, nil); err != nil || len(got) != 2 {
		t.Errorf("soft cycle: %v %v", names(got), err)
	}
}

func TestNewModInfoReal(t *testing.T) {
	k := sharedKernel(t)
	for _, rel := range k.Modules {
		if !strings.HasSuffix(rel, "/virtio_mmio.ko") {
			continue
		}
		data, err := os.ReadFile(k.hostPath(rel))
		if err != nil {
			t.Fatal(err)
		}
		m, err := newModInfo(rel, data)
		if err != nil {
			t.Fatal(err)
		}
		if m.Name != "virtio_mmio" || !contains(m.Depends, "virtio") || !contains(m.Depends, "virtio_ring") {
			t.Errorf("virtio_mmio modinfo: %+v", m)
		}
		info, _ := parseModinfo(data)
		if info["vermagic"] == "" || !strings.HasPrefix(info["vermagic"], k.Release+" ") {
			t.Errorf("vermagic %q does not start with the release %s", info["vermagic"], k.Release)
		}
		return
	}
	t.Fatal("virtio_mmio.ko not among the unpacked modules")
}

func TestParseModinfoRejectsNonModules(t *testing.T) {
	if _, err := parseModinfo([]byte("not an elf")); err == nil {
		t.Error("garbage accepted")
	}
	self, err := os.ReadFile("/proc/self/exe")
	if err != nil {
		t.Skip(err)
	}
	if _, err := parseModinfo(self); err == nil {
		t.Error("an ELF without .modinfo accepted")
	}
}
