package sandbox

import (
	"strings"
	"testing"
)

// FuzzParseMountinfo feeds arbitrary mount tables to ParseMountinfo and
// Detect (with a fixed v2 controller list). Nothing panics; every mount
// has a type and a mount point; Detect either fails or returns hierarchies
// that carry memory and pids, each mounted once.
func FuzzParseMountinfo(f *testing.F) {
	f.Add([]byte(hybridV1))
	f.Add([]byte(pureV2))
	f.Add([]byte(debianV1))
	f.Add([]byte("1 2 3 / /x rw - cgroup c rw,memory,pids\n"))
	f.Add([]byte("1 2 3 \\ \\0 - - cgroup2\n"))
	read := func(string) ([]byte, error) { return []byte("memory pids cpu"), nil }
	f.Fuzz(func(t *testing.T, data []byte) {
		for _, m := range ParseMountinfo(data) {
			if m.FSType == "" || m.Point == "" {
				t.Fatalf("mount %+v", m)
			}
		}
		l, err := Detect(DetectOptions{Mountinfo: data, ReadFile: read})
		if err != nil {
			return
		}
		if l.For(Memory) == nil || l.For(Pids) == nil {
			t.Fatalf("layout without memory or pids: %+v", l)
		}
		seen := map[string]bool{}
		for _, h := range l.Hierarchies {
			if seen[h.Mount] || h.Version != V1 && h.Version != V2 {
				t.Fatalf("hierarchies %+v", l.Hierarchies)
			}
			seen[h.Mount] = true
		}
		_ = l.String()
	})
}

// FuzzParseProcCgroup: ParseProcCgroup never panics and returns only
// absolute paths and non-negative ids.
func FuzzParseProcCgroup(f *testing.F) {
	f.Add([]byte("9:name=systemd:/\n4:memory:/process_api/x\n0::/noid/vm\n"))
	f.Add([]byte("x:y\n1:2:3:4\n-1::/\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		for _, pc := range ParseProcCgroup(data) {
			if pc.ID < 0 || !strings.HasPrefix(pc.Path, "/") {
				t.Fatalf("%+v", pc)
			}
		}
	})
}

// FuzzParseLease: a lease file's reader accepts only a clean id and an
// absolute directory, and what it accepts round-trips.
func FuzzParseLease(f *testing.F) {
	f.Add([]byte("a1b2c3\n/var/lib/noid/users/1/vms/a1b2c3\n"))
	f.Add([]byte("x\nrelative\n"))
	f.Add([]byte("\n/\n"))
	f.Add([]byte("a\n/b\nc\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		l, err := ParseLease(data)
		if err != nil {
			return
		}
		if l.ID == "" || strings.ContainsAny(l.ID, "\n\x00/") || !strings.HasPrefix(l.Owner, "/") || strings.ContainsAny(l.Owner, "\n\x00") {
			t.Fatalf("accepted %+v", l)
		}
		l2, err := ParseLease([]byte(l.ID + "\n" + l.Owner + "\n"))
		if err != nil || l2 != l {
			t.Fatalf("round trip %+v -> %+v, %v", l, l2, err)
		}
	})
}
