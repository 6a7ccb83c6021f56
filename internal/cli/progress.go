package cli

import (
	"fmt"
	"sync"
	"time"
)

// progress is a one-line status on stderr for long work. It shows only when
// stderr is a terminal and the work has run for e.progressDelay, and is
// redrawn at most ten times a second; piped output stays quiet.
type progress struct {
	e       *env
	label   string
	enabled bool
	start   time.Time

	mu       sync.Mutex
	last     time.Time
	shown    bool
	finished bool
	done     int64
	total    int64
}

// newProgress starts a progress line for work described by label.
func (e *env) newProgress(label string, quiet bool) *progress {
	return &progress{e: e, label: label, enabled: !quiet && e.isTTY(e.stderr), start: time.Now(), total: -1}
}

// update records done of total bytes (total -1 when unknown) and redraws.
func (p *progress) update(done, total int64) {
	if !p.enabled {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.finished {
		return
	}
	p.done, p.total = done, total
	now := time.Now()
	if now.Sub(p.start) < p.e.progressDelay || now.Sub(p.last) < 100*time.Millisecond {
		return
	}
	p.last = now
	p.draw(now)
}

func (p *progress) draw(now time.Time) {
	el := now.Sub(p.start)
	line := fmt.Sprintf("%s: %s", p.label, bytesHuman(p.done))
	if p.total > 0 {
		pct := float64(p.done) * 100 / float64(p.total)
		if pct > 100 {
			pct = 100
		}
		line += fmt.Sprintf(" of %s (%.0f%%)", bytesHuman(p.total), pct)
	}
	if s := el.Seconds(); s > 0 {
		line += fmt.Sprintf(", %s/s", bytesHuman(int64(float64(p.done)/s)))
	}
	fmt.Fprintf(p.e.stderr, "\r\033[K%s", line)
	p.shown = true
}

// finish clears the line and, on a terminal, prints summary (if not empty).
func (p *progress) finish(summary string) {
	if !p.enabled {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.finished = true
	if p.shown {
		fmt.Fprint(p.e.stderr, "\r\033[K")
	}
	if summary != "" {
		fmt.Fprintln(p.e.stderr, summary)
	}
}

// spin shows "label… 3s" on a terminal while a single long request runs
// (checkpoint, create, restore). Call the returned func when it is done.
func (e *env) spin(label string) func() {
	if !e.isTTY(e.stderr) {
		return func() {}
	}
	stop := make(chan struct{})
	finished := make(chan struct{})
	start := time.Now()
	go func() {
		defer close(finished)
		t := time.NewTicker(100 * time.Millisecond)
		defer t.Stop()
		shown := false
		for {
			select {
			case <-stop:
				if shown {
					fmt.Fprint(e.stderr, "\r\033[K")
				}
				return
			case now := <-t.C:
				if el := now.Sub(start); el >= e.progressDelay {
					fmt.Fprintf(e.stderr, "\r\033[K%s… %.1fs", label, el.Seconds())
					shown = true
				}
			}
		}
	}()
	var once sync.Once
	return func() {
		once.Do(func() {
			close(stop)
			<-finished
		})
	}
}
