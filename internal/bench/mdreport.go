package bench

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// `noid-bench report` turns the JSON that --json writes into the Markdown
// tables of BENCHMARKS.md, so that every quoted figure comes from a file
// kept in the repository (bench/results/) together with the command, the
// commit, the host and its load.
//
// With --update FILE.md it regenerates, in place, every block of FILE.md
// between
//
//	<!-- noid-bench report [flags] RESULT.json... -->
//	<!-- /noid-bench report -->
//
// from the files the opening marker names (relative to FILE.md's
// directory), with the flags it gives (--sections, --no-provenance). The
// text outside the blocks is left alone.

const (
	markerOpen  = "<!-- noid-bench report "
	markerClose = "<!-- /noid-bench report -->"
)

// reportOpts choose what a rendered report shows.
type reportOpts struct {
	// sections keeps only figures of these sections (all when empty).
	sections map[string]bool
	// noProvenance leaves out the table saying where the figures come from.
	noProvenance bool
	// match keeps only figures whose name contains one of these (all when
	// empty).
	match []string
}

const reportUsage = `noid-bench report prints the figures of noid-bench --json files as Markdown tables.

Usage:
  noid-bench report [--sections a,b] [--match text,…] [--no-provenance] RESULT.json...
  noid-bench report --update BENCHMARKS.md

--update regenerates every block of the file between
  <!-- noid-bench report [flags] RESULT.json... -->
and
  <!-- /noid-bench report -->
from the files the marker names (relative to the Markdown file).

Flags:
`

// reportMain is `noid-bench report`.
func reportMain(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("noid-bench report", flag.ContinueOnError)
	fs.SetOutput(stderr)
	update := fs.String("update", "", "regenerate the marked blocks of this Markdown file in place")
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), reportUsage)
		fs.PrintDefaults()
	}
	o, files, err := parseReportArgs(fs, args)
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		fmt.Fprintln(stderr, "noid-bench report:", err)
		return 2
	}
	if *update != "" {
		if len(files) > 0 {
			fmt.Fprintln(stderr, "noid-bench report: --update takes the JSON files from the markers in the Markdown file, not from the command line")
			return 2
		}
		n, err := updateMarkdown(*update)
		if err != nil {
			fmt.Fprintln(stderr, "noid-bench report:", err)
			return 1
		}
		fmt.Fprintf(stderr, "noid-bench report: regenerated %d block(s) of %s\n", n, *update)
		return 0
	}
	if len(files) == 0 {
		fs.Usage()
		return 2
	}
	var buf bytes.Buffer
	if err := renderFiles(&buf, files, files, o); err != nil {
		fmt.Fprintln(stderr, "noid-bench report:", err)
		return 1
	}
	stdout.Write(buf.Bytes())
	return 0
}

// parseReportArgs parses the flags a report takes (on the command line or
// in a marker) and returns the JSON files named.
func parseReportArgs(fs *flag.FlagSet, args []string) (reportOpts, []string, error) {
	sections := fs.String("sections", "", "only figures of these sections (comma-separated; default all)")
	noProv := fs.Bool("no-provenance", false, "leave out the table of command, commit, host and load")
	match := fs.String("match", "", "only figures whose name contains one of these strings (comma-separated)")
	if err := fs.Parse(args); err != nil {
		return reportOpts{}, nil, err
	}
	o := reportOpts{noProvenance: *noProv}
	for _, m := range strings.Split(*match, ",") {
		if m = strings.TrimSpace(m); m != "" {
			o.match = append(o.match, m)
		}
	}
	if *sections != "" {
		o.sections = map[string]bool{}
		for _, s := range strings.Split(*sections, ",") {
			if s = strings.TrimSpace(s); s != "" {
				o.sections[s] = true
			}
		}
	}
	return o, fs.Args(), nil
}

// readReport reads one --json file.
func readReport(path string) (*JSONReport, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var r JSONReport
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return &r, nil
}

