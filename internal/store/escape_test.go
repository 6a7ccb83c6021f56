package store

import (
	"context"
	"testing"
)

func TestEscapeText(t *testing.T) {
	for in, want := range map[string]string{
		"plain name-1 ok":    "plain name-1 ok",
		"a\nb\tc\rd":         `a\nb\tc\rd`,
		"\x1b[31mred\x07":    `\x1b[31mred\a`,
		"c1 \u0085 \u009b":   `c1 \u0085 \u009b`,
		"bidi \u202e \u2066": `bidi \u202e \u2066`,
		"bad \xff\xfe utf8":  `bad \xff\xfe utf8`,
		"del \x7f":           `del \x7f`,
		"héllo wörld ✓":      "héllo wörld ✓",
		`back\slash`:         `back\slash`,
	} {
		got := EscapeText(in)
		if got != want {
			t.Errorf("EscapeText(%q) = %q, want %q", in, got, want)
		}
		if again := EscapeText(got); again != got {
			t.Errorf("EscapeText is not idempotent on %q: %q", got, again)
		}
	}
	if got := escapeStored(`a\n` + "\n"); got != `a\\n\n` {
		t.Errorf("escapeStored keeps a literal backslash ambiguous: %q", got)
	}
}

// TestAuditStoredEscaped: every field of an audit entry is stored escaped.
func TestAuditStoredEscaped(t *testing.T) {
	s := open(t)
	ctx := context.Background()
	e := AuditEntry{User: "u\n", Action: "DELETE\t/x", Target: "v\nforged\x1b[2J", Result: "ok\r", RequestID: "id\twith\ttab"}
	if err := s.Audit(ctx, e); err != nil {
		t.Fatal(err)
	}
	log, err := s.AuditLog(ctx, 1)
	if err != nil || len(log) != 1 {
		t.Fatalf("audit log %v %v", log, err)
	}
	got := log[0]
	if got.User != `u\n` || got.Action != `DELETE\t/x` || got.Target != `v\nforged\x1b[2J` || got.Result != `ok\r` || got.RequestID != `id\twith\ttab` {
		t.Errorf("stored entry %+v", got)
	}
}
