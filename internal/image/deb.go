package image

import (
	"archive/tar"
	"bufio"
	"bytes"
	"compress/bzip2"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"

	"github.com/klauspost/compress/zstd"
	"github.com/ulikunitz/xz"
	"github.com/ulikunitz/xz/lzma"
)

// A .deb is an ar(1) archive holding debian-binary, control.tar.* and
// data.tar.*. This file reads it without dpkg.

const arMagic = "!<arch>\n"

// arEntry is one member of an ar archive, positioned for reading.
type arEntry struct {
	Name string
	Size int64
}

// arReader iterates the members of an ar archive.
type arReader struct {
	r         *bufio.Reader
	remaining int64 // unread bytes of the current member
	pad       bool  // current member has an odd size: one padding byte follows
}

func newArReader(r io.Reader) (*arReader, error) {
	br := bufio.NewReaderSize(r, 1<<16)
	magic := make([]byte, len(arMagic))
	if _, err := io.ReadFull(br, magic); err != nil {
		return nil, fmt.Errorf("read ar magic: %w", err)
	}
	if string(magic) != arMagic {
		return nil, errors.New("not an ar archive (bad magic)")
	}
	return &arReader{r: br}, nil
}

// Next skips to the next member and returns its header. It returns io.EOF
// after the last member.
func (a *arReader) Next() (*arEntry, error) {
	if a.remaining > 0 {
		if _, err := io.CopyN(io.Discard, a.r, a.remaining); err != nil {
			return nil, fmt.Errorf("skip ar member: %w", err)
		}
		a.remaining = 0
	}
	if a.pad {
		if _, err := a.r.ReadByte(); err != nil {
			return nil, fmt.Errorf("skip ar padding: %w", err)
		}
		a.pad = false
	}
	var hdr [60]byte
	n, err := io.ReadFull(a.r, hdr[:])
	if err == io.EOF && n == 0 {
		return nil, io.EOF
	}
	if err != nil {
		return nil, fmt.Errorf("read ar header: %w", err)
	}
	if hdr[58] != '`' || hdr[59] != '\n' {
		return nil, errors.New("corrupt ar header (bad terminator)")
	}
	name := strings.TrimRight(string(hdr[0:16]), " ")
	name = strings.TrimSuffix(name, "/") // GNU ar terminates names with '/'
	size, err := strconv.ParseInt(strings.TrimSpace(string(hdr[48:58])), 10, 64)
	if err != nil || size < 0 {
		return nil, fmt.Errorf("corrupt ar header: bad size %q", hdr[48:58])
	}
	a.remaining = size
	a.pad = size%2 == 1
	return &arEntry{Name: name, Size: size}, nil
}

// Read reads from the current member.
func (a *arReader) Read(p []byte) (int, error) {
	if a.remaining <= 0 {
		return 0, io.EOF
	}
	if int64(len(p)) > a.remaining {
		p = p[:a.remaining]
	}
	n, err := a.r.Read(p)
	a.remaining -= int64(n)
	if err == io.EOF && a.remaining > 0 {
		err = io.ErrUnexpectedEOF
	}
	return n, err
}

// decompressByName wraps r in the decompressor implied by the file name's
// suffix (.xz, .zst, .gz, .bz2, .lzma, or none). The returned close function
// releases decoder resources.
func decompressByName(name string, r io.Reader) (io.Reader, func(), error) {
	nop := func() {}
	switch {
	case strings.HasSuffix(name, ".xz"):
		xr, err := xz.NewReader(r)
		if err != nil {
			return nil, nil, fmt.Errorf("xz: %w", err)
		}
		return xr, nop, nil
	case strings.HasSuffix(name, ".zst"):
		zr, err := zstd.NewReader(r, zstd.WithDecoderConcurrency(1))
		if err != nil {
			return nil, nil, fmt.Errorf("zstd: %w", err)
		}
		return zr, zr.Close, nil
	case strings.HasSuffix(name, ".gz"):
		gr, err := gzip.NewReader(r)
		if err != nil {
			return nil, nil, fmt.Errorf("gzip: %w", err)
		}
		return gr, func() { gr.Close() }, nil
	case strings.HasSuffix(name, ".bz2"):
		return bzip2.NewReader(r), nop, nil
	case strings.HasSuffix(name, ".lzma"):
		lr, err := lzma.NewReader(r)
		if err != nil {
			return nil, nil, fmt.Errorf("lzma: %w", err)
		}
		return lr, nop, nil
	case strings.HasSuffix(name, ".tar"), !strings.Contains(name, "."):
		return r, nop, nil
	}
	return nil, nil, fmt.Errorf("unsupported compression for %q", name)
}

