package image

import (
	"bytes"
	"compress/gzip"
	"debug/elf"
	"encoding/binary"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/klauspost/compress/zstd"
	"github.com/pierrec/lz4/v4"
	"github.com/ulikunitz/xz"
	"github.com/ulikunitz/xz/lzma"
)

// syntheticELF returns a minimal x86-64 ELF executable with one PT_LOAD
// segment of n bytes of code-like data (many E8/E9 call/jump opcodes so the
// x86 BCJ filter has work to do, and repetition so compressors do too).
func syntheticELF(n int) []byte {
	const hdr = 64 + 56
	b := make([]byte, hdr+n)
	copy(b, "\x7fELF")
	b[4], b[5], b[6] = 2, 1, 1 // 64-bit, little-endian, version 1
	le := binary.LittleEndian
	le.PutUint16(b[16:], uint16(elf.ET_EXEC))
	le.PutUint16(b[18:], uint16(elf.EM_X86_64))
	le.PutUint32(b[20:], 1)
	le.PutUint64(b[24:], 0x1000000) // entry
	le.PutUint64(b[32:], 64)        // phoff
	le.PutUint16(b[52:], 64)        // ehsize
	le.PutUint16(b[54:], 56)        // phentsize
	le.PutUint16(b[56:], 1)         // phnum
	le.PutUint16(b[58:], 64)        // shentsize
	ph := b[64:]
	le.PutUint32(ph[0:], uint32(elf.PT_LOAD))
	le.PutUint32(ph[4:], uint32(elf.PF_R|elf.PF_X))
	le.PutUint64(ph[8:], hdr)        // offset
	le.PutUint64(ph[16:], 0x1000000) // vaddr
	le.PutUint64(ph[24:], 0x1000000) // paddr
	le.PutUint64(ph[32:], uint64(n)) // filesz
	le.PutUint64(ph[40:], uint64(n)) // memsz
	le.PutUint64(ph[48:], 0x1000)
	r := rand.New(rand.NewSource(42))
	alphabet := []byte{0xe8, 0xe9, 0x00, 0xff, 0x48, 0x89, 0xc7, 0x0f, 0x85, 0x90, 0xc3, 0x55}
	body := b[hdr:]
	for i := 0; i < len(body); {
		if r.Intn(4) == 0 && i > 64 { // repeat an earlier run
			src := r.Intn(i - 32)
			i += copy(body[i:], body[src:src+32])
			continue
		}
		body[i] = alphabet[r.Intn(len(alphabet))]
		if r.Intn(3) == 0 {
			body[i] = byte(r.Intn(256))
		}
		i++
	}
	return b
}

// syntheticBzImage wraps payload in a bzImage setup header (boot protocol
// 2.15, three setup sectors) with the given version string.
func syntheticBzImage(payload []byte, version string) []byte {
	const setupSects = 3
	pm := (setupSects + 1) * 512
	const payloadOff = 0x40
	b := make([]byte, pm+payloadOff+len(payload)+100)
	le := binary.LittleEndian
	b[bzSetupSects] = setupSects
	le.PutUint16(b[bzBootFlag:], 0xAA55)
	copy(b[bzHeaderMagic:], "HdrS")
	le.PutUint16(b[bzProtocol:], 0x020f)
	le.PutUint16(b[bzKernelVersion:], 0x300-0x200)
	copy(b[0x300:], version+"\x00")
	le.PutUint32(b[bzPayloadOffset:], payloadOff)
	le.PutUint32(b[bzPayloadLength:], uint32(len(payload)))
	copy(b[pm+payloadOff:], payload)
	return b
}

func withSize(compressed []byte, n int) []byte {
	return binary.LittleEndian.AppendUint32(compressed, uint32(n))
}

func encLZ4Legacy(t testing.TB, data []byte) []byte {
	out := binary.LittleEndian.AppendUint32(nil, lz4LegacyMagic)
	const block = 8 << 20
	for off := 0; off < len(data); off += block {
		chunk := data[off:min(off+block, len(data))]
		dst := make([]byte, lz4.CompressBlockBound(len(chunk)))
		n, err := lz4.CompressBlock(chunk, dst, nil)
		if err != nil || n == 0 {
			t.Fatalf("lz4 compress: n=%d err=%v", n, err)
		}
		out = binary.LittleEndian.AppendUint32(out, uint32(n))
		out = append(out, dst[:n]...)
	}
	return out
}

func runFilter(t testing.TB, data []byte, name string, args ...string) []byte {
	t.Helper()
	if _, err := exec.LookPath(name); err != nil {
		t.Skipf("%s not installed", name)
	}
	cmd := exec.Command(name, args...)
	cmd.Stdin = bytes.NewReader(data)
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s %v: %v", name, args, err)
	}
	return out
}

