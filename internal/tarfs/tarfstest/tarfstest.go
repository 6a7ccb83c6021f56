// Package tarfstest builds tar streams for the tests of code that extracts
// them, hostile ones included, and checks that a directory tree outside an
// extraction stayed as it was. It is imported by tests only.
package tarfstest

import (
	"archive/tar"
	"bytes"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"
)

// MTime is the modification time Tar gives every entry.
var MTime = time.Date(2021, 6, 7, 8, 9, 10, 0, time.UTC)

// Entry is one member of a test archive.
type Entry struct {
	Name string
	// Type is a tar type flag; zero means a regular file.
	Type byte
	// Mode is the header's mode; zero means 0644, or 0755 for a directory.
	Mode int64
	Body string
	Link string
	// Size, when larger than Body, is the size the header claims: the
	// stream then ends after Body, in the middle of the entry.
	Size     int64
	Uid, Gid int
	// Devmajor and Devminor are the numbers of a device entry.
	Devmajor, Devminor int64
}

// Tar returns the entries as a tar stream.
func Tar(tb testing.TB, entries ...Entry) []byte {
	tb.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		h := &tar.Header{Name: e.Name, Linkname: e.Link, Typeflag: e.Type, Mode: e.Mode, ModTime: MTime,
			Uid: e.Uid, Gid: e.Gid, Devmajor: e.Devmajor, Devminor: e.Devminor, Format: tar.FormatPAX}
		if h.Typeflag == 0 {
			h.Typeflag = tar.TypeReg
		}
		if h.Mode == 0 {
			h.Mode = 0o644
			if h.Typeflag == tar.TypeDir {
				h.Mode = 0o755
			}
		}
		if h.Typeflag == tar.TypeReg {
			h.Size = max(int64(len(e.Body)), e.Size)
		}
		if err := tw.WriteHeader(h); err != nil {
			tb.Fatalf("tar header %q: %v", e.Name, err)
		}
		if _, err := io.WriteString(tw, e.Body); err != nil {
			tb.Fatalf("tar body %q: %v", e.Name, err)
		}
		if h.Size > int64(len(e.Body)) {
			return buf.Bytes() // truncated: no padding, no end marker
		}
	}
	if err := tw.Close(); err != nil {
		tb.Fatal(err)
	}
	return buf.Bytes()
}

// block is one 512-byte tar record.
type block [512]byte

// rawHeader returns a header record with name, type flag, mode 0644 and
// size, in the USTAR layout with GNU's magic when gnu is set, and its
// checksum filled in by finish.
func rawHeader(name string, typ byte, size int64, gnu bool) *block {
	var b block
	copy(b[0:100], name)
	copy(b[100:108], "0000644\x00")
	copy(b[108:116], "0000000\x00")
	copy(b[116:124], "0000000\x00")
	copy(b[124:136], fmt.Sprintf("%011o\x00", size))
	copy(b[136:148], fmt.Sprintf("%011o\x00", MTime.Unix()))
	b[156] = typ
	if gnu {
		copy(b[257:265], "ustar  \x00")
	} else {
		copy(b[257:265], "ustar\x0000")
	}
	return &b
}

// finish fills in the checksum.
func (b *block) finish() *block {
	copy(b[148:156], "        ")
	sum := 0
	for _, c := range b {
		sum += int(c)
	}
	copy(b[148:156], fmt.Sprintf("%06o\x00 ", sum))
	return b
}

// paxRecords encodes PAX extended header records.
func paxRecords(kv ...string) []byte {
	var out []byte
	for i := 0; i+1 < len(kv); i += 2 {
		rec := " " + kv[i] + "=" + kv[i+1] + "\n"
		n := len(rec)
		for len(strconv.Itoa(n))+len(rec) != n {
			n = len(strconv.Itoa(n)) + len(rec)
		}
		out = append(out, strconv.Itoa(n)+rec...)
	}
	return out
}

// padded appends data and zeros up to the next record boundary.
func padded(out, data []byte) []byte {
	out = append(out, data...)
	if r := len(data) % 512; r != 0 {
		out = append(out, make([]byte, 512-r)...)
	}
	return out
}

