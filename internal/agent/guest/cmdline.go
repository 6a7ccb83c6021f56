package guest

import (
	"os"
	"strings"
)

// Cmdline is the parsed kernel command line: key=value parameters, and
// bare words mapped to "". For repeated keys the last one wins.
type Cmdline map[string]string

// ParseCmdline parses a kernel command line. Double quotes group words
// (key="a b"); the quotes are removed.
func ParseCmdline(s string) Cmdline {
	c := Cmdline{}
	var word strings.Builder
	inQuote := false
	flush := func() {
		if word.Len() == 0 {
			return
		}
		k, v, _ := strings.Cut(word.String(), "=")
		c[k] = v
		word.Reset()
	}
	for _, r := range s {
		switch {
		case r == '"':
			inQuote = !inQuote
		case !inQuote && (r == ' ' || r == '\t' || r == '\n'):
			flush()
		default:
			word.WriteRune(r)
		}
	}
	flush()
	return c
}

// ReadCmdline reads /proc/cmdline; it returns an empty Cmdline if it cannot.
func ReadCmdline() Cmdline {
	b, err := os.ReadFile("/proc/cmdline")
	if err != nil {
		return Cmdline{}
	}
	return ParseCmdline(string(b))
}

// Get returns the value of key, or def if key is absent or empty.
func (c Cmdline) Get(key, def string) string {
	if v, ok := c[key]; ok && v != "" {
		return v
	}
	return def
}

// Has reports whether key appears, with or without a value.
func (c Cmdline) Has(key string) bool {
	_, ok := c[key]
	return ok
}