// walkDebTar calls fn for every entry of the .deb member whose name starts with
// member ("control.tar" or "data.tar"). Entry names are normalised to start
// with "/" ("./boot/x" becomes "/boot/x"). fn may read the entry's content from
// r; returning errStopWalk ends the walk early without error.
func walkDebTar(ctx context.Context, debPath, member string, fn func(name string, hdr *tar.Header, r io.Reader) error) error {
	f, err := os.Open(debPath)
	if err != nil {
		return fmt.Errorf("open deb: %w", err)
	}
	defer f.Close()
	ar, err := newArReader(f)
	if err != nil {
		return fmt.Errorf("%s: %w", debPath, err)
	}
	for {
		e, err := ar.Next()
		if err == io.EOF {
			return fmt.Errorf("%s: no %s.* member", debPath, member)
		}
		if err != nil {
			return fmt.Errorf("%s: %w", debPath, err)
		}
		if !strings.HasPrefix(e.Name, member) {
			continue
		}
		dr, closeFn, err := decompressByName(e.Name, bufio.NewReaderSize(ar, 1<<20))
		if err != nil {
			return fmt.Errorf("%s: %s: %w", debPath, e.Name, err)
		}
		defer closeFn()
		tr := tar.NewReader(dr)
		for {
			if err := ctx.Err(); err != nil {
				return err
			}
			hdr, err := tr.Next()
			if err == io.EOF {
				return nil
			}
			if err != nil {
				return fmt.Errorf("%s: %s: %w", debPath, e.Name, err)
			}
			name := "/" + strings.TrimPrefix(strings.TrimPrefix(hdr.Name, "."), "/")
			if err := fn(name, hdr, tr); err != nil {
				if errors.Is(err, errStopWalk) {
					return nil
				}
				return err
			}
		}
	}
}

// errStopWalk ends walkDebTar early.
var errStopWalk = errors.New("stop walk")

// debControl returns the fields of the package's control file (Package,
// Version, Depends, ...). Continuation lines are joined.
func debControl(ctx context.Context, debPath string) (map[string]string, error) {
	var control []byte
	err := walkDebTar(ctx, debPath, "control.tar", func(name string, hdr *tar.Header, r io.Reader) error {
		if name != "/control" {
			return nil
		}
		b, err := io.ReadAll(io.LimitReader(r, 1<<20))
		if err != nil {
			return fmt.Errorf("read control: %w", err)
		}
		control = b
		return errStopWalk
	})
	if err != nil {
		return nil, err
	}
	if control == nil {
		return nil, fmt.Errorf("%s: control.tar has no control file", debPath)
	}
	return parseControl(control), nil
}

// parseControl parses one RFC822-style Debian control stanza.
func parseControl(b []byte) map[string]string {
	fields := map[string]string{}
	var last string
	for _, line := range bytes.Split(b, []byte("\n")) {
		s := string(line)
		if s == "" {
			continue
		}
		if (s[0] == ' ' || s[0] == '\t') && last != "" {
			fields[last] += "\n" + strings.TrimSpace(s)
			continue
		}
		k, v, ok := strings.Cut(s, ":")
		if !ok {
			continue
		}
		last = strings.TrimSpace(k)
		fields[last] = strings.TrimSpace(v)
	}
	return fields
}
