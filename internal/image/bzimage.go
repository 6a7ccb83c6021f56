package image

import (
	"bytes"
	"compress/bzip2"
	"compress/gzip"
	"crypto/sha256"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"hash/crc32"
	"hash/crc64"
	"io"
	"os"
	"strings"

	"github.com/klauspost/compress/zstd"
	"github.com/pierrec/lz4/v4"
	"github.com/ulikunitz/xz/lzma"
)

// Offsets in the x86 boot protocol's setup header (Documentation/arch/x86/boot.rst).
const (
	bzSetupSects    = 0x1f1 // u8: size of the setup code in 512-byte sectors (0 means 4)
	bzBootFlag      = 0x1fe // u16: 0xAA55
	bzHeaderMagic   = 0x202 // "HdrS"
	bzProtocol      = 0x206 // u16: boot protocol version
	bzKernelVersion = 0x20e // u16: pointer to the version string, minus 0x200
	bzPayloadOffset = 0x248 // u32: payload offset from the start of the protected-mode code (protocol ≥ 2.08)
	bzPayloadLength = 0x24c // u32: payload length
)

// readBzImageHeader checks the setup header of a bzImage held in data.
func checkBzImage(data []byte) error {
	if len(data) < 0x250 {
		return errors.New("too short for a bzImage")
	}
	if binary.LittleEndian.Uint16(data[bzBootFlag:]) != 0xAA55 || string(data[bzHeaderMagic:bzHeaderMagic+4]) != "HdrS" {
		return errors.New("not a bzImage (no HdrS setup header)")
	}
	return nil
}

// KernelVersionFromBzImage returns the kernel release (what `uname -r` prints
// in the guest, e.g. "6.1.0-48-cloud-amd64") from the version string that the
// bzImage setup header points to at offset 0x20e.
func KernelVersionFromBzImage(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("kernel version: %w", err)
	}
	defer f.Close()
	hdr := make([]byte, 0x250)
	if _, err := io.ReadFull(f, hdr); err != nil {
		return "", fmt.Errorf("kernel version: %s: read header: %w", path, err)
	}
	if err := checkBzImage(hdr); err != nil {
		return "", fmt.Errorf("kernel version: %s: %w", path, err)
	}
	ptr := binary.LittleEndian.Uint16(hdr[bzKernelVersion:])
	if ptr == 0 {
		return "", fmt.Errorf("kernel version: %s: setup header has no version string", path)
	}
	buf := make([]byte, 256)
	n, err := f.ReadAt(buf, int64(ptr)+0x200)
	if n == 0 && err != nil {
		return "", fmt.Errorf("kernel version: %s: read version string: %w", path, err)
	}
	s, _, ok := bytes.Cut(buf[:n], []byte{0})
	if !ok {
		return "", fmt.Errorf("kernel version: %s: version string is not terminated", path)
	}
	fields := strings.Fields(string(s))
	if len(fields) == 0 {
		return "", fmt.Errorf("kernel version: %s: empty version string", path)
	}
	return fields[0], nil
}

// bzImagePayload returns the compressed kernel inside a bzImage.
func bzImagePayload(data []byte) ([]byte, error) {
	if err := checkBzImage(data); err != nil {
		return nil, err
	}
	if v := binary.LittleEndian.Uint16(data[bzProtocol:]); v < 0x0208 {
		return nil, fmt.Errorf("boot protocol %d.%02d has no payload fields (need 2.08+)", v>>8, v&0xff)
	}
	setup := int(data[bzSetupSects])
	if setup == 0 {
		setup = 4
	}
	pm := (setup + 1) * 512
	off := int64(pm) + int64(binary.LittleEndian.Uint32(data[bzPayloadOffset:]))
	n := int64(binary.LittleEndian.Uint32(data[bzPayloadLength:]))
	if n < 8 || off+n > int64(len(data)) {
		return nil, fmt.Errorf("payload [%d, +%d) lies outside the %d-byte file", off, n, len(data))
	}
	return data[off : off+n], nil
}

