// Command testreport is the console side of scripts/test.sh: it turns the
// `go test -json` stream of a step into short output (one line per package,
// or with -v the tests' start and result lines; the whole output of every
// failing test), keeps the stream and the plain text in private files, and
// at the end lists every skipped test of every step with its reason.
//
//	go test -json ./... 2>&1 | testreport stream [-v] [-module M] [-json FILE] [-log FILE]
//	testreport skips [-module M] LABEL=FILE...
//
// stream exits 1 when a test or a package failed, a build failed, or the
// stream ended before a package's result; skips exits 1 only when it cannot
// read a file.
package main

import (
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
)

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	var err error
	ok := true
	switch os.Args[1] {
	case "stream":
		ok, err = streamCmd(os.Args[2:], os.Stdin, os.Stdout)
	case "skips":
		err = skipsCmd(os.Args[2:], os.Stdout)
	default:
		usage()
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "testreport: %v\n", err)
		os.Exit(2)
	}
	if !ok {
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: testreport stream [-v] [-module M] [-json FILE] [-log FILE] < go-test-json\n       testreport skips [-module M] LABEL=FILE...")
	os.Exit(2)
}

// streamCmd runs the stream subcommand: it reports whether the stream held
// only passing and skipped tests.
func streamCmd(args []string, in io.Reader, console io.Writer) (bool, error) {
	fs := flag.NewFlagSet("stream", flag.ContinueOnError)
	verbose := fs.Bool("v", false, "print every test's start and result line")
	module := fs.String("module", "", "module path to shorten package names")
	jsonPath := fs.String("json", "", "write the stream as read to this file")
	logPath := fs.String("log", "", "write the plain test output to this file")
	if err := fs.Parse(args); err != nil {
		return false, err
	}
	s := newStreamer(console)
	s.verbose, s.module, s.logName = *verbose, *module, *logPath
	for _, f := range []struct {
		path string
		dst  *io.Writer
	}{{*jsonPath, &s.raw}, {*logPath, &s.text}} {
		if f.path == "" {
			continue
		}
		w, err := os.Create(f.path)
		if err != nil {
			return false, fmt.Errorf("creating %s: %w", f.path, err)
		}
		defer w.Close()
		*f.dst = w
	}
	return s.run(in)
}

// skipsCmd runs the skips subcommand over LABEL=FILE arguments; a file that
// does not exist (a step that never ran) is left out.
func skipsCmd(args []string, w io.Writer) error {
	fs := flag.NewFlagSet("skips", flag.ContinueOnError)
	module := fs.String("module", "", "module path to shorten package names")
	if err := fs.Parse(args); err != nil {
		return err
	}
	var all []skip
	for _, arg := range fs.Args() {
		label, path, ok := strings.Cut(arg, "=")
		if !ok {
			return fmt.Errorf("argument %q is not LABEL=FILE", arg)
		}
		f, err := os.Open(path)
		if os.IsNotExist(err) {
			continue
		}
		if err != nil {
			return fmt.Errorf("opening %s: %w", path, err)
		}
		skips, err := readSkips(f, label)
		f.Close()
		if err != nil {
			return fmt.Errorf("%s: %w", path, err)
		}
		all = append(all, skips...)
	}
	s := streamer{module: *module}
	fmt.Fprintf(w, "skipped tests: %d\n", len(all))
	for _, sk := range all {
		reason := sk.Reason
		if reason == "" {
			reason = "(no reason logged)"
		}
		fmt.Fprintf(w, "  %-6s %s %s: %s\n", sk.Label, s.short(sk.Package), sk.Test, reason)
	}
	return nil
}
