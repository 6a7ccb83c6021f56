package image

import (
	"bytes"
	"compress/gzip"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func TestCpioRoundTrip(t *testing.T) {
	var buf bytes.Buffer
	c := newCpioWriter(&buf)
	c.Mtime = 1700000000
	big := bytes.Repeat([]byte("0123456789abcdef"), 70000) // > 1 MiB, odd padding below
	steps := []error{
		c.Dir("dev", 0o755),
		c.CharDev("dev/console", 0o600, 5, 1),
		c.CharDev("/dev/null", 0o666, 1, 3),
		c.File("init", 0o755, []byte("#!/bin/sh\necho hi\n")),
		c.File("a/b/c/deep.txt", 0o644, []byte("x")), // parents created implicitly
		c.File("a/b/big.bin", 0o600, big[:len(big)-3]),
		c.Symlink("bin/sh", "/bin/busybox"),
		c.Dir("tmp", 0o777|os.ModeSticky),
		c.Dir("dev", 0o755), // duplicate directory: ignored
		c.File("empty", 0o644, nil),
		c.Close(),
	}
	for i, err := range steps {
		if err != nil {
			t.Fatalf("step %d: %v", i, err)
		}
	}
	if buf.Len()%512 != 0 {
		t.Errorf("archive length %d is not a multiple of 512", buf.Len())
	}
	got, err := readCpio(bytes.NewReader(buf.Bytes()))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	byName := map[string]cpioEntry{}
	for _, e := range got {
		names = append(names, e.Name)
		byName[e.Name] = e
		if e.Mtime != 1700000000 {
			t.Errorf("%s: mtime %d", e.Name, e.Mtime)
		}
	}
	want := []string{"dev", "dev/console", "dev/null", "init", "a", "a/b", "a/b/c", "a/b/c/deep.txt",
		"a/b/big.bin", "bin", "bin/sh", "tmp", "empty"}
	if !reflect.DeepEqual(names, want) {
		t.Fatalf("entries:\n got %q\nwant %q", names, want)
	}
	check := func(name string, mode uint32, data []byte, maj, min uint32) {
		t.Helper()
		e := byName[name]
		if e.Mode != mode || !bytes.Equal(e.Data, data) || e.RdevMajor != maj || e.RdevMinor != min {
			t.Errorf("%s: mode %o rdev %d:%d len %d; want mode %o rdev %d:%d len %d",
				name, e.Mode, e.RdevMajor, e.RdevMinor, len(e.Data), mode, maj, min, len(data))
		}
	}
	check("dev/console", modeCharDev|0o600, nil, 5, 1)
	check("dev/null", modeCharDev|0o666, nil, 1, 3)
	check("init", modeFile|0o755, []byte("#!/bin/sh\necho hi\n"), 0, 0)
	check("a/b/big.bin", modeFile|0o600, big[:len(big)-3], 0, 0)
	check("a/b", modeDir|0o755, nil, 0, 0)
	check("bin/sh", modeSymlink|0o777, []byte("/bin/busybox"), 0, 0)
	check("tmp", modeDir|0o1777, nil, 0, 0)
	check("empty", modeFile|0o644, nil, 0, 0)

	// The system's cpio must agree.
	if _, err := exec.LookPath("cpio"); err != nil {
		t.Skip("cpio not installed")
	}
	cmd := exec.Command("cpio", "-t", "--quiet")
	cmd.Stdin = bytes.NewReader(buf.Bytes())
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("cpio -t: %v", err)
	}
	if list := strings.Fields(string(out)); !reflect.DeepEqual(list, want) {
		t.Errorf("cpio -t lists %q, want %q", list, want)
	}
	// And extract it faithfully (content, symlink, device node type).
	dir := t.TempDir()
	cmd = exec.Command("cpio", "-idm", "--quiet", "--no-absolute-filenames")
	cmd.Dir = dir
	cmd.Stdin = bytes.NewReader(buf.Bytes())
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("cpio -i: %v\n%s", err, out)
	}
	if b, err := os.ReadFile(filepath.Join(dir, "a/b/big.bin")); err != nil || !bytes.Equal(b, big[:len(big)-3]) {
		t.Errorf("cpio -i: big.bin differs (%v)", err)
	}
	if l, err := os.Readlink(filepath.Join(dir, "bin/sh")); err != nil || l != "/bin/busybox" {
		t.Errorf("cpio -i: bin/sh -> %q (%v)", l, err)
	}
	if os.Geteuid() == 0 {
		if st, err := os.Lstat(filepath.Join(dir, "dev/null")); err != nil || st.Mode()&os.ModeCharDevice == 0 {
			t.Errorf("cpio -i: dev/null is not a char device (%v)", err)
		}
	}
}