// ExtractVmlinux writes the uncompressed ELF kernel (vmlinux) contained in the
// bzImage at path bzImage to w. It reads the setup header's payload_offset and
// payload_length, detects the compressor by magic (LZ4 legacy frames as
// Debian uses, gzip, xz including the x86 BCJ filter, zstd, bzip2, lzma),
// decompresses in Go, checks the size the kernel build appends to the
// payload, and verifies the result is an x86-64 ELF. Data the kernel build
// appends after the ELF (relocation tables) is not written.
func ExtractVmlinux(bzImage string, w io.Writer) error {
	data, err := os.ReadFile(bzImage)
	if err != nil {
		return fmt.Errorf("extract vmlinux: %w", err)
	}
	payload, err := bzImagePayload(data)
	if err != nil {
		return fmt.Errorf("extract vmlinux: %s: %w", bzImage, err)
	}
	out, format, err := decompressKernelPayload(payload)
	if err != nil {
		return fmt.Errorf("extract vmlinux: %s: %w", bzImage, err)
	}
	elfData, err := trimELF(out)
	if err != nil {
		return fmt.Errorf("extract vmlinux: %s: %s payload: %w", bzImage, format, err)
	}
	if _, err := w.Write(elfData); err != nil {
		return fmt.Errorf("extract vmlinux: write: %w", err)
	}
	return nil
}

// decompressKernelPayload decompresses a bzImage payload. Every kernel
// compressor used for x86 ends the payload with the uncompressed size as a
// 32-bit little-endian number (gzip's own ISIZE trailer, the *_with_size
// Makefile rules for the others); it is checked.
func decompressKernelPayload(p []byte) (out []byte, format string, err error) {
	want := binary.LittleEndian.Uint32(p[len(p)-4:])
	body := p[:len(p)-4] // without the appended size
	switch {
	case bytes.HasPrefix(p, []byte{0x1f, 0x8b}):
		format = "gzip"
		out, err = decodeGzip(p)
	case bytes.HasPrefix(p, []byte{0xfd, '7', 'z', 'X', 'Z', 0x00}):
		format = "xz"
		out, err = decodeXZ(body)
	case bytes.HasPrefix(p, []byte{0x28, 0xb5, 0x2f, 0xfd}):
		format = "zstd"
		out, err = decodeZstd(body)
	case bytes.HasPrefix(p, []byte{0x02, 0x21, 0x4c, 0x18}):
		format = "lz4"
		out, err = decodeLZ4Legacy(body, int(want))
	case bytes.HasPrefix(p, []byte("BZh")):
		format = "bzip2"
		out, err = io.ReadAll(bzip2.NewReader(bytes.NewReader(body)))
	case bytes.HasPrefix(p, []byte{0x5d, 0x00, 0x00}):
		format = "lzma"
		var r io.Reader
		if r, err = lzma.NewReader(bytes.NewReader(body)); err == nil {
			out, err = io.ReadAll(r)
		}
	case bytes.HasPrefix(p, []byte{0x89, 'L', 'Z', 'O'}):
		return nil, "lzo", errors.New("LZO-compressed kernels are not supported")
	default:
		return nil, "", fmt.Errorf("unknown payload compression (magic % x)", p[:min(6, len(p))])
	}
	if err != nil {
		return nil, format, fmt.Errorf("%s payload: %w", format, err)
	}
	if uint32(len(out)) != want {
		return nil, format, fmt.Errorf("%s payload: decompressed %d bytes, the payload trailer says %d", format, len(out), want)
	}
	return out, format, nil
}

func decodeGzip(p []byte) ([]byte, error) {
	zr, err := gzip.NewReader(bytes.NewReader(p))
	if err != nil {
		return nil, err
	}
	zr.Multistream(false)
	return io.ReadAll(zr)
}

func decodeZstd(p []byte) ([]byte, error) {
	// The kernel uses zstd -22 --ultra, with windows up to 128 MiB.
	d, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxWindow(1<<31),
		zstd.WithDecoderMaxMemory(1<<32))
	if err != nil {
		return nil, err
	}
	defer d.Close()
	return d.DecodeAll(p, nil)
}

// lz4LegacyMagic starts an LZ4 "legacy" frame (lz4 -l), which the kernel
// uses: a sequence of blocks, each a 32-bit little-endian compressed size and
// that many bytes, every block decompressing to at most 8 MiB.
const lz4LegacyMagic = 0x184C2102

