package storage

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// qemuIO runs qemu-io commands against the qcow2 overlay top over the raw
// base, opened with its backing given explicitly (as the VMM opens a
// chain), and returns its output.
func qemuIO(t *testing.T, top, base string, cmds ...string) string {
	t.Helper()
	spec, _ := json.Marshal(map[string]any{
		"driver": "qcow2", "file": map[string]any{"driver": "file", "filename": top},
		"backing": map[string]any{"driver": "raw", "file": map[string]any{"driver": "file", "filename": base}},
	})
	args := []string{}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	args = append(args, "json:"+string(spec))
	out, err := exec.Command("qemu-io", args...).CombinedOutput()
	if err != nil || strings.Contains(string(out), "error") || strings.Contains(string(out), "fail") {
		t.Fatalf("qemu-io %v: %v\n%s", cmds, err, out)
	}
	return string(out)
}

// TestCreateQcow2: the image qemu-img reads as a clean qcow2 of the asked
// size, and as an overlay it reads through to its backing, keeps its own
// writes and never writes the backing.
func TestCreateQcow2(t *testing.T) {
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Skip("qemu-img (qemu-utils) is not installed; scripts/setup.sh installs it")
	}
	dir := t.TempDir()
	for _, size := range []int64{64 << 20, 1 << 30, 40 << 30, 1<<30 + 512} {
		p := filepath.Join(dir, "sized.qcow2")
		os.Remove(p)
		if err := CreateQcow2(p, size); err != nil {
			t.Fatal(err)
		}
		if out, err := exec.Command("qemu-img", "check", p).CombinedOutput(); err != nil {
			t.Fatalf("qemu-img check of a %d-byte image: %v\n%s", size, err, out)
		}
		out, err := exec.Command("qemu-img", "info", "--output=json", p).Output()
		if err != nil {
			t.Fatal(err)
		}
		var info struct {
			Format      string `json:"format"`
			VirtualSize int64  `json:"virtual-size"`
			Backing     string `json:"backing-filename"`
		}
		json.Unmarshal(out, &info)
		if info.Format != "qcow2" || info.VirtualSize != size || info.Backing != "" {
			t.Errorf("image of %d bytes reads as %+v", size, info)
		}
		if alloc, _ := AllocatedSize(p); alloc > 1<<20 {
			t.Errorf("an empty %d-byte image allocates %d bytes", size, alloc)
		}
	}
	if err := CreateQcow2(filepath.Join(dir, "sized.qcow2"), 1<<20); err == nil {
		t.Error("CreateQcow2 replaced an existing file")
	}
	if err := CreateQcow2(filepath.Join(dir, "odd.qcow2"), 1000); err == nil {
		t.Error("CreateQcow2 accepted a size that is not a multiple of 512")
	}

	base := filepath.Join(dir, "base.raw")
	b := bytes.Repeat([]byte{0xab}, 1<<20)
	if err := os.WriteFile(base, append(b, make([]byte, 63<<20)...), 0o600); err != nil {
		t.Fatal(err)
	}
	top := filepath.Join(dir, "top.qcow2")
	if err := CreateQcow2(top, 64<<20); err != nil {
		t.Fatal(err)
	}
	qemuIO(t, top, base, "read -P 0xab 0 1M", "write -P 0xcd 512k 128k", "write -P 0xee 32M 64k")
	qemuIO(t, top, base, "read -P 0xab 0 512k", "read -P 0xcd 512k 128k", "read -P 0xab 640k 384k", "read -P 0xee 32M 64k")
	if got, _ := os.ReadFile(base); !bytes.Equal(got[:1<<20], b) || got[32<<20] != 0 {
		t.Error("writes through the overlay reached its backing")
	}
	if out, err := exec.Command("qemu-img", "check", top).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img check after writes: %v\n%s", err, out)
	}
}
