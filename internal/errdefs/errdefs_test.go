package errdefs

import (
	"errors"
	"fmt"
	"net/http"
	"testing"
)

func TestRoundTrip(t *testing.T) {
	for _, m := range table {
		wrapped := fmt.Errorf("vm %q: %w", "x", m.err)
		code, status := Classify(WithHint(wrapped, "do this"))
		if code != m.code || status != m.status {
			t.Errorf("%v: %s %d", m.err, code, status)
		}
		back := &Error{Code: code, Message: wrapped.Error()}
		if !errors.Is(back, m.err) {
			t.Errorf("%s does not unwrap to %v", code, m.err)
		}
	}
	if _, st := Classify(errors.New("boom")); st != http.StatusInternalServerError {
		t.Errorf("unknown error status %d", st)
	}
	if HintOf(fmt.Errorf("outer: %w", WithHint(ErrNotFound, "noid list"))) != "noid list" {
		t.Error("hint lost through wrapping")
	}
}
