package qemu

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"
)

// A checkpoint is a live (precopy) migration of the VM into noid-server
// itself. QEMU writes its migration stream to a pipe; splitStream reads it
// and splits it in two:
//
//   - the pages of the guest RAM block go into a flat memory file at their
//     offsets (a page sent again in a later pass overwrites the earlier
//     one, a zero page leaves a hole), which a restore maps MAP_PRIVATE;
//   - everything else (the RAM section's block list, the pages of the small
//     ROM blocks, the device state) goes unchanged into the state file.
//
// The state file is then a valid migration stream without guest RAM pages:
// a QEMU started with its RAM mapped from the memory file loads it in
// milliseconds, and the RAM it does not send keeps the file's content.
//
// The format read here is QEMU's (migration/savevm.c, migration/ram.c):
// a header ("QEVM", version 3), an optional configuration section, then
// sections of the "ram" iterable (START with the block list, PART and END
// with page records, each ending with an EOS flag and a footer), commands
// to the destination (copied through), and from
// the first section of any other kind on, the device state, which is
// copied through without being parsed. Only the page record flags QEMU
// uses without compression, XBZRLE, RDMA or multifd are accepted;
// anything else fails the checkpoint with a clear error.

// Migration stream constants.
const (
	streamMagic   = 0x5145564d // "QEVM"
	streamVersion = 3

	secEOF           = 0x00
	secStart         = 0x01
	secPart          = 0x02
	secEnd           = 0x03
	secFull          = 0x04
	secSubsection    = 0x05
	secConfiguration = 0x07
	secCommand       = 0x08
	secFooter        = 0x7e

	ramFlagZero         = 0x002
	ramFlagMemSize      = 0x004
	ramFlagPage         = 0x008
	ramFlagEOS          = 0x010
	ramFlagContinue     = 0x020
	ramFlagXBZRLE       = 0x040
	ramFlagHook         = 0x080
	ramFlagCompress     = 0x100
	ramFlagMultifdFlush = 0x200

	pageSize = 4096
)

// ramBlockName is the RAMBlock id of the guest RAM: the id of the memory
// backend object the machine uses (see args).
const ramBlockName = "ram"

// streamStats counts what splitStream saw.
type streamStats struct {
	// Pages and ZeroPages count the guest RAM page records (with data,
	// and zero), passes included.
	Pages, ZeroPages int64
	// StateBytes is the size of the state stream written.
	StateBytes int64
}

// streamReader reads the big-endian fields of a migration stream.
type streamReader struct {
	r   *bufio.Reader
	off int64
	buf [8]byte
}

func (s *streamReader) full(b []byte) error {
	n, err := io.ReadFull(s.r, b)
	s.off += int64(n)
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return fmt.Errorf("the migration stream ended at byte %d: %w", s.off, io.ErrUnexpectedEOF)
	}
	return err
}

func (s *streamReader) u8() (byte, error) {
	b, err := s.r.ReadByte()
	if err == nil {
		s.off++
	} else if errors.Is(err, io.EOF) {
		err = fmt.Errorf("the migration stream ended at byte %d: %w", s.off, io.ErrUnexpectedEOF)
	}
	return b, err
}

func (s *streamReader) be32() (uint32, error) {
	if err := s.full(s.buf[:4]); err != nil {
		return 0, err
	}
	return binary.BigEndian.Uint32(s.buf[:4]), nil
}

func (s *streamReader) be64() (uint64, error) {
	if err := s.full(s.buf[:8]); err != nil {
		return 0, err
	}
	return binary.BigEndian.Uint64(s.buf[:8]), nil
}

// idstr reads a length-prefixed (one byte) name.
func (s *streamReader) idstr() ([]byte, error) {
	n, err := s.u8()
	if err != nil {
		return nil, err
	}
	b := make([]byte, n)
	return b, s.full(b)
}

// memWriter writes guest RAM pages into the memory file, coalescing runs
// of consecutive pages into one write, and remembers which pages hold data
// so that a page that becomes zero in a later pass is zeroed again.
type memWriter struct {
	f       *os.File
	size    int64
	written []uint64 // a bit per page with data in the file
	run     []byte
	runOff  int64
}

func newMemWriter(f *os.File, size int64) *memWriter {
	return &memWriter{f: f, size: size, written: make([]uint64, (size/pageSize+63)/64), run: make([]byte, 0, 1<<20)}
}

func (m *memWriter) check(off int64) error {
	if off < 0 || off+pageSize > m.size || off%pageSize != 0 {
		return fmt.Errorf("a RAM page at offset %#x is outside the guest's %d bytes", off, m.size)
	}
	return nil
}