func decodeLZ4Legacy(p []byte, sizeHint int) ([]byte, error) {
	const blockMax = 8 << 20
	out := make([]byte, 0, min(max(sizeHint, 0), 1<<30)+blockMax)
	pos := 0
	for pos < len(p) {
		if len(p)-pos < 4 {
			return nil, fmt.Errorf("lz4: %d stray bytes at offset %d", len(p)-pos, pos)
		}
		n := binary.LittleEndian.Uint32(p[pos:])
		pos += 4
		if n == lz4LegacyMagic { // concatenated legacy frames
			continue
		}
		if int64(n) > int64(len(p)-pos) || int(n) > lz4.CompressBlockBound(blockMax) {
			return nil, fmt.Errorf("lz4: block of %d bytes at offset %d overruns the payload", n, pos-4)
		}
		if cap(out)-len(out) < blockMax {
			out = append(out, make([]byte, blockMax)...)[:len(out)]
		}
		k, err := lz4.UncompressBlock(p[pos:pos+int(n)], out[len(out):len(out)+blockMax])
		if err != nil {
			return nil, fmt.Errorf("lz4: block at offset %d: %w", pos-4, err)
		}
		out = out[:len(out)+k]
		pos += int(n)
	}
	return out, nil
}

// decodeXZ decodes a single-stream .xz file, including the x86 BCJ filter
// that the kernel's xzkern rule uses (and that github.com/ulikunitz/xz does
// not support): it parses the container itself (stream header, index and
// footer locate every block) and uses the raw LZMA2 decoder.
func decodeXZ(p []byte) ([]byte, error) {
	if len(p) < 24 || string(p[:6]) != "\xfd7zXZ\x00" {
		return nil, errors.New("xz: bad stream header")
	}
	if crc32.ChecksumIEEE(p[6:8]) != binary.LittleEndian.Uint32(p[8:12]) {
		return nil, errors.New("xz: stream header CRC mismatch")
	}
	if p[6] != 0 {
		return nil, errors.New("xz: unsupported stream flags")
	}
	checkType := p[7] & 0x0f
	var checkLen int
	var newHash func() hash.Hash
	switch checkType {
	case 0x00:
	case 0x01:
		checkLen, newHash = 4, func() hash.Hash { return crc32.NewIEEE() }
	case 0x04:
		checkLen, newHash = 8, func() hash.Hash { return crc64.New(crc64.MakeTable(crc64.ECMA)) }
	case 0x0a:
		checkLen, newHash = 32, sha256.New
	default:
		return nil, fmt.Errorf("xz: unsupported check type %#x", checkType)
	}

	// Stream footer: CRC32, backward size, flags, "YZ". Stream padding (zero
	// groups of 4) may follow it.
	end := len(p)
	for end >= 4 && end%4 == 0 && binary.LittleEndian.Uint32(p[end-4:]) == 0 {
		end -= 4
	}
	if end < 24 || string(p[end-2:end]) != "YZ" {
		return nil, errors.New("xz: no stream footer (more than one stream, or trailing data?)")
	}
	foot := p[end-12 : end]
	if crc32.ChecksumIEEE(foot[4:10]) != binary.LittleEndian.Uint32(foot[0:4]) {
		return nil, errors.New("xz: stream footer CRC mismatch")
	}
	if !bytes.Equal(foot[8:10], p[6:8]) {
		return nil, errors.New("xz: stream header and footer flags differ")
	}
	indexLen := (int(binary.LittleEndian.Uint32(foot[4:8])) + 1) * 4
	indexStart := end - 12 - indexLen
	if indexStart < 12 {
		return nil, errors.New("xz: bad index size")
	}
	idx := p[indexStart : end-12]
	if idx[0] != 0 || crc32.ChecksumIEEE(idx[:len(idx)-4]) != binary.LittleEndian.Uint32(idx[len(idx)-4:]) {
		return nil, errors.New("xz: corrupt index")
	}
	count, ip, err := readVLI(idx[1:])
	if err != nil {
		return nil, err
	}
	ip++
	type record struct{ unpadded, uncompressed uint64 }
	var records []record
	for i := uint64(0); i < count; i++ {
		u, n, err := readVLI(idx[ip:])
		if err != nil {
			return nil, err
		}
		ip += n
		c, n, err := readVLI(idx[ip:])
		if err != nil {
			return nil, err
		}
		ip += n
		records = append(records, record{u, c})
	}

	pos := 12
	var out []byte
	for bi, rec := range records {
		if pos >= indexStart {
			return nil, errors.New("xz: blocks overrun the index")
		}
		hdrLen := (int(p[pos]) + 1) * 4
		if p[pos] == 0 || pos+hdrLen > indexStart {
			return nil, errors.New("xz: bad block header size")
		}
		hdr := p[pos : pos+hdrLen]
		if crc32.ChecksumIEEE(hdr[:hdrLen-4]) != binary.LittleEndian.Uint32(hdr[hdrLen-4:]) {
			return nil, errors.New("xz: block header CRC mismatch")
		}
		flags := hdr[1]
		if flags&0x3c != 0 {
			return nil, errors.New("xz: reserved block flags set")
		}
		hp := 2
		for _, bit := range []byte{0x40, 0x80} { // optional compressed and uncompressed sizes
			if flags&bit != 0 {
				_, n, err := readVLI(hdr[hp : hdrLen-4])
				if err != nil {
					return nil, err
				}
				hp += n
			}
		}
		nFilters := int(flags&3) + 1
		var bcj bool
		var bcjStart uint32
		dictCap := -1
		for i := 0; i < nFilters; i++ {
			id, n, err := readVLI(hdr[hp : hdrLen-4])
			if err != nil {
				return nil, err
			}
			hp += n
			psize, n, err := readVLI(hdr[hp : hdrLen-4])
			if err != nil {
				return nil, err
			}
			hp += n
			if hp+int(psize) > hdrLen-4 {
				return nil, errors.New("xz: filter properties overrun the block header")
			}
			props := hdr[hp : hp+int(psize)]
			hp += int(psize)
			last := i == nFilters-1
			switch {
			case id == 0x04 && !last: // x86 BCJ
				bcj = true
				if len(props) == 4 {
					bcjStart = binary.LittleEndian.Uint32(props)
				} else if len(props) != 0 {
					return nil, errors.New("xz: bad x86 BCJ properties")
				}
			case id == 0x21 && last: // LZMA2
				if len(props) != 1 || props[0] > 40 {
					return nil, errors.New("xz: bad LZMA2 properties")
				}
				if b := props[0]; b == 40 {
					dictCap = 0xffffffff
				} else {
					dictCap = (2 | int(b&1)) << (b/2 + 11)
				}
			default:
				return nil, fmt.Errorf("xz: unsupported filter chain (filter %#x at position %d)", id, i)
			}
		}
		compSize := int64(rec.unpadded) - int64(hdrLen) - int64(checkLen)
		pos += hdrLen
		if compSize <= 0 || int64(pos)+compSize > int64(indexStart) {
			return nil, fmt.Errorf("xz: block %d size out of range", bi)
		}
		lr, err := lzma.Reader2Config{DictCap: max(dictCap, lzma.MinDictCap)}.NewReader2(bytes.NewReader(p[pos : pos+int(compSize)]))
		if err != nil {
			return nil, fmt.Errorf("xz: %w", err)
		}
		block, err := io.ReadAll(lr)
		if err != nil {
			return nil, fmt.Errorf("xz: LZMA2: %w", err)
		}
		if uint64(len(block)) != rec.uncompressed {
			return nil, fmt.Errorf("xz: block %d decoded to %d bytes, the index says %d", bi, len(block), rec.uncompressed)
		}
		if bcj {
			bcjX86Decode(block, bcjStart)
		}
		pos += int(compSize)
		for pos%4 != 0 { // block padding
			pos++
		}
		if newHash != nil {
			h := newHash()
			h.Write(block)
			sum := h.Sum(nil)
			if checkType == 0x01 || checkType == 0x04 { // CRCs are stored little-endian
				for i, j := 0, len(sum)-1; i < j; i, j = i+1, j-1 {
					sum[i], sum[j] = sum[j], sum[i]
				}
			}
			if pos+checkLen > indexStart || !bytes.Equal(sum, p[pos:pos+checkLen]) {
				return nil, fmt.Errorf("xz: block %d check mismatch", bi)
			}
		}
		pos += checkLen
		out = append(out, block...)
	}
	if pos != indexStart {
		return nil, errors.New("xz: data between the last block and the index")
	}
	return out, nil
}

