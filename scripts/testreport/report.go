package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"regexp"
	"sort"
	"strings"
)

// event is one line of `go test -json` (cmd/test2json, with the build
// events of Go 1.24+).
type event struct {
	Action      string
	Package     string
	Test        string
	Elapsed     float64
	Output      string
	ImportPath  string
	FailedBuild string
}

// testKey names one test of one package.
type testKey struct{ pkg, test string }

// maxFailLines bounds how much of one failing test's output reaches the
// console; the whole output is in the text log.
const maxFailLines = 200

var (
	// frameworkLine matches the lines the testing package writes around a
	// test's own output.
	frameworkLine = regexp.MustCompile(`^\s*(=== (RUN|PAUSE|CONT|NAME)|--- (PASS|FAIL|SKIP)):? `)
	// progressLine is what -v shows of a test: its start and its result.
	progressLine = regexp.MustCompile(`^\s*(=== RUN|--- (PASS|FAIL|SKIP)):? `)
	// pkgSummaryLine matches the lines go test writes at a package's end,
	// which the console says in its own words.
	pkgSummaryLine = regexp.MustCompile(`^(PASS|FAIL|(ok|FAIL)\s+\S+\s.*|exit status \d+)$`)
	// logStart matches the first line of a t.Log (and so t.Skip) message.
	logStart = regexp.MustCompile(`^\s+[^\s:]+\.go:\d+: ?`)
)

// streamer turns a `go test -json` stream into short console output.
type streamer struct {
	console  io.Writer
	text     io.Writer // the plain `go test -v` text, or nil
	raw      io.Writer // the JSON lines as read, or nil
	verbose  bool
	module   string // trimmed from package paths on the console
	logName  string // where the text log is, for the failure message
	out      map[testKey]*strings.Builder
	running  map[testKey]bool
	pkgOut   map[string]*strings.Builder
	pkgOpen  map[string]bool
	pkgOrder []string
	build    map[string]*strings.Builder

	packages, passed, skipped, failedTests, failedPkgs, incomplete int
}

func newStreamer(console io.Writer) *streamer {
	return &streamer{
		console: console,
		out:     map[testKey]*strings.Builder{},
		running: map[testKey]bool{},
		pkgOut:  map[string]*strings.Builder{},
		pkgOpen: map[string]bool{},
		build:   map[string]*strings.Builder{},
	}
}

// short is pkg without the module prefix, as a ./ path.
func (s *streamer) short(pkg string) string {
	if s.module != "" {
		if pkg == s.module {
			return "."
		}
		if rest, ok := strings.CutPrefix(pkg, s.module+"/"); ok {
			return "./" + rest
		}
	}
	return pkg
}

// appendTo appends text to m[k], creating it.
func appendTo[K comparable](m map[K]*strings.Builder, k K, text string) {
	b := m[k]
	if b == nil {
		b = &strings.Builder{}
		m[k] = b
	}
	b.WriteString(text)
}

// run reads the stream to its end and reports whether everything passed.
func (s *streamer) run(r io.Reader) (bool, error) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 16<<20)
	for sc.Scan() {
		line := sc.Bytes()
		if s.raw != nil {
			s.raw.Write(line)
			s.raw.Write([]byte{'\n'})
		}
		var e event
		if len(line) == 0 || line[0] != '{' || json.Unmarshal(line, &e) != nil {
			// Not an event: something the go command wrote to stderr.
			fmt.Fprintf(s.console, "%s\n", line)
			s.writeText(string(line) + "\n")
			continue
		}
		s.handle(e)
	}
	if err := sc.Err(); err != nil {
		return false, fmt.Errorf("reading go test -json: %w", err)
	}
	for _, pkg := range s.pkgOrder {
		if s.pkgOpen[pkg] {
			s.incomplete++
			fmt.Fprintf(s.console, "INCOMPLETE %s: the stream ended before its result\n", s.short(pkg))
			s.showUnfinished(pkg)
			s.show("output of "+s.short(pkg), s.pkgOut[pkg])
		}
	}
	ok := s.failedTests == 0 && s.failedPkgs == 0 && s.incomplete == 0 && s.packages > 0
	fmt.Fprintf(s.console, "%d packages: %d tests passed, %d skipped, %d failed", s.packages, s.passed, s.skipped, s.failedTests)
	if s.failedPkgs > 0 || s.incomplete > 0 {
		fmt.Fprintf(s.console, "; %d packages failed, %d incomplete", s.failedPkgs, s.incomplete)
	}
	fmt.Fprintln(s.console)
	if s.packages == 0 {
		fmt.Fprintln(s.console, "no test results in the stream")
	}
	if !ok && s.logName != "" {
		fmt.Fprintf(s.console, "full log: %s\n", s.logName)
	}
	return ok, nil
}

func (s *streamer) writeText(text string) {
	if s.text != nil {
		io.WriteString(s.text, text)
	}
}

