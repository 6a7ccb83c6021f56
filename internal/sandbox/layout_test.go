package sandbox

import (
	"errors"
	"os"
	"reflect"
	"strings"
	"testing"
)

// Mount tables of the three kinds of hosts. hybridV1 is this machine's.
const (
	hybridV1 = `30 22 0:27 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
31 30 0:28 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
32 30 0:29 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 30 0:31 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
38 30 0:35 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
39 30 0:36 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
40 30 0:37 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
`
	pureV2 = `24 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
35 24 0:30 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
`
	debianV1 = `25 18 0:22 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
26 25 0:23 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:10 - cgroup cgroup rw,xattr,release_agent=/lib/systemd/systemd-cgroups-agent,name=systemd
29 25 0:26 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:13 - cgroup cgroup rw,cpu,cpuacct
33 25 0:30 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:17 - cgroup cgroup rw,memory
34 25 0:31 / /sys/fs/cgroup/pids rw,nosuid,nodev,noexec,relatime shared:18 - cgroup cgroup rw,pids
90 24 0:30 /docker/abc /mnt/memory\040bind rw - cgroup cgroup rw,memory
`
)

func fakeControllers(m map[string]string) func(string) ([]byte, error) {
	return func(p string) ([]byte, error) {
		if s, ok := m[p]; ok {
			return []byte(s), nil
		}
		return nil, os.ErrNotExist
	}
}

func mounts(l *Layout) []string {
	var out []string
	for _, h := range l.Hierarchies {
		s := h.Version.String() + ":" + h.Mount
		if h.Tracking {
			s += "(tracking)"
		}
		out = append(out, s)
	}
	return out
}

func TestDetectHybridV1(t *testing.T) {
	l, err := Detect(DetectOptions{Mountinfo: []byte(hybridV1), ReadFile: fakeControllers(map[string]string{"/sys/fs/cgroup/unified/cgroup.controllers": "hugetlb\n"})})
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"v1:/sys/fs/cgroup/memory", "v1:/sys/fs/cgroup/pids", "v1:/sys/fs/cgroup/systemd(tracking)", "v2:/sys/fs/cgroup/unified(tracking)"}
	if got := mounts(l); !reflect.DeepEqual(got, want) {
		t.Errorf("hierarchies %v, want %v", got, want)
	}
	if l.Version() != V1 || l.For(Memory).Mount != "/sys/fs/cgroup/memory" || l.For(Pids).Mount != "/sys/fs/cgroup/pids" {
		t.Errorf("layout %s", l)
	}
	l, _ = Detect(DetectOptions{Mountinfo: []byte(hybridV1), NoTracking: true, ReadFile: fakeControllers(nil)})
	if got := mounts(l); len(got) != 2 {
		t.Errorf("without tracking: %v", got)
	}
}

func TestDetectPureV2(t *testing.T) {
	l, err := Detect(DetectOptions{Mountinfo: []byte(pureV2), ReadFile: fakeControllers(map[string]string{"/sys/fs/cgroup/cgroup.controllers": "cpuset cpu io memory hugetlb pids rdma misc\n"})})
	if err != nil {
		t.Fatal(err)
	}
	if got := mounts(l); !reflect.DeepEqual(got, []string{"v2:/sys/fs/cgroup"}) || l.Version() != V2 {
		t.Errorf("hierarchies %v version %v", got, l.Version())
	}
	if !strings.HasPrefix(l.String(), "v2 (memory: /sys/fs/cgroup, pids: /sys/fs/cgroup") {
		t.Errorf("String() = %s", l)
	}
	// No cgroup mount at all.
	_, err = Detect(DetectOptions{Mountinfo: []byte("24 1 8:1 / / rw - ext4 /dev/sda1 rw\n")})
	if !errors.Is(err, ErrNoCgroups) {
		t.Errorf("err = %v", err)
	}
}

func TestDetectDebianV1(t *testing.T) {
	l, err := Detect(DetectOptions{Mountinfo: []byte(debianV1), ReadFile: fakeControllers(nil)})
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"v1:/sys/fs/cgroup/memory", "v1:/sys/fs/cgroup/pids", "v1:/sys/fs/cgroup/systemd(tracking)"}
	if got := mounts(l); !reflect.DeepEqual(got, want) {
		t.Errorf("hierarchies %v, want %v (the bind of /docker/abc must lose to the full mount)", got, want)
	}
	if c := l.Hierarchies[2].Controllers; !reflect.DeepEqual(c, []string{"name=systemd"}) {
		t.Errorf("systemd controllers %v (release_agent and xattr are options)", c)
	}
}

// TestDetectOvermount: a later mount on the same point hides the earlier
// one, and relative mount points are ignored.
func TestDetectOvermount(t *testing.T) {
	mi := "1 0 0:1 / /c rw - cgroup c rw,memory\n2 0 0:2 / /c rw - cgroup c rw,pids\n3 0 0:3 / rel rw - cgroup c rw,memory\n"
	if _, err := Detect(DetectOptions{Mountinfo: []byte(mi)}); !errors.Is(err, ErrNoCgroups) {
		t.Fatalf("err = %v, want no memory hierarchy (hidden by the pids mount)", err)
	}
	mi += "4 0 0:4 / /m rw - cgroup c rw,memory\n"
	l, err := Detect(DetectOptions{Mountinfo: []byte(mi)})
	if err != nil || l.For(Memory).Mount != "/m" || l.For(Pids).Mount != "/c" {
		t.Fatalf("layout %v, %v", l, err)
	}
}

func TestParseMountinfoEscapes(t *testing.T) {
	ms := ParseMountinfo([]byte(debianV1 + "garbage line\n1 2 3\n"))
	last := ms[len(ms)-1]
	if last.Point != "/mnt/memory bind" || last.Root != "/docker/abc" || last.FSType != "cgroup" {
		t.Errorf("last mount %+v", last)
	}
	if len(ms) != 6 {
		t.Errorf("%d mounts, want 6 (malformed lines skipped)", len(ms))
	}
	if got := unescapeOctal(`a\134b\0`); got != `a\b\0` {
		t.Errorf("unescape = %q", got)
	}
}

func TestParseProcCgroup(t *testing.T) {
	pcs := ParseProcCgroup([]byte("9:name=systemd:/\n4:memory:/process_api/x\n2:cpuacct,cpu:/a\n0::/noid/vm\nbad\n3:x:relative\n"))
	if len(pcs) != 4 {
		t.Fatalf("%+v", pcs)
	}
	h := Hierarchy{Version: V1, Mount: "/sys/fs/cgroup/cpu,cpuacct", Root: "/", Controllers: []string{"cpu", "cpuacct"}}
	if p, ok := pathIn(h, pcs); !ok || p != "/a" {
		t.Errorf("cpu path %q %v", p, ok)
	}
	if p, ok := pathIn(Hierarchy{Version: V2}, pcs); !ok || p != "/noid/vm" {
		t.Errorf("v2 path %q %v", p, ok)
	}
	if d, ok := dirOf(Hierarchy{Mount: "/m", Root: "/docker/abc"}, "/docker/abc/noid/x"); !ok || d != "/m/noid/x" {
		t.Errorf("dirOf = %q %v", d, ok)
	}
	if _, ok := dirOf(Hierarchy{Mount: "/m", Root: "/docker/abc"}, "/other"); ok {
		t.Error("dirOf outside the mount succeeded")
	}
}