func (m *memWriter) page(off int64, data []byte) error {
	if err := m.check(off); err != nil {
		return err
	}
	if len(m.run) > 0 && (off != m.runOff+int64(len(m.run)) || len(m.run)+pageSize > cap(m.run)) {
		if err := m.flush(); err != nil {
			return err
		}
	}
	if len(m.run) == 0 {
		m.runOff = off
	}
	m.run = append(m.run, data...)
	p := off / pageSize
	m.written[p/64] |= 1 << (p % 64)
	return nil
}

func (m *memWriter) zero(off int64) error {
	if err := m.check(off); err != nil {
		return err
	}
	p := off / pageSize
	if m.written[p/64]&(1<<(p%64)) == 0 {
		return nil // still a hole
	}
	if err := m.flush(); err != nil {
		return err
	}
	m.written[p/64] &^= 1 << (p % 64)
	if err := unix.Fallocate(int(m.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, pageSize); err != nil {
		// Without hole punching, write the zeros.
		if _, err := m.f.WriteAt(make([]byte, pageSize), off); err != nil {
			return fmt.Errorf("zeroing a RAM page at %#x: %w", off, err)
		}
	}
	return nil
}

func (m *memWriter) flush() error {
	if len(m.run) == 0 {
		return nil
	}
	if _, err := m.f.WriteAt(m.run, m.runOff); err != nil {
		return fmt.Errorf("writing RAM pages at %#x: %w", m.runOff, err)
	}
	m.run = m.run[:0]
	return nil
}

// splitStream reads QEMU's migration stream from r until its end, writes
// the pages of the guest RAM block (memSize bytes) into mem (an empty file
// of that size) and the rest of the stream to state.
func splitStream(ctx context.Context, r io.Reader, mem *os.File, memSize int64, state io.Writer) (streamStats, error) {
	var st streamStats
	sr := &streamReader{r: bufio.NewReaderSize(r, 1<<20)}
	bw := bufio.NewWriterSize(state, 256<<10)
	mw := newMemWriter(mem, memSize)
	out := func(b ...[]byte) {
		for _, p := range b {
			bw.Write(p)
			st.StateBytes += int64(len(p))
		}
	}
	be32b := func(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }
	be64b := func(v uint64) []byte { return binary.BigEndian.AppendUint64(nil, v) }

	magic, err := sr.be32()
	if err != nil {
		return st, err
	}
	version, err := sr.be32()
	if err != nil {
		return st, err
	}
	if magic != streamMagic || version != streamVersion {
		return st, fmt.Errorf("not a QEMU migration stream (magic %#x, version %d)", magic, version)
	}
	out(be32b(magic), be32b(version))
	sections := map[uint32]string{}
	var last []byte // the RAM block of the previous page record
	page := make([]byte, pageSize)

	// ramRecords copies or consumes the page records of one RAM section up
	// to its EOS.
	ramRecords := func() error {
		for {
			if err := ctx.Err(); err != nil {
				return err
			}
			h, err := sr.be64()
			if err != nil {
				return err
			}
			flags, addr := h&(pageSize-1), int64(h&^(pageSize-1))
			if flags&ramFlagEOS != 0 {
				out(be64b(h))
				return nil
			}
			if flags&(ramFlagXBZRLE|ramFlagHook|ramFlagCompress|ramFlagMemSize) != 0 {
				return fmt.Errorf("the migration stream has a RAM record with flags %#x that noid does not read (compression, XBZRLE, RDMA?)", flags)
			}
			if flags&ramFlagMultifdFlush != 0 && flags&(ramFlagPage|ramFlagZero) == 0 {
				out(be64b(h))
				continue
			}
			var id []byte
			if flags&ramFlagContinue == 0 {
				if last, err = sr.idstr(); err != nil {
					return err
				}
				id = append([]byte{byte(len(last))}, last...)
			} else if last == nil {
				return errors.New("the migration stream continues a RAM block it never named")
			}
			ours := string(last) == ramBlockName
			switch {
			case flags&ramFlagZero != 0:
				fill, err := sr.u8()
				if err != nil {
					return err
				}
				if ours {
					if fill != 0 {
						return fmt.Errorf("a RAM page at %#x is filled with %#x, not zero", addr, fill)
					}
					st.ZeroPages++
					if err := mw.zero(addr); err != nil {
						return err
					}
				} else {
					out(be64b(h), id, []byte{fill})
				}
			case flags&ramFlagPage != 0:
				if err := sr.full(page); err != nil {
					return err
				}
				if ours {
					st.Pages++
					if err := mw.page(addr, page); err != nil {
						return err
					}
				} else {
					out(be64b(h), id, page)
				}
			default:
				return fmt.Errorf("the migration stream has a RAM record with flags %#x", flags)
			}
		}
	}
	footer := func(sid uint32) error {
		b, err := sr.r.Peek(1)
		if err != nil || b[0] != secFooter {
			return nil // streams without section footers
		}
		sr.u8()
		fid, err := sr.be32()
		if err != nil {
			return err
		}
		if fid != sid {
			return fmt.Errorf("section %d ends with the footer of section %d", sid, fid)
		}
		out([]byte{secFooter}, be32b(fid))
		return nil
	}

	for {
		t, err := sr.u8()
		if err != nil {
			return st, err
		}
		switch t {
		case secConfiguration:
			n, err := sr.be32()
			if err != nil {
				return st, err
			}
			if n > 256 {
				return st, fmt.Errorf("the migration stream names a %d-byte machine type", n)
			}
			name := make([]byte, n)
			if err := sr.full(name); err != nil {
				return st, err
			}
			out([]byte{t}, be32b(n), name)
			if b, err := sr.r.Peek(1); err == nil && b[0] == secSubsection {
				return st, errors.New("the migration stream's configuration has subsections (validated capabilities?), which noid does not read")
			}
		case secStart:
			sid, err := sr.be32()
			if err != nil {
				return st, err
			}
			id, err := sr.idstr()
			if err != nil {
				return st, err
			}
			inst, err := sr.be32()
			if err != nil {
				return st, err
			}
			ver, err := sr.be32()
			if err != nil {
				return st, err
			}
			out([]byte{t}, be32b(sid), []byte{byte(len(id))}, id, be32b(inst), be32b(ver))
			if string(id) != "ram" {
				return st, fmt.Errorf("the migration stream has an iterable section %q besides RAM (block migration?), which noid does not read", id)
			}
			sections[sid] = "ram"
			total, err := sr.be64()
			if err != nil {
				return st, err
			}
			if total&ramFlagMemSize == 0 {
				return st, errors.New("the RAM section does not start with its size")
			}
			out(be64b(total))
			total &^= pageSize - 1
			found := false
			for seen := uint64(0); seen < total; {
				name, err := sr.idstr()
				if err != nil {
					return st, err
				}
				used, err := sr.be64()
				if err != nil {
					return st, err
				}
				out([]byte{byte(len(name))}, name, be64b(used))
				if string(name) == ramBlockName {
					if int64(used) != memSize {
						return st, fmt.Errorf("the guest RAM block has %d bytes, the VM %d", used, memSize)
					}
					found = true
				}
				seen += used
			}
			if !found {
				return st, fmt.Errorf("the migration stream has no RAM block %q", ramBlockName)
			}
			if err := ramRecords(); err != nil {
				return st, err
			}
			if err := footer(sid); err != nil {
				return st, err
			}
		case secPart, secEnd:
			sid, err := sr.be32()
			if err != nil {
				return st, err
			}
			if sections[sid] != "ram" {
				return st, fmt.Errorf("the migration stream continues section %d, which it never started", sid)
			}
			out([]byte{t}, be32b(sid))
			if err := ramRecords(); err != nil {
				return st, err
			}
			if err := footer(sid); err != nil {
				return st, err
			}
		case secCommand:
			// A command to the destination (QEMU 10 sends one before the
			// switchover): copied through. Its length is in the stream.
			var hdr [4]byte
			if err := sr.full(hdr[:]); err != nil {
				return st, err
			}
			payload := make([]byte, binary.BigEndian.Uint16(hdr[2:]))
			if err := sr.full(payload); err != nil {
				return st, err
			}
			out([]byte{t}, hdr[:], payload)
		case secFull, secEOF:
			// The device state: copied through to the end.
			if err := mw.flush(); err != nil {
				return st, err
			}
			out([]byte{t})
			if err := bw.Flush(); err != nil {
				return st, fmt.Errorf("writing the state file: %w", err)
			}
			n, err := io.Copy(state, sr.r)
			st.StateBytes += n
			if err != nil {
				return st, fmt.Errorf("copying the device state: %w", err)
			}
			if t == secEOF && n == 0 && st.Pages == 0 && st.ZeroPages == 0 {
				return st, errors.New("the migration stream ended before it sent any state")
			}
			return st, nil
		default:
			return st, fmt.Errorf("the migration stream has a section of type %#x at byte %d, which noid does not read", t, sr.off-1)
		}
	}
}
