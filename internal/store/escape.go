package store

import (
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"
)

// EscapeText returns s with everything that could forge lines or columns of
// a log, or drive a terminal, written as a Go escape: control characters
// (\n, \t, \x1b, the C1 range), other non-printable runes such as the bidi
// overrides (\u202e), and bytes that are not UTF-8 (\xff). Printable text,
// spaces included, is unchanged. The result is idempotent: EscapeText of
// its own output changes nothing, so text escaped when it was stored can
// be escaped again for display. It leaves backslashes alone; escapeStored
// also doubles them, so that stored text is unambiguous.
func EscapeText(s string) string { return escape(s, false) }

// escapeStored is EscapeText that also writes a backslash as \\, so that a
// stored "\n" (two characters) cannot be mistaken for an escaped newline.
func escapeStored(s string) string { return escape(s, true) }

func escape(s string, backslash bool) string {
	clean := true
	for _, r := range s {
		if (backslash && r == '\\') || !printable(r) {
			clean = false
			break
		}
	}
	if clean {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); {
		r, n := utf8.DecodeRuneInString(s[i:])
		switch {
		case r == utf8.RuneError && n <= 1:
			b.WriteString(`\x`)
			b.WriteString(strconv.FormatUint(uint64(s[i])>>4, 16))
			b.WriteString(strconv.FormatUint(uint64(s[i])&0xf, 16))
		case r == '\\' && backslash:
			b.WriteString(`\\`)
		case printable(r):
			b.WriteString(s[i : i+n])
		default:
			q := strconv.QuoteRuneToASCII(r) // '\n', '\x1b', '\u202e'
			b.WriteString(q[1 : len(q)-1])
		}
		i += n
	}
	return b.String()
}

func printable(r rune) bool { return r == ' ' || (r != utf8.RuneError && unicode.IsPrint(r)) }