// Sparse returns a stream of the directory dir/ and one sparse file
// dir/big whose real size is size while the stream holds no data for it:
// extracted naively, a few hundred bytes become size bytes on disk. format
// is "pax0.1", "pax1.0" or "gnu" (the old GNU 'S' type).
func Sparse(tb testing.TB, dir string, size int64, format string) []byte {
	tb.Helper()
	out := Tar(tb, Entry{Name: dir + "/", Type: tar.TypeDir})
	out = out[:len(out)-1024] // drop the end-of-archive marker
	name := dir + "/big"
	switch format {
	case "pax0.1":
		recs := paxRecords("GNU.sparse.numblocks", "1", "GNU.sparse.offset", strconv.FormatInt(size, 10),
			"GNU.sparse.numbytes", "0", "GNU.sparse.size", strconv.FormatInt(size, 10))
		out = append(out, rawHeader("PaxHeaders/big", 'x', int64(len(recs)), false).finish()[:]...)
		out = padded(out, recs)
		out = append(out, rawHeader(name, '0', 0, false).finish()[:]...)
	case "pax1.0":
		recs := paxRecords("GNU.sparse.major", "1", "GNU.sparse.minor", "0", "GNU.sparse.name", name,
			"GNU.sparse.realsize", strconv.FormatInt(size, 10))
		out = append(out, rawHeader("PaxHeaders/big", 'x', int64(len(recs)), false).finish()[:]...)
		out = padded(out, recs)
		out = append(out, rawHeader(dir+"/GNUSparseFile.0/big", '0', 512, false).finish()[:]...)
		out = padded(out, []byte(fmt.Sprintf("1\n%d\n0\n", size)))
	case "gnu":
		h := rawHeader(name, 'S', 0, true)
		copy(h[386:398], fmt.Sprintf("%011o\x00", size)) // one fragment: offset size,
		copy(h[398:410], fmt.Sprintf("%011o\x00", 0))    // length 0
		copy(h[483:495], fmt.Sprintf("%011o\x00", size)) // real size
		out = append(out, h.finish()[:]...)
	default:
		tb.Fatalf("unknown sparse format %q", format)
	}
	return append(out, make([]byte, 1024)...)
}

// Case is a named hostile archive.
type Case struct {
	Name string
	Tar  []byte
}

// Escapes returns archives of a tree named top, each of which tries to
// create or change something outside the place top is extracted to:
// through "..", absolute names, symlinks the archive makes (absolute,
// relative, chained), hard links, or an entry named after another top.
// outside is an absolute path next to the destination, and sentinel a file
// in the directory that holds the destination. Every one must be refused
// and leave everything outside top's place as it was.
func Escapes(tb testing.TB, top, outside, sentinel string) []Case {
	tb.Helper()
	d := Entry{Name: top + "/", Type: tar.TypeDir}
	sym := func(name, link string) Entry { return Entry{Name: top + "/" + name, Type: tar.TypeSymlink, Link: link} }
	file := func(name string) Entry { return Entry{Name: top + "/" + name, Body: "pwned\n"} }
	hard := func(name, link string) Entry { return Entry{Name: top + "/" + name, Type: tar.TypeLink, Link: link} }
	cases := []struct {
		name    string
		entries []Entry
	}{
		// The reported attack: s points at the directory holding the copy.
		{"symlink to parent then a file through it", []Entry{d, sym("s", ".."), file("s/.bashrc")}},
		{"symlink to parent then a directory through it", []Entry{d, sym("s", ".."), {Name: top + "/s/newdir/", Type: tar.TypeDir}}},
		{"symlink to parent then a symlink through it", []Entry{d, sym("s", ".."), sym("s/l", "/")}},
		{"symlink to grandparent", []Entry{d, sym("s", "../.."), file("s/pwned")}},
		{"absolute symlink", []Entry{d, sym("s", outside), file("s/pwned")}},
		{"relative symlink out", []Entry{d, sym("s", "../"+filepath.Base(outside)), file("s/pwned")}},
		{"symlink chain", []Entry{d, sym("a", "b"), sym("b", "c"), sym("c", ".."), file("a/pwned")}},
		{"symlink chain through a directory", []Entry{d, {Name: top + "/d/", Type: tar.TypeDir}, sym("d/up", ".."), sym("l", "d/up/.."), file("l/pwned")}},
		{"symlink with dotdot inside", []Entry{d, {Name: top + "/d/", Type: tar.TypeDir}, sym("l", "d/../.."), file("l/pwned")}},
		{"hard link with dotdot", []Entry{d, hard("h", top+"/../"+filepath.Base(sentinel))}},
		{"hard link absolute", []Entry{d, hard("h", sentinel)}},
		{"hard link through an archive symlink", []Entry{d, sym("s", ".."), hard("h", top+"/s/"+filepath.Base(sentinel))}},
		{"hard link to an archive symlink then through it", []Entry{d, sym("s", ".."), hard("h", top+"/s"), file("h/pwned")}},
		{"dotdot name", []Entry{d, {Name: top + "/../pwned", Body: "x"}}},
		{"deep dotdot name", []Entry{d, {Name: top + "/x/", Type: tar.TypeDir}, {Name: top + "/x/../../pwned", Body: "x"}}},
		{"absolute name", []Entry{d, {Name: outside + "/pwned", Body: "x"}}},
	}
	var out []Case
	for _, c := range cases {
		out = append(out, Case{Name: c.name, Tar: Tar(tb, c.entries...)})
	}
	return out
}