// readVLI reads an xz variable-length integer.
func readVLI(b []byte) (uint64, int, error) {
	var v uint64
	for i := 0; i < len(b) && i < 9; i++ {
		v |= uint64(b[i]&0x7f) << (7 * i)
		if b[i]&0x80 == 0 {
			return v, i + 1, nil
		}
	}
	return 0, 0, errors.New("xz: bad variable-length integer")
}

// bcjX86Decode reverses the x86 branch/call/jump filter in place (the
// algorithm of xz's simple/x86.c, decoding direction), for a buffer that
// starts at stream position start.
func bcjX86Decode(buf []byte, start uint32) {
	maskToAllowed := [8]bool{true, true, true, false, true, false, false, false}
	maskToBitNum := [8]uint32{0, 1, 2, 2, 3, 3, 3, 3}
	testMSByte := func(b byte) bool { return b == 0x00 || b == 0xff }
	if len(buf) <= 4 {
		return
	}
	size := len(buf) - 4
	prevPos := -1
	var prevMask uint32
	for i := 0; i < size; i++ {
		if buf[i]&0xfe != 0xe8 {
			continue
		}
		d := i - prevPos
		if d > 3 {
			prevMask = 0
		} else {
			prevMask = (prevMask << uint(d-1)) & 7
			if prevMask != 0 {
				b := buf[i+4-int(maskToBitNum[prevMask])]
				if !maskToAllowed[prevMask] || testMSByte(b) {
					prevPos = i
					prevMask = prevMask<<1 | 1
					continue
				}
			}
		}
		prevPos = i
		if testMSByte(buf[i+4]) {
			src := binary.LittleEndian.Uint32(buf[i+1:])
			var dest uint32
			for {
				dest = src - (start + uint32(i) + 5)
				if prevMask == 0 {
					break
				}
				j := maskToBitNum[prevMask] * 8
				b := byte(dest >> (24 - j))
				if !testMSByte(b) {
					break
				}
				src = dest ^ (1<<(32-j) - 1)
			}
			dest &= 0x01ffffff
			dest |= 0 - (dest & 0x01000000)
			binary.LittleEndian.PutUint32(buf[i+1:], dest)
			i += 4
		} else {
			prevMask = prevMask<<1 | 1
		}
	}
}