func TestCpioRejectsBadNames(t *testing.T) {
	c := newCpioWriter(io.Discard)
	for _, n := range []string{"", "/", "TRAILER!!!", "/TRAILER!!!"} {
		if err := c.File(n, 0o644, nil); err == nil {
			t.Errorf("name %q accepted", n)
		}
	}
}

func TestCpioReaderRejectsGarbage(t *testing.T) {
	if _, err := readCpio(strings.NewReader("070702" + strings.Repeat("0", 200))); err == nil {
		t.Error("bad magic accepted")
	}
	if _, err := readCpio(strings.NewReader("0707")); err == nil {
		t.Error("truncated archive accepted")
	}
}

// TestInitramfsContent builds the initramfs for the real kernel and checks
// it with both readers, gzip-compressed and not.
func TestInitramfsContent(t *testing.T) {
	k := sharedKernel(t)
	agent := standinAgent(t)
	agentData, _ := os.ReadFile(agent)
	for _, comp := range []string{"none", "gzip"} {
		t.Run(comp, func(t *testing.T) {
			var buf bytes.Buffer
			if err := buildInitramfs(&buf, k, agent, comp); err != nil {
				t.Fatal(err)
			}
			var r io.Reader = bytes.NewReader(buf.Bytes())
			if comp == "gzip" {
				zr, err := gzip.NewReader(r)
				if err != nil {
					t.Fatal(err)
				}
				r = zr
			}
			raw, err := io.ReadAll(r)
			if err != nil {
				t.Fatal(err)
			}
			ents, err := readCpio(bytes.NewReader(raw))
			if err != nil {
				t.Fatal(err)
			}
			files := map[string]cpioEntry{}
			for _, e := range ents {
				files["/"+e.Name] = e
			}
			for _, d := range []string{"/dev", "/proc", "/sys", "/run", "/tmp", "/newroot"} {
				if files[d].Mode&modeTypeMsk != modeDir {
					t.Errorf("%s missing or not a directory", d)
				}
			}
			if e := files["/dev/console"]; e.Mode&modeTypeMsk != modeCharDev || e.RdevMajor != 5 || e.RdevMinor != 1 {
				t.Errorf("/dev/console: %+v", e)
			}
			if e := files["/dev/null"]; e.Mode&modeTypeMsk != modeCharDev || e.RdevMajor != 1 || e.RdevMinor != 3 {
				t.Errorf("/dev/null: %+v", e)
			}
			if e := files["/init"]; !bytes.Equal(e.Data, agentData) || e.Mode != modeFile|0o755 {
				t.Errorf("/init is not the agent (mode %o, %d bytes)", e.Mode, len(e.Data))
			}
			list := strings.Fields(string(files[GuestModulesList].Data))
			if !reflect.DeepEqual(list, k.loadPaths()) {
				t.Errorf("%s = %q, want %q", GuestModulesList, list, k.loadPaths())
			}
			for _, m := range list {
				e, ok := files[m]
				if !ok || len(e.Data) < 1000 || !bytes.HasPrefix(e.Data, []byte("\x7fELF")) {
					t.Errorf("module %s missing or not an ELF object", m)
				}
			}
			if comp == "none" {
				if _, err := exec.LookPath("cpio"); err == nil {
					cmd := exec.Command("cpio", "-t", "--quiet")
					cmd.Stdin = bytes.NewReader(raw)
					out, err := cmd.Output()
					if err != nil {
						t.Fatalf("cpio -t: %v", err)
					}
					if !strings.Contains(string(out), "\ninit\n") || !strings.Contains(string(out), "etc/noid/modules\n") {
						t.Errorf("cpio -t output lacks init or etc/noid/modules:\n%s", out)
					}
				}
			}
			t.Logf("%s initramfs: %d bytes", comp, buf.Len())
		})
	}
}
