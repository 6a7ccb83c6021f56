package bench

import (
	"math"
	"sort"
	"time"
)

// Stats summarises a sample of durations (or other values) in one unit.
type Stats struct {
	N    int     `json:"n"`
	Min  float64 `json:"min"`
	P50  float64 `json:"p50"`
	P90  float64 `json:"p90"`
	P99  float64 `json:"p99"`
	Max  float64 `json:"max"`
	Mean float64 `json:"mean"`
}

// Sample collects values.
type Sample []float64

// AddDur adds a duration in milliseconds.
func (s *Sample) AddDur(d time.Duration) { *s = append(*s, float64(d.Microseconds())/1000) }

// Add adds a value.
func (s *Sample) Add(v float64) { *s = append(*s, v) }

// Stats computes the summary. Percentiles use the nearest-rank method on
// the sorted sample (p50 of an even sample is the lower middle value's
// neighbour average, as usual).
func (s Sample) Stats() *Stats {
	if len(s) == 0 {
		return &Stats{}
	}
	v := append([]float64(nil), s...)
	sort.Float64s(v)
	sum := 0.0
	for _, x := range v {
		sum += x
	}
	return &Stats{N: len(v), Min: v[0], P50: median(v), P90: rank(v, 0.90), P99: rank(v, 0.99), Max: v[len(v)-1], Mean: sum / float64(len(v))}
}

func median(v []float64) float64 {
	n := len(v)
	if n%2 == 1 {
		return v[n/2]
	}
	return (v[n/2-1] + v[n/2]) / 2
}

// rank is the nearest-rank percentile of sorted v.
func rank(v []float64, p float64) float64 {
	i := int(math.Ceil(p*float64(len(v)))) - 1
	if i < 0 {
		i = 0
	}
	if i >= len(v) {
		i = len(v) - 1
	}
	return v[i]
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
