package qemu

import (
	"bytes"
	"context"
	"encoding/binary"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// streamBuilder writes a migration stream the way QEMU lays it out.
type streamBuilder struct{ bytes.Buffer }

func (b *streamBuilder) u8(v byte)      { b.WriteByte(v) }
func (b *streamBuilder) be32(v uint32)  { binary.Write(b, binary.BigEndian, v) }
func (b *streamBuilder) be64(v uint64)  { binary.Write(b, binary.BigEndian, v) }
func (b *streamBuilder) idstr(s string) { b.u8(byte(len(s))); b.WriteString(s) }

func (b *streamBuilder) header() {
	b.be32(streamMagic)
	b.be32(streamVersion)
	b.u8(secConfiguration)
	b.be32(7)
	b.WriteString("microvm")
}

// section opens a section; START and FULL carry a name, PART and END only
// their id.
func (b *streamBuilder) section(t byte, id uint32, name string) {
	b.u8(t)
	b.be32(id)
	if t == secStart || t == secFull {
		b.idstr(name)
		b.be32(0)
		b.be32(4)
	}
}

func (b *streamBuilder) footer(id uint32) { b.u8(secFooter); b.be32(id) }

// record writes a page record; block "" continues the previous block.
func (b *streamBuilder) record(flags uint64, off uint64, block string, data []byte) {
	if block == "" {
		flags |= ramFlagContinue
	}
	b.be64(off | flags)
	if block != "" {
		b.idstr(block)
	}
	b.Write(data)
}

func fill(v byte, n int) []byte { return bytes.Repeat([]byte{v}, n) }

// TestSplitStream: guest RAM pages land in the memory file (a later pass
// wins, a page that turned zero is zero again, zero pages stay holes), and
// the state file is the stream without them, byte for byte.
func TestSplitStream(t *testing.T) {
	const memSize = 1 << 20
	var in, want streamBuilder
	for _, b := range []*streamBuilder{&in, &want} {
		b.header()
		b.section(secStart, 1, "ram")
		b.be64(memSize + 64<<10 | ramFlagMemSize)
		b.idstr("ram")
		b.be64(memSize)
		b.idstr("pc.bios")
		b.be64(64 << 10)
		b.be64(ramFlagEOS)
		b.footer(1)
	}
	// First pass: RAM pages 0..3 (page 2 zero), a bios page, RAM page 5.
	in.section(secPart, 1, "")
	in.record(ramFlagPage, 0, "ram", fill(1, pageSize))
	in.record(ramFlagPage, pageSize, "", fill(2, pageSize))
	in.record(ramFlagZero, 2*pageSize, "", []byte{0})
	in.record(ramFlagPage, 3*pageSize, "", fill(4, pageSize))
	in.record(ramFlagPage, 0, "pc.bios", fill(9, pageSize))
	in.record(ramFlagZero, pageSize, "", []byte{0})
	in.record(ramFlagPage, 5*pageSize, "ram", fill(6, pageSize))
	in.be64(ramFlagEOS)
	in.footer(1)
	want.section(secPart, 1, "")
	want.record(ramFlagPage, 0, "pc.bios", fill(9, pageSize))
	want.record(ramFlagZero, pageSize, "", []byte{0})
	want.be64(ramFlagEOS)
	want.footer(1)
	// A command to the destination (QEMU 10 sends one), copied through.
	for _, b := range []*streamBuilder{&in, &want} {
		b.u8(secCommand)
		binary.Write(b, binary.BigEndian, uint16(9))
		binary.Write(b, binary.BigEndian, uint16(3))
		b.Write([]byte{1, 2, 3})
	}
	// Final pass: page 1 again, page 3 now zero.
	for _, b := range []*streamBuilder{&in, &want} {
		b.section(secEnd, 1, "")
	}
	in.record(ramFlagPage, pageSize, "ram", fill(7, pageSize))
	in.record(ramFlagZero, 3*pageSize, "", []byte{0})
	for _, b := range []*streamBuilder{&in, &want} {
		b.be64(ramFlagEOS)
		b.footer(1)
		// Device state, copied through unparsed.
		b.section(secFull, 2, "timer")
		b.Write([]byte("anything at all \x00\x01\x7e"))
		b.footer(2)
		b.u8(secEOF)
	}

	dir := t.TempDir()
	mem, err := os.OpenFile(filepath.Join(dir, "memory"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Close()
	mem.Truncate(memSize)
	var state bytes.Buffer
	st, err := splitStream(context.Background(), bytes.NewReader(in.Bytes()), mem, memSize, &state)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(state.Bytes(), want.Bytes()) {
		t.Errorf("state stream differs:\n got %x\nwant %x", state.Bytes(), want.Bytes())
	}
	if st.Pages != 5 || st.ZeroPages != 2 || st.StateBytes != int64(want.Len()) {
		t.Errorf("stats %+v", st)
	}
	got, _ := os.ReadFile(mem.Name())
	wantMem := make([]byte, memSize)
	copy(wantMem[0:], fill(1, pageSize))
	copy(wantMem[pageSize:], fill(7, pageSize))
	copy(wantMem[5*pageSize:], fill(6, pageSize))
	if !bytes.Equal(got, wantMem) {
		for p := 0; p < 8; p++ {
			t.Logf("page %d starts %x", p, got[p*pageSize:p*pageSize+4])
		}
		t.Error("memory file content differs")
	}
}

// TestSplitStreamRefuses: streams noid cannot split fail with a reason.
func TestSplitStreamRefuses(t *testing.T) {
	const memSize = 1 << 20
	start := func(b *streamBuilder, ramSize uint64) {
		b.header()
		b.section(secStart, 1, "ram")
		b.be64(ramSize | ramFlagMemSize)
		b.idstr("ram")
		b.be64(ramSize)
		b.be64(ramFlagEOS)
		b.footer(1)
	}
	cases := map[string]struct {
		build func(b *streamBuilder)
		want  string
	}{
		"not a stream": {func(b *streamBuilder) { b.WriteString("hello, world") }, "not a QEMU migration stream"},
		"truncated": {func(b *streamBuilder) {
			start(b, memSize)
			b.section(secPart, 1, "")
			b.record(ramFlagPage, 0, "ram", fill(1, 100))
		}, "ended"},
		"compressed page": {func(b *streamBuilder) {
			start(b, memSize)
			b.section(secPart, 1, "")
			b.record(ramFlagCompress, 0, "ram", nil)
		}, "compression"},
		"page outside RAM": {func(b *streamBuilder) {
			start(b, memSize)
			b.section(secPart, 1, "")
			b.record(ramFlagPage, memSize, "ram", fill(1, pageSize))
		}, "outside"},
		"RAM size differs": {func(b *streamBuilder) { start(b, 2*memSize) }, "has 2097152 bytes"},
		"block migration": {func(b *streamBuilder) {
			b.header()
			b.section(secStart, 1, "block")
		}, "block migration"},
		"unknown section": {func(b *streamBuilder) {
			start(b, memSize)
			b.u8(0x06)
		}, "section of type 0x6"},
	}
	for name, tc := range cases {
		var b streamBuilder
		tc.build(&b)
		mem, _ := os.Create(filepath.Join(t.TempDir(), "m"))
		mem.Truncate(memSize)
		_, err := splitStream(context.Background(), bytes.NewReader(b.Bytes()), mem, memSize, &bytes.Buffer{})
		mem.Close()
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want an error mentioning %q", name, err, tc.want)
		}
	}
}

func TestCompareVersions(t *testing.T) {
	for _, c := range []struct {
		a, b string
		want int
	}{
		{"7.2.22", "7.2.22", 0},
		{"7.2.22", "10.0.2", -1},
		{"10.0.2", "9.2", 1},
		{"9.0", "9.0.0", 0},
		{"8.2.0-rc1", "8.2", 0},
		{"8.1.5", "8.2", -1},
	} {
		if got := compareVersions(c.a, c.b); got != c.want {
			t.Errorf("compareVersions(%q, %q) = %d, want %d", c.a, c.b, got, c.want)
		}
	}
}
