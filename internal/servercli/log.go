package servercli

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/noid-vm/noid/internal/config"
)

// newLogger is the server's logger: log_format text (key=value) or json,
// at log_level. Under systemd, when stderr is the journal (JOURNAL_STREAM),
// each line starts with its syslog priority ("<4>" for a warning), which
// journald takes as the entry's priority and strips, and the time is left
// to the journal: `journalctl -u noid-server -p warning` then shows the
// warnings and errors, and every line keeps its vm, user and request_id
// fields.
func newLogger(w io.Writer, cfg *config.Config, journal bool) *slog.Logger {
	lvl := slog.LevelInfo
	switch cfg.LogLevel {
	case "debug":
		lvl = slog.LevelDebug
	case "warn":
		lvl = slog.LevelWarn
	case "error":
		lvl = slog.LevelError
	}
	opts := &slog.HandlerOptions{Level: lvl}
	mk := func(w io.Writer) slog.Handler {
		if cfg.LogFormat == "json" {
			return slog.NewJSONHandler(w, opts)
		}
		return slog.NewTextHandler(w, opts)
	}
	if !journal {
		return slog.New(mk(w))
	}
	opts.ReplaceAttr = func(groups []string, a slog.Attr) slog.Attr {
		if len(groups) == 0 && a.Key == slog.TimeKey {
			return slog.Attr{}
		}
		return a
	}
	mu := &sync.Mutex{}
	h := journalHandler{}
	for i, p := range journalPriorities {
		h[i] = mk(&prefixWriter{w: w, mu: mu, prefix: p.prefix})
	}
	return slog.New(h)
}

// journalPriorities maps slog levels to syslog priorities, lowest first.
var journalPriorities = [4]struct {
	level  slog.Level
	prefix string
}{{slog.LevelDebug, "<7>"}, {slog.LevelInfo, "<6>"}, {slog.LevelWarn, "<4>"}, {slog.LevelError, "<3>"}}

// journalHandler sends each record to the handler that writes its
// priority's prefix.
type journalHandler [4]slog.Handler

func (h journalHandler) pick(l slog.Level) slog.Handler {
	for i := len(journalPriorities) - 1; i > 0; i-- {
		if l >= journalPriorities[i].level {
			return h[i]
		}
	}
	return h[0]
}

// Enabled reports whether the level is logged.
func (h journalHandler) Enabled(ctx context.Context, l slog.Level) bool {
	return h[0].Enabled(ctx, l)
}

// Handle writes r with its priority.
func (h journalHandler) Handle(ctx context.Context, r slog.Record) error {
	return h.pick(r.Level).Handle(ctx, r)
}

// WithAttrs adds attrs to every priority's handler.
func (h journalHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	var out journalHandler
	for i := range h {
		out[i] = h[i].WithAttrs(attrs)
	}
	return out
}

// WithGroup opens a group in every priority's handler.
func (h journalHandler) WithGroup(name string) slog.Handler {
	var out journalHandler
	for i := range h {
		out[i] = h[i].WithGroup(name)
	}
	return out
}

// prefixWriter writes each record (one Write) after a prefix, in one write.
type prefixWriter struct {
	w      io.Writer
	mu     *sync.Mutex
	prefix string
}

func (p *prefixWriter) Write(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if _, err := p.w.Write(append([]byte(p.prefix), b...)); err != nil {
		return 0, err
	}
	return len(b), nil
}

// stderrIsJournal reports whether stderr is the journal stream systemd
// names in JOURNAL_STREAM ("device:inode").
func stderrIsJournal() bool {
	js := os.Getenv("JOURNAL_STREAM")
	if js == "" {
		return false
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(os.Stderr.Fd()), &st); err != nil {
		return false
	}
	return js == fmt.Sprintf("%d:%d", st.Dev, st.Ino)
}