func TestExtractVmlinuxSynthetic(t *testing.T) {
	small := syntheticELF(300 << 10)
	mid := syntheticELF(3 << 20)
	big := syntheticELF(9 << 20)                          // two LZ4 legacy blocks
	relocs := bytes.Repeat([]byte{0xaa, 0x55, 0x01}, 333) // appended after the ELF like vmlinux.relocs

	cases := []struct {
		name string
		elf  []byte
		enc  func(t testing.TB, in []byte) []byte // returns the payload incl. trailer
	}{
		{"gzip", big, func(t testing.TB, in []byte) []byte {
			var b bytes.Buffer
			w, _ := gzip.NewWriterLevel(&b, gzip.BestSpeed)
			w.Write(in)
			w.Close()
			return b.Bytes() // gzip's ISIZE is the size trailer
		}},
		{"zstd", big, func(t testing.TB, in []byte) []byte {
			e, _ := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedBestCompression), zstd.WithWindowSize(1<<23))
			return withSize(e.EncodeAll(in, nil), len(in))
		}},
		{"lz4-legacy", big, func(t testing.TB, in []byte) []byte {
			return withSize(encLZ4Legacy(t, in), len(in))
		}},
		{"lz4-legacy-tool", big, func(t testing.TB, in []byte) []byte {
			return withSize(runFilter(t, in, "lz4", "-l", "-9", "-c"), len(in))
		}},
		{"xz-crc64", small, func(t testing.TB, in []byte) []byte {
			var b bytes.Buffer
			w, err := xz.NewWriter(&b)
			if err != nil {
				t.Fatal(err)
			}
			w.Write(in)
			w.Close()
			return withSize(b.Bytes(), len(in))
		}},
		{"xz-crc32", small, func(t testing.TB, in []byte) []byte {
			var b bytes.Buffer
			w, err := xz.WriterConfig{CheckSum: xz.CRC32}.NewWriter(&b)
			if err != nil {
				t.Fatal(err)
			}
			w.Write(in)
			w.Close()
			return withSize(b.Bytes(), len(in))
		}},
		{"xz-x86-bcj-tool", mid, func(t testing.TB, in []byte) []byte {
			// What the kernel's xzkern rule runs.
			return withSize(runFilter(t, in, "xz", "--check=crc32", "--x86", "--lzma2=preset=6,dict=32MiB", "-c"), len(in))
		}},
		{"xz-multiblock-tool", mid, func(t testing.TB, in []byte) []byte {
			return withSize(runFilter(t, in, "xz", "--check=sha256", "--block-size=1MiB", "-0", "-c"), len(in))
		}},
		{"lzma", small, func(t testing.TB, in []byte) []byte {
			var b bytes.Buffer
			w, err := lzma.NewWriter(&b)
			if err != nil {
				t.Fatal(err)
			}
			w.Write(in)
			w.Close()
			return withSize(b.Bytes(), len(in))
		}},
		{"bzip2-tool", small, func(t testing.TB, in []byte) []byte {
			return withSize(runFilter(t, in, "bzip2", "-9", "-c"), len(in))
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			in := append(append([]byte(nil), tc.elf...), relocs...)
			payload := tc.enc(t, in)
			path := filepath.Join(t.TempDir(), "bzImage")
			if err := os.WriteFile(path, syntheticBzImage(payload, "9.9.9-test (x@y) #1 SMP"), 0o644); err != nil {
				t.Fatal(err)
			}
			var out bytes.Buffer
			if err := ExtractVmlinux(path, &out); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(out.Bytes(), tc.elf) {
				t.Fatalf("extracted %d bytes, want the %d-byte ELF without the appended data", out.Len(), len(tc.elf))
			}
			if v, err := KernelVersionFromBzImage(path); err != nil || v != "9.9.9-test" {
				t.Errorf("KernelVersionFromBzImage = %q, %v", v, err)
			}

			// A wrong size trailer is detected.
			bad := append([]byte(nil), payload...)
			binary.LittleEndian.PutUint32(bad[len(bad)-4:], uint32(len(in)+1))
			if tc.name != "gzip" { // for gzip the trailer is ISIZE, which the gzip reader checks itself
				os.WriteFile(path, syntheticBzImage(bad, "x"), 0o644)
				if err := ExtractVmlinux(path, &bytes.Buffer{}); err == nil {
					t.Error("wrong size trailer accepted")
				}
			}
		})
	}
}

func TestExtractVmlinuxRejects(t *testing.T) {
	dir := t.TempDir()
	write := func(name string, b []byte) string {
		p := filepath.Join(dir, name)
		os.WriteFile(p, b, 0o644)
		return p
	}
	notELF := bytes.Repeat([]byte("not an elf "), 1000)
	var gz bytes.Buffer
	w := gzip.NewWriter(&gz)
	w.Write(notELF)
	w.Close()
	// A 32-bit ELF is not a kernel Firecracker can boot.
	elf32 := syntheticELF(4096)
	elf32[4] = 1
	cases := map[string][]byte{
		"garbage":      bytes.Repeat([]byte{1, 2, 3}, 1000),
		"non-elf":      syntheticBzImage(gz.Bytes(), "x"),
		"unknown-comp": syntheticBzImage(withSize(bytes.Repeat([]byte{0x42}, 100), 100), "x"),
		"lzo":          syntheticBzImage(withSize(append([]byte{0x89, 'L', 'Z', 'O', 0, 0x0d}, make([]byte, 100)...), 100), "x"),
		"elf32":        syntheticBzImage(withSize(encLZ4Legacy(t, elf32), len(elf32)), "x"),
	}
	old := syntheticBzImage(gz.Bytes(), "x")
	binary.LittleEndian.PutUint16(old[bzProtocol:], 0x0206)
	cases["old-protocol"] = old
	short := syntheticBzImage(gz.Bytes(), "x")
	binary.LittleEndian.PutUint32(short[bzPayloadLength:], 1<<30)
	cases["payload-outside-file"] = short
	for name, b := range cases {
		if err := ExtractVmlinux(write(name, b), &bytes.Buffer{}); err == nil {
			t.Errorf("%s: accepted", name)
		} else {
			t.Logf("%s: %v", name, err)
		}
	}
	if _, err := KernelVersionFromBzImage(write("g", cases["garbage"])); err == nil {
		t.Error("KernelVersionFromBzImage accepted garbage")
	}
}

