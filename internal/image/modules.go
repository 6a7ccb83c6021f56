package image

import (
	"bytes"
	"debug/elf"
	"errors"
	"fmt"
	"path"
	"strings"
)

// GuestModules lists the kernel modules the guest needs, by module name. The
// initramfs carries these and everything they depend on (from each module's
// .modinfo depends=), in load order. The vsock modules are for the
// Firecracker backend; on QEMU they load but find no device.
var GuestModules = []string{
	"virtio_ring", "virtio", "virtio_mmio",
	"virtio_blk", "virtio_console", "virtio_rng",
	"failover", "net_failover", "virtio_net",
	"vsock", "vmw_vsock_virtio_transport_common", "vmw_vsock_virtio_transport",
}

// modInfo is what noid needs to know about one kernel module.
type modInfo struct {
	Name    string   // canonical module name (name= in .modinfo, '-' mapped to '_')
	Path    string   // path relative to /lib/modules/<release>/, always uncompressed (.ko)
	Depends []string // hard dependencies (depends=)
	SoftPre []string // softdep pre: modules (loaded first when present)
	Data    []byte   // the uncompressed .ko
}

// modName canonicalises a module name the way the kernel does: '-' and '_'
// are equivalent, the kernel uses '_'.
func modName(s string) string {
	s = path.Base(s)
	for _, suf := range []string{".xz", ".zst", ".gz"} {
		s = strings.TrimSuffix(s, suf)
	}
	s = strings.TrimSuffix(s, ".ko")
	return strings.ReplaceAll(s, "-", "_")
}

// parseModinfo reads the .modinfo section of a kernel module (an ELF
// relocatable object) and returns its key=value pairs. Repeated keys (alias=,
// softdep=) are joined with '\n'.
func parseModinfo(ko []byte) (map[string]string, error) {
	f, err := elf.NewFile(bytes.NewReader(ko))
	if err != nil {
		return nil, fmt.Errorf("parse module ELF: %w", err)
	}
	defer f.Close()
	sec := f.Section(".modinfo")
	if sec == nil {
		return nil, errors.New("module has no .modinfo section")
	}
	data, err := sec.Data()
	if err != nil {
		return nil, fmt.Errorf("read .modinfo: %w", err)
	}
	info := map[string]string{}
	for _, kv := range bytes.Split(data, []byte{0}) {
		k, v, ok := strings.Cut(string(kv), "=")
		if !ok || k == "" {
			continue
		}
		if old, dup := info[k]; dup {
			info[k] = old + "\n" + v
		} else {
			info[k] = v
		}
	}
	return info, nil
}

// newModInfo builds a modInfo for the uncompressed module ko found at relPath
// (relative to /lib/modules/<release>/).
func newModInfo(relPath string, ko []byte) (*modInfo, error) {
	info, err := parseModinfo(ko)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", relPath, err)
	}
	m := &modInfo{Name: modName(relPath), Path: relPath, Data: ko}
	if n := info["name"]; n != "" {
		m.Name = modName(n)
	}
	for _, d := range strings.Split(info["depends"], ",") {
		if d = strings.TrimSpace(d); d != "" {
			m.Depends = append(m.Depends, modName(d))
		}
	}
	// softdep=pre: a b post: c   (one or more lines)
	for _, line := range strings.Split(info["softdep"], "\n") {
		pre := false
		for _, w := range strings.Fields(line) {
			switch w {
			case "pre:":
				pre = true
			case "post:":
				pre = false
			default:
				if pre {
					m.SoftPre = append(m.SoftPre, modName(w))
				}
			}
		}
	}
	return m, nil
}

// moduleLoadOrder returns the modules to load, dependencies first, for the
// wanted module names. available maps module name to module; builtin holds
// names of modules built into the kernel (they need no loading and satisfy
// dependencies). Wanted modules are visited in the given order and each
// module's dependencies in the order modinfo lists them, so the result is
// deterministic. A hard dependency that is neither available nor builtin is
// an error; a missing soft dependency is ignored.
func moduleLoadOrder(wanted []string, available map[string]*modInfo, builtin map[string]bool) ([]*modInfo, error) {
	const (
		unvisited = iota
		visiting
		done
	)
	state := map[string]int{}
	var order []*modInfo
	var visit func(name string, chain []string, soft bool) error
	visit = func(name string, chain []string, soft bool) error {
		name = modName(name)
		switch state[name] {
		case done:
			return nil
		case visiting:
			if soft {
				return nil // soft dependencies only order, they never force a cycle
			}
			return fmt.Errorf("module dependency cycle: %s", strings.Join(append(chain, name), " -> "))
		}
		m := available[name]
		if m == nil {
			if builtin[name] || soft {
				state[name] = done
				return nil
			}
			if len(chain) == 0 {
				return fmt.Errorf("module %s: not in the kernel package and not built in", name)
			}
			return fmt.Errorf("module %s (needed by %s): not in the kernel package and not built in",
				name, strings.Join(chain, " <- "))
		}
		state[name] = visiting
		chain = append(chain, name)
		for _, d := range m.SoftPre {
			if err := visit(d, chain, true); err != nil {
				return err
			}
		}
		for _, d := range m.Depends {
			if err := visit(d, chain, false); err != nil {
				return err
			}
		}
		state[name] = done
		order = append(order, m)
		return nil
	}
	for _, w := range wanted {
		if builtin[modName(w)] && available[modName(w)] == nil {
			continue
		}
		if err := visit(w, nil, false); err != nil {
			return nil, err
		}
	}
	return order, nil
}

// parseModulesBuiltin reads modules.builtin (one kernel/…/name.ko path per
// line) into a set of module names.
func parseModulesBuiltin(b []byte) map[string]bool {
	set := map[string]bool{}
	for _, line := range strings.Split(string(b), "\n") {
		if line = strings.TrimSpace(line); line != "" {
			set[modName(line)] = true
		}
	}
	return set
}