// trimELF checks that b starts with an x86-64 ELF executable and returns it
// without any data appended after the ELF's last header, section or segment.
func trimELF(b []byte) ([]byte, error) {
	f, err := elf.NewFile(bytes.NewReader(b))
	if err != nil {
		return nil, fmt.Errorf("result is not an ELF file: %w", err)
	}
	defer f.Close()
	if f.Class != elf.ELFCLASS64 || f.Machine != elf.EM_X86_64 {
		return nil, fmt.Errorf("result is a %v %v ELF, want ELFCLASS64 EM_X86_64", f.Class, f.Machine)
	}
	if f.Type != elf.ET_EXEC && f.Type != elf.ET_DYN {
		return nil, fmt.Errorf("result is an ELF of type %v, want an executable", f.Type)
	}
	if len(f.Progs) == 0 {
		return nil, errors.New("result ELF has no program headers")
	}
	var end uint64 = 64
	grow := func(e uint64) {
		if e > end {
			end = e
		}
	}
	for _, p := range f.Progs {
		grow(p.Off + p.Filesz)
	}
	for _, s := range f.Sections {
		if s.Type != elf.SHT_NOBITS {
			grow(s.Offset + s.FileSize)
		}
	}
	// The header table offsets are in the ELF header itself.
	phoff := binary.LittleEndian.Uint64(b[0x20:])
	shoff := binary.LittleEndian.Uint64(b[0x28:])
	phentsize, phnum := binary.LittleEndian.Uint16(b[0x36:]), binary.LittleEndian.Uint16(b[0x38:])
	shentsize, shnum := binary.LittleEndian.Uint16(b[0x3a:]), binary.LittleEndian.Uint16(b[0x3c:])
	grow(phoff + uint64(phentsize)*uint64(phnum))
	if shoff != 0 {
		grow(shoff + uint64(shentsize)*uint64(shnum))
	}
	if end > uint64(len(b)) {
		return nil, fmt.Errorf("ELF extends to %d bytes but only %d were decompressed", end, len(b))
	}
	return b[:end], nil
}