// TestBCJx86KnownVector checks the BCJ decoder on a hand-made call: the
// encoder turns a relative CALL displacement into an absolute one (target =
// pos + 5 + rel), so decoding must turn it back.
func TestBCJx86KnownVector(t *testing.T) {
	// At position 16: E8 with absolute target 0x1234 + 16 + 5.
	buf := make([]byte, 32)
	buf[16] = 0xe8
	binary.LittleEndian.PutUint32(buf[17:], 0x1234+16+5)
	bcjX86Decode(buf, 0)
	if got := binary.LittleEndian.Uint32(buf[17:]); got != 0x1234 {
		t.Fatalf("decoded displacement %#x, want 0x1234", got)
	}
	// With a start offset the absolute address shifts.
	binary.LittleEndian.PutUint32(buf[17:], 0x1234+16+5+0x100)
	bcjX86Decode(buf, 0x100)
	if got := binary.LittleEndian.Uint32(buf[17:]); got != 0x1234 {
		t.Fatalf("with start offset: %#x, want 0x1234", got)
	}
}

// TestExtractVmlinuxReal extracts the ELF from the real Debian kernel and
// checks it: an x86-64 executable with the Xen PVH entry note that
// Firecracker and QEMU's PVH loader use, identical to what the lz4 tool
// produces, and identical to the vmlinux in the kernel cache.
func TestExtractVmlinuxReal(t *testing.T) {
	k := sharedKernel(t)
	rel, err := KernelVersionFromBzImage(k.Vmlinuz)
	if err != nil || rel != k.Release {
		t.Errorf("KernelVersionFromBzImage = %q, %v; want %q", rel, err, k.Release)
	}
	var out bytes.Buffer
	if err := ExtractVmlinux(k.Vmlinuz, &out); err != nil {
		t.Fatal(err)
	}
	f, err := elf.NewFile(bytes.NewReader(out.Bytes()))
	if err != nil {
		t.Fatal(err)
	}
	if f.Machine != elf.EM_X86_64 || f.Type != elf.ET_EXEC {
		t.Errorf("vmlinux is %v %v", f.Machine, f.Type)
	}
	pvh := false
	for _, p := range f.Progs {
		if p.Type != elf.PT_NOTE {
			continue
		}
		notes := make([]byte, p.Filesz)
		p.ReadAt(notes, 0)
		for len(notes) >= 12 {
			nsz, dsz, typ := binary.LittleEndian.Uint32(notes), binary.LittleEndian.Uint32(notes[4:]), binary.LittleEndian.Uint32(notes[8:])
			name := strings.TrimRight(string(notes[12:12+nsz]), "\x00")
			if name == "Xen" && typ == 18 { // XEN_ELFNOTE_PHYS32_ENTRY
				pvh = true
			}
			adv := 12 + int((nsz+3)&^3) + int((dsz+3)&^3)
			if adv > len(notes) {
				break
			}
			notes = notes[adv:]
		}
	}
	if !pvh {
		t.Error("vmlinux has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)")
	}
	cached, err := os.ReadFile(k.Vmlinux)
	if err != nil || !bytes.Equal(cached, out.Bytes()) {
		t.Errorf("cached vmlinux differs from a fresh extraction (%v)", err)
	}
	t.Logf("vmlinux: %d bytes from a %s bzImage", out.Len(), k.Release)

	if _, err := exec.LookPath("lz4"); err != nil {
		return
	}
	data, _ := os.ReadFile(k.Vmlinuz)
	payload, err := bzImagePayload(data)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(payload, []byte{0x02, 0x21, 0x4c, 0x18}) {
		t.Logf("kernel payload is not LZ4 (magic % x); skipping the lz4 tool comparison", payload[:4])
		return
	}
	cmd := exec.Command("lz4", "-d", "-c")
	cmd.Stdin = bytes.NewReader(payload)
	full, _ := cmd.Output() // lz4 complains about the trailing size; its output is still complete
	if !bytes.HasPrefix(full, out.Bytes()) {
		t.Errorf("lz4 tool output (%d bytes) does not start with our vmlinux (%d bytes)", len(full), out.Len())
	}
}