// renderFiles renders the reports in paths; names are how the provenance
// table names them (the paths as the marker or command line gave them).
func renderFiles(w io.Writer, paths, names []string, o reportOpts) error {
	for i, p := range paths {
		r, err := readReport(p)
		if err != nil {
			return err
		}
		if i > 0 {
			fmt.Fprintln(w)
		}
		renderReport(w, names[i], r, o)
	}
	return nil
}

// updateMarkdown regenerates the marked blocks of the Markdown file at path
// and returns how many it regenerated.
func updateMarkdown(path string) (int, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	out, n, err := regenerateBlocks(string(b), filepath.Dir(path))
	if err != nil {
		return 0, fmt.Errorf("%s: %w", path, err)
	}
	if out == string(b) {
		return n, nil
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(out), 0o644); err != nil {
		return 0, err
	}
	return n, os.Rename(tmp, path)
}

// regenerateBlocks replaces the content of every marked block of md with
// the report its opening marker asks for; JSON paths are relative to dir.
func regenerateBlocks(md, dir string) (string, int, error) {
	var out strings.Builder
	n := 0
	rest := md
	for {
		i := markerLine(rest, markerOpen)
		if i < 0 {
			out.WriteString(rest)
			return out.String(), n, nil
		}
		line := strings.Count(md[:len(md)-len(rest)+i], "\n") + 1
		end := strings.Index(rest[i:], "-->")
		if end < 0 {
			return "", 0, fmt.Errorf("line %d: unterminated noid-bench report marker", line)
		}
		open := rest[i : i+end+3]
		args := strings.Fields(strings.TrimSuffix(strings.TrimPrefix(open, markerOpen), "-->"))
		after := rest[i+end+3:]
		j := markerLine(after, markerClose)
		if j < 0 {
			return "", 0, fmt.Errorf("line %d: no %s after the marker", line, markerClose)
		}
		if k := markerLine(after[:j], markerOpen); k >= 0 {
			return "", 0, fmt.Errorf("line %d: a marker opens again before %s", line, markerClose)
		}
		fs := flag.NewFlagSet("marker", flag.ContinueOnError)
		fs.SetOutput(io.Discard)
		o, files, err := parseReportArgs(fs, args)
		if err != nil {
			return "", 0, fmt.Errorf("line %d: %w", line, err)
		}
		if len(files) == 0 {
			return "", 0, fmt.Errorf("line %d: the marker names no JSON file", line)
		}
		paths := make([]string, len(files))
		for k, f := range files {
			paths[k] = f
			if !filepath.IsAbs(f) {
				paths[k] = filepath.Join(dir, f)
			}
		}
		var buf bytes.Buffer
		if err := renderFiles(&buf, paths, files, o); err != nil {
			return "", 0, fmt.Errorf("line %d: %w", line, err)
		}
		out.WriteString(rest[:i])
		out.WriteString(open)
		out.WriteString("\n<!-- generated by `noid-bench report --update`: edit the marker, not the table -->\n")
		out.Write(buf.Bytes())
		out.WriteString(markerClose)
		rest = after[j+len(markerClose):]
		n++
	}
}

// sectionTitles name the sections in reports.
var sectionTitles = map[string]string{
	"default":    "Default image (Debian, 1 vCPU, 2048 MiB): checkpoint, rewind, clone, host writes (issue 12)",
	"peers":      "QEMU's own ways on the same guest (savevm/loadvm, migrate to a file)",
	"vs-peers":   "noid against QEMU's own ways (ratio noid / peer; below 1 means noid is faster)",
	"core":       "Core (issue 2), tiny image",
	"checkpoint": "Checkpoint, rewind, clone (issue 3), tiny image",
	"golden":     "Golden snapshots (issue 4), tiny image",
	"network":    "Network (issue 5), tiny image",
}