func (s *streamer) handle(e event) {
	switch e.Action {
	case "build-output":
		appendTo(s.build, e.ImportPath, e.Output)
		s.writeText(e.Output)
		return
	case "build-fail":
		fmt.Fprintf(s.console, "BUILD FAILED %s\n", s.short(e.ImportPath))
		if b := s.build[e.ImportPath]; b != nil {
			io.WriteString(s.console, b.String())
		}
		return
	}
	if e.Package == "" {
		return
	}
	if _, seen := s.pkgOpen[e.Package]; !seen {
		s.pkgOpen[e.Package] = true
		s.pkgOrder = append(s.pkgOrder, e.Package)
	}
	k := testKey{e.Package, e.Test}
	switch e.Action {
	case "run":
		if e.Test != "" {
			s.running[k] = true
		}
	case "output":
		s.writeText(e.Output)
		if e.Test == "" {
			appendTo(s.pkgOut, e.Package, e.Output)
			return
		}
		appendTo(s.out, k, e.Output)
		if s.verbose && progressLine.MatchString(e.Output) {
			io.WriteString(s.console, e.Output)
		}
	case "pass", "fail", "skip":
		if e.Test != "" {
			s.endTest(k, e)
			return
		}
		s.endPackage(e)
	}
}

func (s *streamer) endTest(k testKey, e event) {
	delete(s.running, k)
	switch e.Action {
	case "pass":
		s.passed++
	case "skip":
		s.skipped++
	case "fail":
		s.failedTests++
		s.show(fmt.Sprintf("FAIL %s %s (%.2fs)", s.short(k.pkg), k.test, e.Elapsed), s.out[k])
	}
	delete(s.out, k)
}

func (s *streamer) endPackage(e event) {
	s.pkgOpen[e.Package] = false
	out := s.pkgOut[e.Package]
	delete(s.pkgOut, e.Package)
	switch e.Action {
	case "skip": // no test files
		return
	case "pass":
		s.packages++
		fmt.Fprintf(s.console, "ok   %s %.1fs\n", s.short(e.Package), e.Elapsed)
	case "fail":
		s.packages++
		s.failedPkgs++
		if e.FailedBuild != "" {
			fmt.Fprintf(s.console, "FAIL %s (build of %s failed)\n", s.short(e.Package), s.short(e.FailedBuild))
			return
		}
		fmt.Fprintf(s.console, "FAIL %s %.1fs\n", s.short(e.Package), e.Elapsed)
		s.showUnfinished(e.Package)
		if out != nil {
			var rest strings.Builder
			for _, l := range strings.SplitAfter(out.String(), "\n") {
				if strings.TrimSpace(l) != "" && !pkgSummaryLine.MatchString(strings.TrimRight(l, "\n")) {
					rest.WriteString(l)
				}
			}
			if rest.Len() > 0 {
				s.show("output of "+s.short(e.Package)+" outside its tests", &rest)
			}
		}
	}
}

// showUnfinished prints the output of pkg's tests that started and never
// ended (a panic, a timeout, a killed test binary).
func (s *streamer) showUnfinished(pkg string) {
	var names []string
	for k := range s.running {
		if k.pkg == pkg {
			names = append(names, k.test)
		}
	}
	sort.Strings(names)
	for _, name := range names {
		k := testKey{pkg, name}
		s.show(fmt.Sprintf("UNFINISHED %s %s", s.short(pkg), name), s.out[k])
		delete(s.running, k)
		delete(s.out, k)
	}
}

// show prints a header and the last maxFailLines lines of out.
func (s *streamer) show(header string, out *strings.Builder) {
	fmt.Fprintf(s.console, "--- %s\n", header)
	if out == nil {
		return
	}
	var lines []string
	for _, l := range strings.SplitAfter(strings.TrimRight(out.String(), "\n"), "\n") {
		if !strings.HasPrefix(l, "=== ") { // RUN, PAUSE, CONT, NAME
			lines = append(lines, l)
		}
	}
	if n := len(lines) - maxFailLines; n > 0 {
		fmt.Fprintf(s.console, "    [%d earlier lines in the full log]\n", n)
		lines = lines[n:]
	}
	io.WriteString(s.console, strings.Join(lines, ""))
	fmt.Fprintln(s.console)
}

// skip is one skipped test and why.
type skip struct {
	Label, Package, Test, Reason string
}

// readSkips returns the tests a `go test -json` stream skipped, in the
// order they ended, with the last message each logged (t.Skip's).
func readSkips(r io.Reader, label string) ([]skip, error) {
	out := map[testKey]*strings.Builder{}
	var skips []skip
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 16<<20)
	for sc.Scan() {
		var e event
		line := sc.Bytes()
		if len(line) == 0 || line[0] != '{' || json.Unmarshal(line, &e) != nil || e.Test == "" {
			continue
		}
		k := testKey{e.Package, e.Test}
		switch e.Action {
		case "output":
			appendTo(out, k, e.Output)
		case "skip":
			reason := ""
			if b := out[k]; b != nil {
				reason = lastMessage(b.String())
			}
			skips = append(skips, skip{Label: label, Package: e.Package, Test: e.Test, Reason: reason})
			delete(out, k)
		case "pass", "fail":
			delete(out, k)
		}
	}
	if err := sc.Err(); err != nil {
		return skips, fmt.Errorf("reading go test -json: %w", err)
	}
	return skips, nil
}

// lastMessage is the last t.Log-style message in a test's output, with its
// continuation lines joined by " / ".
func lastMessage(output string) string {
	var msg []string
	for _, line := range strings.Split(output, "\n") {
		switch {
		case frameworkLine.MatchString(line):
			continue
		case logStart.MatchString(line):
			msg = []string{strings.TrimSpace(logStart.ReplaceAllString(line, ""))}
		case msg != nil && strings.TrimSpace(line) != "":
			msg = append(msg, strings.TrimSpace(line))
		}
	}
	return strings.Join(msg, " / ")
}
