package bench

import (
	"fmt"
	"strings"
)

// Figure is one reported measurement.
type Figure struct {
	Section string `json:"section"`
	Storage string `json:"storage,omitempty"`
	Name    string `json:"name"`
	Unit    string `json:"unit"`
	// Stats summarise a sample; Value is a single figure (a ratio, a total).
	Stats *Stats   `json:"stats,omitempty"`
	Value *float64 `json:"value,omitempty"`
	// Parts are the server-reported breakdown (p50 of each part), in ms.
	Parts  map[string]*Stats `json:"parts,omitempty"`
	Target string            `json:"target,omitempty"`
	// Status is "met", "missed" or "" when there is no target.
	Status string `json:"status,omitempty"`
	Anchor string `json:"anchor,omitempty"`
	Note   string `json:"note,omitempty"`
}

// headline is the value a target is checked against: p50, or Value.
func (f *Figure) headline() float64 {
	if f.Value != nil {
		return *f.Value
	}
	if f.Stats != nil {
		return f.Stats.P50
	}
	return 0
}

// below sets a "< limit" (strict) or "≤ limit" target on the headline.
func (f *Figure) below(limit float64, strict bool) *Figure {
	op := "≤"
	ok := f.headline() <= limit
	if strict {
		op, ok = "<", f.headline() < limit
	}
	f.Target = fmt.Sprintf("%s %s %s", op, fmtNum(limit), f.Unit)
	f.Status = status(ok)
	return f
}

// atLeast sets a "≥ limit" target on the headline.
func (f *Figure) atLeast(limit float64) *Figure {
	f.Target = fmt.Sprintf("≥ %s %s", fmtNum(limit), f.Unit)
	f.Status = status(f.headline() >= limit)
	return f
}

func status(ok bool) string {
	if ok {
		return "met"
	}
	return "missed"
}

func fmtNum(v float64) string {
	switch {
	case v == 0:
		return "0"
	case v >= 100 || v <= -100:
		return fmt.Sprintf("%.0f", v)
	case v >= 10 || v <= -10:
		return fmt.Sprintf("%.1f", v)
	default:
		return fmt.Sprintf("%.2f", v)
	}
}

func val(v float64) *float64 { return &v }

// add records a figure. It is printed when the next one is added or the
// section ends, so that a target set on the returned figure
// (b.add(f).below(…)) is printed with it.
func (b *Bench) add(f *Figure) *Figure {
	b.mu.Lock()
	b.figs = append(b.figs, f)
	prev := b.pending
	b.pending = f
	b.mu.Unlock()
	if prev != nil {
		b.printFigure(prev)
	}
	return f
}

// flushFigures prints the figure add holds back.
func (b *Bench) flushFigures() {
	b.mu.Lock()
	prev := b.pending
	b.pending = nil
	b.mu.Unlock()
	if prev != nil {
		b.printFigure(prev)
	}
}

func (b *Bench) printFigure(f *Figure) {
	name := f.Name
	if f.Storage != "" {
		name += " [" + f.Storage + "]"
	}
	var line string
	if f.Stats != nil {
		s := f.Stats
		line = fmt.Sprintf("  %-52s p50 %8s %-4s p90 %8s  min %8s  max %8s  n=%d", name, fmtNum(s.P50), f.Unit, fmtNum(s.P90), fmtNum(s.Min), fmtNum(s.Max), s.N)
	} else if f.Value != nil {
		line = fmt.Sprintf("  %-52s     %8s %s", name, fmtNum(*f.Value), f.Unit)
	}
	if f.Target != "" {
		line += fmt.Sprintf("   [target %s: %s]", f.Target, strings.ToUpper(f.Status))
	}
	fmt.Fprintln(b.out, line)
	if len(f.Parts) > 0 {
		var ps []string
		for _, k := range partOrder(f.Parts) {
			ps = append(ps, fmt.Sprintf("%s %s", k, fmtNum(f.Parts[k].P50)))
		}
		fmt.Fprintf(b.out, "  %-52s     parts p50 (ms): %s\n", "", strings.Join(ps, " · "))
	}
	if f.Note != "" {
		fmt.Fprintf(b.out, "  %-52s     note: %s\n", "", f.Note)
	}
	if f.Anchor != "" {
		fmt.Fprintf(b.out, "  %-52s     anchor: %s\n", "", f.Anchor)
	}
}

var partNames = []string{"total", "pause", "copy", "spawn", "load", "agent", "net", "exec", "exec2"}

func partOrder(m map[string]*Stats) []string {
	var out []string
	for _, k := range partNames {
		if _, ok := m[k]; ok {
			out = append(out, k)
		}
	}
	for _, k := range sortedKeys(m) {
		if !contains(out, k) {
			out = append(out, k)
		}
	}
	return out
}

func (b *Bench) printHeader(load bool) {
	h := b.host
	what := "sections"
	if load {
		what = "load run"
	}
	fmt.Fprintf(b.out, "noid-bench %s — %s\n", what, h.Time.Format("2006-01-02 15:04:05 MST"))
	fmt.Fprintf(b.out, "command: %s\n", b.cmdline)
	fmt.Fprintf(b.out, "code: %s (%s)\n", b.code, b.opts.Repo)
	fmt.Fprintf(b.out, "host: %s, %d cores, %d MiB RAM, kernel %s\n", h.CPU, h.Cores, h.MemMiB, h.Kernel)
	fmt.Fprintf(b.out, "vmm:  %s (%s), accel %s; go %s; tmp %s (%s)\n", h.QEMU, h.QEMUPath, h.Accel, h.Go, b.opts.TempDir, h.TmpFS)
	fmt.Fprintf(b.out, "load average %.2f %.2f %.2f; other QEMU processes: %d\n", h.Load[0], h.Load[1], h.Load[2], h.OtherQEMU)
}

func (b *Bench) printSummary() {
	b.flushFigures()
	var met, missed []string
	for _, f := range b.figs {
		n := f.Name
		if f.Storage != "" {
			n += " [" + f.Storage + "]"
		}
		switch f.Status {
		case "met":
			met = append(met, n)
		case "missed":
			missed = append(missed, fmt.Sprintf("%s (%s %s, target %s)", n, fmtNum(f.headline()), f.Unit, f.Target))
		}
	}
	if len(met)+len(missed) > 0 {
		fmt.Fprintf(b.out, "\n== summary: %d targets met, %d missed ==\n", len(met), len(missed))
		for _, m := range missed {
			fmt.Fprintf(b.out, "  missed: %s\n", m)
		}
	}
	if len(b.errs) > 0 {
		fmt.Fprintf(b.out, "\n== errors ==\n")
		for _, e := range b.errs {
			fmt.Fprintf(b.out, "  %s\n", e)
		}
	}
}