// renderReport writes the Markdown of one report: where it comes from,
// then a table per section.
func renderReport(w io.Writer, name string, r *JSONReport, o reportOpts) {
	if !o.noProvenance {
		renderProvenance(w, name, r)
	}
	var order []string
	bySection := map[string][]*Figure{}
	for _, f := range r.Figures {
		if o.sections != nil && !o.sections[f.Section] {
			continue
		}
		if len(o.match) > 0 && !matchesAny(f.Name, o.match) {
			continue
		}
		if _, ok := bySection[f.Section]; !ok {
			order = append(order, f.Section)
		}
		bySection[f.Section] = append(bySection[f.Section], f)
	}
	for _, s := range order {
		title := sectionTitles[s]
		if title == "" {
			title = s
		}
		fmt.Fprintf(w, "\n**%s**\n\n", title)
		renderTable(w, bySection[s])
	}
	if len(r.Errors) > 0 {
		fmt.Fprintf(w, "\nErrors in this run:\n\n")
		for _, e := range r.Errors {
			fmt.Fprintf(w, "- %s\n", mdEscape(firstLine(e)))
		}
	}
}

// renderProvenance writes the table saying where a report's figures come
// from.
func renderProvenance(w io.Writer, name string, r *JSONReport) {
	fmt.Fprintf(w, "| Run | `%s` |\n|---|---|\n", name)
	fmt.Fprintf(w, "| Command | `%s` |\n", strings.ReplaceAll(r.Command, "|", `\|`))
	if r.Host != nil {
		start := r.Host.Time.UTC()
		when := start.Format("2006-01-02 15:04")
		if end := reportEnd(r); !end.IsZero() {
			when += "–" + end.UTC().Format("15:04")
		}
		fmt.Fprintf(w, "| When (UTC) | %s |\n", when)
	}
	code := "not recorded (a run before noid-bench recorded its commit)"
	if r.Code != nil {
		code = "`" + r.Code.String() + "`"
		if r.Code.Branch != "" {
			code += " on " + r.Code.Branch
		}
		if r.Code.Dirty {
			code += "; modified: " + strings.Join(r.Code.DirtyFiles, ", ")
		}
	}
	fmt.Fprintf(w, "| Code | %s |\n", code)
	if h := r.Host; h != nil {
		qemu := mdEscape(h.QEMU)
		if h.QEMUPath != "" {
			qemu += " (`" + h.QEMUPath + "`)"
		}
		fmt.Fprintf(w, "| Host | %s, %d cores, %d MiB; kernel %s; %s, accel %s; %s; tmp on %s |\n",
			mdEscape(h.CPU), h.Cores, h.MemMiB, h.Kernel, qemu, h.Accel, h.Go, h.TmpFS)
		fmt.Fprintf(w, "| Load at start | %.2f %.2f %.2f; other QEMU processes: %d |\n", h.Load[0], h.Load[1], h.Load[2], h.OtherQEMU)
	}
	for _, s := range r.Sections {
		fmt.Fprintf(w, "| Section %s | %s UTC, %.0f s; load %.2f → %.2f (1 min); other QEMU processes: %d |\n",
			s.Name, s.Start.UTC().Format("15:04:05"), s.Seconds, s.LoadStart[0], s.LoadEnd[0], s.OtherQEMU)
	}
}

// reportEnd is when the last section ended, or zero.
func reportEnd(r *JSONReport) time.Time {
	if !r.Finished.IsZero() {
		return r.Finished
	}
	var end time.Time
	for _, s := range r.Sections {
		if e := s.Start.Add(time.Duration(s.Seconds * float64(time.Second))); e.After(end) {
			end = e
		}
	}
	return end
}

