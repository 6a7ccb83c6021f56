// Package promtext reads the Prometheus text exposition noid-server serves
// on /metrics, for the tests, the e2e harness and the benchmarks.
package promtext

import (
	"fmt"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// Families is a parsed exposition: the metric families by name.
type Families map[string]*dto.MetricFamily

// Parse parses text in the Prometheus text format.
func Parse(text string) (Families, error) {
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(strings.NewReader(text))
	if err != nil {
		return nil, fmt.Errorf("parsing metrics: %w", err)
	}
	return fams, nil
}

// Gather gathers g and writes it in the text format, as /metrics serves it.
func Gather(g prometheus.Gatherer) (string, error) {
	fams, err := g.Gather()
	if err != nil {
		return "", fmt.Errorf("gathering metrics: %w", err)
	}
	var b strings.Builder
	enc := expfmt.NewEncoder(&b, expfmt.NewFormat(expfmt.TypeTextPlain))
	for _, mf := range fams {
		if err := enc.Encode(mf); err != nil {
			return "", fmt.Errorf("encoding metrics: %w", err)
		}
	}
	return b.String(), nil
}

// Type is the type of the family name ("gauge", "counter", "histogram",
// …), or "" when there is none.
func (f Families) Type(name string) string {
	mf := f[name]
	if mf == nil {
		return ""
	}
	return strings.ToLower(mf.GetType().String())
}

// Values returns the value of every sample of the family name whose labels
// include all of want: a gauge's or counter's value, a histogram's sample
// count.
func (f Families) Values(name string, want map[string]string) []float64 {
	mf := f[name]
	if mf == nil {
		return nil
	}
	var out []float64
	for _, m := range mf.GetMetric() {
		if !hasLabels(m, want) {
			continue
		}
		switch {
		case m.Gauge != nil:
			out = append(out, m.GetGauge().GetValue())
		case m.Counter != nil:
			out = append(out, m.GetCounter().GetValue())
		case m.Histogram != nil:
			out = append(out, float64(m.GetHistogram().GetSampleCount()))
		case m.Untyped != nil:
			out = append(out, m.GetUntyped().GetValue())
		}
	}
	return out
}

// Sum adds up Values(name, want); it is 0 when there is none.
func (f Families) Sum(name string, want map[string]string) float64 {
	var s float64
	for _, v := range f.Values(name, want) {
		s += v
	}
	return s
}

func hasLabels(m *dto.Metric, want map[string]string) bool {
	for k, v := range want {
		found := false
		for _, lp := range m.GetLabel() {
			if lp.GetName() == k && lp.GetValue() == v {
				found = true
				break
			}
		}
		if !found {
			return false
		}
	}
	return true
}