// Surround fills dir with what an extraction next to it must leave
// alone: a file "sentinel" and a directory "outside" holding a file
// "target" (both saying "keep\n"). It returns their paths.
func Surround(tb testing.TB, dir string) (sentinel, outside string) {
	tb.Helper()
	sentinel, outside = filepath.Join(dir, "sentinel"), filepath.Join(dir, "outside")
	for _, err := range []error{
		os.WriteFile(sentinel, []byte("keep\n"), 0o644),
		os.Mkdir(outside, 0o755),
		os.WriteFile(filepath.Join(outside, "target"), []byte("keep\n"), 0o644),
	} {
		if err != nil {
			tb.Fatal(err)
		}
	}
	return sentinel, outside
}

// Tree describes every file, directory and link at and below dir, except
// the paths listed in skip and what is below them: path (relative to dir)
// → type, mode, owner, content or link target, and the time of directories
// that hold no skipped path. Comparing two Trees
// shows whether anything was created, removed or changed.
func Tree(tb testing.TB, dir string, skip ...string) map[string]string {
	tb.Helper()
	out := map[string]string{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		for _, s := range skip {
			if p == s {
				if d.IsDir() {
					return filepath.SkipDir
				}
				return nil
			}
		}
		fi, err := os.Lstat(p)
		if err != nil {
			return err
		}
		desc := fmt.Sprintf("%v %s", fi.Mode(), owner(fi))
		switch {
		case fi.Mode()&fs.ModeSymlink != 0:
			l, _ := os.Readlink(p)
			desc += " -> " + l
		case fi.Mode().IsRegular():
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			desc += fmt.Sprintf(" %q", b)
		case fi.IsDir() && !holds(p, skip):
			// (The time of a directory that holds a skipped path changes
			// when that path is made.)
			desc += " " + fi.ModTime().UTC().Format(time.RFC3339Nano)
		}
		rel, _ := filepath.Rel(dir, p)
		out[rel] = desc
		return nil
	})
	if err != nil {
		tb.Fatalf("walking %s: %v", dir, err)
	}
	return out
}

// holds reports whether one of paths is below dir.
func holds(dir string, paths []string) bool {
	for _, p := range paths {
		if strings.HasPrefix(p, dir+string(filepath.Separator)) {
			return true
		}
	}
	return false
}

// SameTree fails tb with the differences when before and after (two Trees)
// differ.
func SameTree(tb testing.TB, what string, before, after map[string]string) {
	tb.Helper()
	var diffs []string
	for p, b := range before {
		if a, ok := after[p]; !ok {
			diffs = append(diffs, fmt.Sprintf("%s removed (was %s)", p, b))
		} else if a != b {
			diffs = append(diffs, fmt.Sprintf("%s changed: %s → %s", p, b, a))
		}
	}
	for p, a := range after {
		if _, ok := before[p]; !ok {
			diffs = append(diffs, fmt.Sprintf("%s appeared: %s", p, a))
		}
	}
	sort.Strings(diffs)
	if len(diffs) > 0 {
		tb.Errorf("%s: outside the destination:\n  %s", what, strings.Join(diffs, "\n  "))
	}
}