// renderTable writes one section's figures: a row per figure name, a
// column per storage kind.
func renderTable(w io.Writer, figs []*Figure) {
	var storages, names []string
	cells := map[string]map[string]*Figure{}
	for _, f := range figs {
		if !contains(storages, f.Storage) {
			storages = append(storages, f.Storage)
		}
		if cells[f.Name] == nil {
			cells[f.Name] = map[string]*Figure{}
			names = append(names, f.Name)
		}
		cells[f.Name][f.Storage] = f
	}
	hasTarget := false
	for _, f := range figs {
		if f.Target != "" {
			hasTarget = true
		}
	}
	head := []string{"Figure"}
	for _, s := range storages {
		switch s {
		case "":
			head = append(head, "p50 (p90, min; n)")
		default:
			head = append(head, s)
		}
	}
	if hasTarget {
		head = append(head, "Target")
	}
	fmt.Fprintf(w, "| %s |\n|%s\n", strings.Join(head, " | "), strings.Repeat("---|", len(head)))
	for _, n := range names {
		row := []string{mdEscape(rowLabel(n, cells[n]))}
		target := ""
		var partsRow []string
		hasParts := false
		for _, s := range storages {
			f := cells[n][s]
			row = append(row, cellText(f))
			if f != nil && f.Target != "" && target == "" {
				target = f.Target
			}
			p := ""
			if f != nil && len(f.Parts) > 0 {
				p = partsText(f.Parts)
				hasParts = true
			}
			partsRow = append(partsRow, p)
		}
		if hasTarget {
			row = append(row, mdEscape(target))
		}
		fmt.Fprintf(w, "| %s |\n", strings.Join(row, " | "))
		if hasParts {
			pr := append([]string{"  ↳ parts, p50 ms"}, partsRow...)
			if hasTarget {
				pr = append(pr, "")
			}
			fmt.Fprintf(w, "| %s |\n", strings.Join(pr, " | "))
		}
	}
}

// rowLabel is a figure's name with its unit.
func rowLabel(name string, byStorage map[string]*Figure) string {
	for _, f := range byStorage {
		if f.Unit != "" {
			return name + " (" + f.Unit + ")"
		}
	}
	return name
}

// cellText is one figure in a table cell: "p50 (p90, min; n=N)" for a
// sample, the value for a single figure, and its target's status.
func cellText(f *Figure) string {
	if f == nil {
		return ""
	}
	var s string
	switch {
	case f.Stats != nil && f.Stats.N > 0:
		st := f.Stats
		if st.N == 1 {
			s = fmt.Sprintf("%s (n=1)", fmtNum(st.P50))
		} else {
			s = fmt.Sprintf("%s (%s, %s; n=%d)", fmtNum(st.P50), fmtNum(st.P90), fmtNum(st.Min), st.N)
		}
	case f.Value != nil:
		s = fmtNum(*f.Value)
	case f.Stats != nil:
		s = "no sample"
	}
	switch f.Status {
	case "met":
		s += " · met"
	case "missed":
		s += " · **missed**"
	}
	return s
}

// partsText lists the p50 of each part of a server breakdown.
func partsText(p map[string]*Stats) string {
	var out []string
	for _, k := range partOrder(p) {
		out = append(out, fmt.Sprintf("%s %s", k, fmtNum(p[k].P50)))
	}
	return strings.Join(out, " · ")
}

// mdEscape keeps text from breaking a table row.
func mdEscape(s string) string {
	s = strings.ReplaceAll(s, "|", `\|`)
	return strings.ReplaceAll(s, "\n", " ")
}

func matchesAny(s string, subs []string) bool {
	for _, m := range subs {
		if strings.Contains(s, m) {
			return true
		}
	}
	return false
}

// markerLine is the index in s of the first marker that starts a line
// (after indentation), or -1: a marker quoted in the middle of a sentence
// is text.
func markerLine(s, marker string) int {
	off := 0
	for {
		i := strings.Index(s[off:], marker)
		if i < 0 {
			return -1
		}
		i += off
		ls := strings.LastIndexByte(s[:i], '\n') + 1
		if strings.TrimLeft(s[ls:i], " \t") == "" {
			return i
		}
		off = i + len(marker)
	}
}
