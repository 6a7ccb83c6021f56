package image

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"path"
	"strconv"
	"strings"
)

// The Linux initramfs format is a "newc" (SVR4, no CRC) cpio archive:
// a 110-byte ASCII header ("070701" + 13 eight-digit hex fields), the
// NUL-terminated name padded to a multiple of 4, then the data padded to a
// multiple of 4. The archive ends with an entry named "TRAILER!!!".

const (
	cpioNewcMagic = "070701"
	cpioTrailer   = "TRAILER!!!"
	cpioHeaderLen = 110

	// Mode type bits (from <sys/stat.h>), as stored in the cpio mode field.
	modeDir     = 0o040000
	modeFile    = 0o100000
	modeSymlink = 0o120000
	modeCharDev = 0o020000
	modeBlkDev  = 0o060000
	modeFIFO    = 0o010000
	modeTypeMsk = 0o170000
)

// cpioEntry is one member of a newc cpio archive.
type cpioEntry struct {
	Name      string // without a leading '/'
	Mode      uint32 // type bits | permission bits
	UID, GID  uint32
	Mtime     uint32
	Data      []byte // file content, or the target of a symlink
	RdevMajor uint32
	RdevMinor uint32
}

// cpioWriter writes a newc archive. Entries are written in the order given;
// missing parent directories are created (mode 0755) before their first
// child, since the kernel's unpacker needs the parents to exist. All
// timestamps are the writer's Mtime so the output is reproducible.
type cpioWriter struct {
	w     *bufio.Writer
	off   int64
	ino   uint32
	dirs  map[string]bool
	Mtime uint32
}

func newCpioWriter(w io.Writer) *cpioWriter {
	return &cpioWriter{w: bufio.NewWriterSize(w, 1<<16), dirs: map[string]bool{"": true, ".": true}}
}

func cleanCpioName(name string) (string, error) {
	n := strings.TrimPrefix(path.Clean("/"+name), "/")
	if n == "" || n == cpioTrailer {
		return "", fmt.Errorf("invalid cpio entry name %q", name)
	}
	return n, nil
}

func (c *cpioWriter) ensureParents(name string) error {
	dir := path.Dir(name)
	if c.dirs[dir] {
		return nil
	}
	if err := c.ensureParents(dir); err != nil {
		return err
	}
	return c.write(cpioEntry{Name: dir, Mode: modeDir | 0o755})
}

// Add writes e, creating missing parent directories first. Adding the same
// directory twice is a no-op.
func (c *cpioWriter) Add(e cpioEntry) error {
	name, err := cleanCpioName(e.Name)
	if err != nil {
		return err
	}
	e.Name = name
	if e.Mode&modeTypeMsk == modeDir && c.dirs[name] {
		return nil
	}
	if err := c.ensureParents(name); err != nil {
		return err
	}
	return c.write(e)
}

// Dir adds a directory.
func (c *cpioWriter) Dir(name string, perm fs.FileMode) error {
	return c.Add(cpioEntry{Name: name, Mode: modeDir | uint32(perm.Perm()) | unixSpecialBits(perm)})
}

// File adds a regular file.
func (c *cpioWriter) File(name string, perm fs.FileMode, data []byte) error {
	return c.Add(cpioEntry{Name: name, Mode: modeFile | uint32(perm.Perm()) | unixSpecialBits(perm), Data: data})
}

// Symlink adds a symbolic link.
func (c *cpioWriter) Symlink(name, target string) error {
	return c.Add(cpioEntry{Name: name, Mode: modeSymlink | 0o777, Data: []byte(target)})
}

// CharDev adds a character device node.
func (c *cpioWriter) CharDev(name string, perm fs.FileMode, major, minor uint32) error {
	return c.Add(cpioEntry{Name: name, Mode: modeCharDev | uint32(perm.Perm()), RdevMajor: major, RdevMinor: minor})
}

func unixSpecialBits(m fs.FileMode) uint32 {
	var b uint32
	if m&fs.ModeSetuid != 0 {
		b |= 0o4000
	}
	if m&fs.ModeSetgid != 0 {
		b |= 0o2000
	}
	if m&fs.ModeSticky != 0 {
		b |= 0o1000
	}
	return b
}

func (c *cpioWriter) write(e cpioEntry) error {
	c.ino++
	nlink := uint32(1)
	if e.Mode&modeTypeMsk == modeDir {
		nlink = 2
		c.dirs[e.Name] = true
	}
	mtime := e.Mtime
	if mtime == 0 {
		mtime = c.Mtime
	}
	return c.writeRaw(e.Name, c.ino, e.Mode, e.UID, e.GID, nlink, mtime, e.Data, e.RdevMajor, e.RdevMinor)
}

func (c *cpioWriter) writeRaw(name string, ino, mode, uid, gid, nlink, mtime uint32, data []byte, rmaj, rmin uint32) error {
	if uint64(len(data)) > 0xffffffff {
		return fmt.Errorf("cpio: %s is too large for newc (%d bytes)", name, len(data))
	}
	hdr := fmt.Sprintf("%s%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x",
		cpioNewcMagic, ino, mode, uid, gid, nlink, mtime, len(data),
		0, 0, rmaj, rmin, len(name)+1, 0)
	for _, chunk := range [][]byte{[]byte(hdr), []byte(name), {0}} {
		if err := c.put(chunk); err != nil {
			return err
		}
	}
	if err := c.pad4(); err != nil {
		return err
	}
	if err := c.put(data); err != nil {
		return err
	}
	return c.pad4()
}

func (c *cpioWriter) put(b []byte) error {
	n, err := c.w.Write(b)
	c.off += int64(n)
	if err != nil {
		return fmt.Errorf("cpio write: %w", err)
	}
	return nil
}

func (c *cpioWriter) pad4() error {
	if r := c.off % 4; r != 0 {
		return c.put(make([]byte, 4-r))
	}
	return nil
}

// Close writes the trailer, pads the archive to a multiple of 512 bytes and
// flushes. It does not close the underlying writer.
func (c *cpioWriter) Close() error {
	if err := c.writeRaw(cpioTrailer, 0, 0, 0, 0, 1, 0, nil, 0, 0); err != nil {
		return err
	}
	if r := c.off % 512; r != 0 {
		if err := c.put(make([]byte, 512-r)); err != nil {
			return err
		}
	}
	if err := c.w.Flush(); err != nil {
		return fmt.Errorf("cpio flush: %w", err)
	}
	return nil
}

// readCpio parses a newc archive up to its trailer.
func readCpio(r io.Reader) ([]cpioEntry, error) {
	br := bufio.NewReader(r)
	var off int64
	read := func(n int) ([]byte, error) {
		b := make([]byte, n)
		k, err := io.ReadFull(br, b)
		off += int64(k)
		return b, err
	}
	skipPad := func() error {
		if rem := off % 4; rem != 0 {
			_, err := read(int(4 - rem))
			return err
		}
		return nil
	}
	var out []cpioEntry
	for {
		hdr, err := read(cpioHeaderLen)
		if err != nil {
			return nil, fmt.Errorf("cpio header at %d: %w", off, err)
		}
		if string(hdr[:6]) != cpioNewcMagic {
			return nil, fmt.Errorf("cpio: bad magic %q at offset %d", hdr[:6], off-cpioHeaderLen)
		}
		var f [13]uint32
		for i := range f {
			v, err := strconv.ParseUint(string(hdr[6+8*i:14+8*i]), 16, 32)
			if err != nil {
				return nil, fmt.Errorf("cpio: bad header field %d: %w", i, err)
			}
			f[i] = uint32(v)
		}
		nameb, err := read(int(f[11]))
		if err != nil {
			return nil, fmt.Errorf("cpio name: %w", err)
		}
		if len(nameb) == 0 || nameb[len(nameb)-1] != 0 {
			return nil, errors.New("cpio: name not NUL-terminated")
		}
		name := string(nameb[:len(nameb)-1])
		if err := skipPad(); err != nil {
			return nil, err
		}
		data, err := read(int(f[6]))
		if err != nil {
			return nil, fmt.Errorf("cpio data of %s: %w", name, err)
		}
		if err := skipPad(); err != nil {
			return nil, err
		}
		if name == cpioTrailer {
			return out, nil
		}
		out = append(out, cpioEntry{
			Name: name, Mode: f[1], UID: f[2], GID: f[3], Mtime: f[5], Data: data,
			RdevMajor: f[9], RdevMinor: f[10],
		})
	}
}
