package fctest

import (
	"fmt"
	"strconv"
	"strings"
)

// ParseYAML parses the subset of YAML 1.2 that Firecracker's swagger file
// uses, into map[string]any, []any, string, bool, int64, float64 and nil:
//
//   - block mappings and block sequences (including "- key: value" items and
//     sequences at the same indentation as their parent key);
//   - plain scalars, single- and multi-line; double- and single-quoted
//     scalars, also spanning lines (folded with single spaces);
//   - flow sequences of scalars ([a, "b", 3]) and the empty flow mapping {};
//   - comments and blank lines.
//
// Anything else (anchors, aliases, tags, block scalars | and >, flow
// mappings with content, multiple documents, tabs in indentation) is
// rejected with an error naming the line, so a schema that starts using a
// feature this parser lacks fails loudly instead of parsing wrong. Mapping
// keys are always strings.
func ParseYAML(data []byte) (any, error) {
	p := &yparser{}
	for i, raw := range strings.Split(strings.ReplaceAll(string(data), "\r\n", "\n"), "\n") {
		ind := 0
		for ind < len(raw) && raw[ind] == ' ' {
			ind++
		}
		if ind < len(raw) && raw[ind] == '\t' {
			return nil, fmt.Errorf("yaml line %d: tab in indentation", i+1)
		}
		text := strings.TrimRight(raw[ind:], " \t")
		if text == "---" || text == "..." {
			if i == 0 && text == "---" {
				continue
			}
			return nil, fmt.Errorf("yaml line %d: multiple documents are not supported", i+1)
		}
		p.lines = append(p.lines, yline{num: i + 1, indent: ind, text: text})
	}
	p.skip()
	if p.eof() {
		return nil, nil
	}
	v, err := p.block(-1)
	if err != nil {
		return nil, err
	}
	p.skip()
	if !p.eof() {
		l := p.cur()
		return nil, fmt.Errorf("yaml line %d: unexpected content %q (bad indentation?)", l.num, l.text)
	}
	return v, nil
}

type yline struct {
	num    int
	indent int
	text   string // the line without its indentation and trailing spaces
}

type yparser struct {
	lines []yline
	pos   int
}

func (p *yparser) eof() bool       { return p.pos >= len(p.lines) }
func (p *yparser) cur() yline      { return p.lines[p.pos] }
func blankOrComment(t string) bool { return t == "" || strings.HasPrefix(t, "#") }
func isSeqItem(t string) bool      { return t == "-" || strings.HasPrefix(t, "- ") }

// skip moves past blank and comment-only lines.
func (p *yparser) skip() {
	for !p.eof() && blankOrComment(p.cur().text) {
		p.pos++
	}
}

// block parses the node starting at the current line, which must be
// indented more than parent.
func (p *yparser) block(parent int) (any, error) {
	p.skip()
	if p.eof() || p.cur().indent <= parent {
		return nil, nil
	}
	l := p.cur()
	if isSeqItem(l.text) {
		return p.seq(l.indent)
	}
	if _, _, ok, err := splitKey(l.text); err != nil {
		return nil, fmt.Errorf("yaml line %d: %w", l.num, err)
	} else if ok {
		return p.mapping(l.indent)
	}
	// A scalar on its own line(s), the value of a key on an earlier line.
	p.pos++
	return p.scalar(l.text, parent, l.num)
}

// mapping parses a block mapping whose keys sit at column ind.
func (p *yparser) mapping(ind int) (any, error) {
	m := map[string]any{}
	for {
		p.skip()
		if p.eof() {
			return m, nil
		}
		l := p.cur()
		if l.indent < ind {
			return m, nil
		}
		if l.indent > ind {
			return nil, fmt.Errorf("yaml line %d: unexpected indentation", l.num)
		}
		if isSeqItem(l.text) {
			return m, nil // a sequence at our level ends the mapping
		}
		key, rest, ok, err := splitKey(l.text)
		if err != nil {
			return nil, fmt.Errorf("yaml line %d: %w", l.num, err)
		}
		if !ok {
			return nil, fmt.Errorf("yaml line %d: expected \"key: value\", got %q", l.num, l.text)
		}
		if _, dup := m[key]; dup {
			return nil, fmt.Errorf("yaml line %d: duplicate key %q", l.num, key)
		}
		p.pos++
		var v any
		if rest == "" || strings.HasPrefix(rest, "#") {
			p.skip()
			switch {
			case p.eof():
			case p.cur().indent > ind:
				v, err = p.block(ind)
			case p.cur().indent == ind && isSeqItem(p.cur().text):
				v, err = p.seq(ind)
			}
		} else {
			v, err = p.scalar(rest, ind, l.num)
		}
		if err != nil {
			return nil, err
		}
		m[key] = v
	}
}

// seq parses a block sequence whose dashes sit at column ind.
func (p *yparser) seq(ind int) (any, error) {
	out := []any{}
	for {
		p.skip()
		if p.eof() {
			return out, nil
		}
		l := p.cur()
		if l.indent != ind || !isSeqItem(l.text) {
			if l.indent > ind {
				return nil, fmt.Errorf("yaml line %d: unexpected indentation", l.num)
			}
			return out, nil
		}
		after := strings.TrimPrefix(l.text, "-")
		rest := strings.TrimLeft(after, " ")
		col := ind + 1 + (len(after) - len(rest))
		var v any
		var err error
		switch {
		case rest == "" || strings.HasPrefix(rest, "#"):
			p.pos++
			v, err = p.block(ind)
		default:
			if _, _, ok, kerr := splitKey(rest); kerr != nil {
				return nil, fmt.Errorf("yaml line %d: %w", l.num, kerr)
			} else if ok || isSeqItem(rest) {
				// "- key: value": the item is a node starting at col, whose
				// first line is the rest of this one.
				p.lines[p.pos] = yline{num: l.num, indent: col, text: rest}
				v, err = p.block(ind)
			} else {
				p.pos++
				v, err = p.scalar(rest, ind, l.num)
			}
		}
		if err != nil {
			return nil, err
		}
		out = append(out, v)
	}
}

// splitKey splits "key: rest" (or "key:"), honouring quoted keys. ok is
// false when the text is not a mapping entry.
func splitKey(t string) (key, rest string, ok bool, err error) {
	if t == "" {
		return "", "", false, nil
	}
	if t[0] == '"' || t[0] == '\'' {
		end := closingQuote(t, t[0])
		if end < 0 {
			return "", "", false, nil
		}
		after := t[end+1:]
		if after != ":" && !strings.HasPrefix(after, ": ") {
			return "", "", false, nil
		}
		k, err := unquote(t[:end+1])
		if err != nil {
			return "", "", false, err
		}
		return k, strings.TrimSpace(strings.TrimPrefix(after, ":")), true, nil
	}
	switch t[0] {
	case '[', '{', '#', '&', '*', '!', '|', '>', '%', '@', '`':
		return "", "", false, nil
	}
	for i := 0; i < len(t); i++ {
		if t[i] == '#' && i > 0 && t[i-1] == ' ' {
			return "", "", false, nil // a comment before any colon
		}
		if t[i] == ':' && (i == len(t)-1 || t[i+1] == ' ') {
			return strings.TrimSpace(t[:i]), strings.TrimSpace(t[i+1:]), true, nil
		}
	}
	return "", "", false, nil
}

// scalar parses a scalar value that starts with first (on line num) and may
// continue on following lines indented more than parent.
func (p *yparser) scalar(first string, parent, num int) (any, error) {
	switch first[0] {
	case '"', '\'':
		return p.quoted(first, parent, num)
	case '[':
		return p.flowSeq(first, parent, num)
	case '{':
		if strings.TrimSpace(stripComment(first)) == "{}" {
			return map[string]any{}, nil
		}
		return nil, fmt.Errorf("yaml line %d: flow mappings are not supported", num)
	case '|', '>':
		return nil, fmt.Errorf("yaml line %d: block scalars (| and >) are not supported", num)
	case '&', '*', '!':
		return nil, fmt.Errorf("yaml line %d: anchors, aliases and tags are not supported", num)
	}
	parts := []string{stripComment(first)}
	for !p.eof() {
		l := p.cur()
		if l.text == "" {
			// A blank line inside a multi-line plain scalar is a newline, if
			// the scalar continues after it.
			j := p.pos
			for j < len(p.lines) && p.lines[j].text == "" {
				j++
			}
			if j < len(p.lines) && p.lines[j].indent > parent && !strings.HasPrefix(p.lines[j].text, "#") {
				parts = append(parts, "\n")
				p.pos = j
				continue
			}
			break
		}
		if l.indent <= parent || strings.HasPrefix(l.text, "#") {
			break
		}
		parts = append(parts, stripComment(l.text))
		p.pos++
	}
	return resolvePlain(foldLines(parts)), nil
}

// foldLines joins the lines of a multi-line scalar: a line break becomes a
// space, a blank line a newline.
func foldLines(parts []string) string {
	var b strings.Builder
	for i, s := range parts {
		if s == "\n" {
			b.WriteString("\n")
			continue
		}
		if i > 0 && parts[i-1] != "\n" {
			b.WriteString(" ")
		}
		b.WriteString(strings.TrimSpace(s))
	}
	return strings.TrimSpace(b.String())
}

// quoted parses a single- or double-quoted scalar, possibly spanning lines.
func (p *yparser) quoted(first string, parent, num int) (any, error) {
	q := first[0]
	text := first
	for closingQuote(text, q) < 0 {
		if p.eof() {
			return nil, fmt.Errorf("yaml line %d: unterminated quoted string", num)
		}
		l := p.cur()
		if l.text != "" && l.indent <= parent {
			return nil, fmt.Errorf("yaml line %d: unterminated quoted string", num)
		}
		if l.text == "" {
			text += "\n"
		} else if strings.HasSuffix(text, "\n") {
			text += l.text
		} else {
			text += " " + l.text
		}
		p.pos++
	}
	end := closingQuote(text, q)
	if tail := strings.TrimSpace(text[end+1:]); tail != "" && !strings.HasPrefix(tail, "#") {
		return nil, fmt.Errorf("yaml line %d: unexpected %q after quoted string", num, tail)
	}
	return unquote(text[:end+1])
}

// flowSeq parses a flow sequence of scalars.
func (p *yparser) flowSeq(first string, parent, num int) (any, error) {
	text := stripComment(first)
	for !strings.HasSuffix(strings.TrimSpace(text), "]") {
		if p.eof() || p.cur().indent <= parent {
			return nil, fmt.Errorf("yaml line %d: unterminated flow sequence", num)
		}
		text += " " + stripComment(p.cur().text)
		p.pos++
	}
	inner := strings.TrimSpace(text)
	inner = strings.TrimSpace(inner[1 : len(inner)-1])
	out := []any{}
	if inner == "" {
		return out, nil
	}
	for _, item := range splitFlow(inner) {
		item = strings.TrimSpace(item)
		if item == "" {
			continue
		}
		switch item[0] {
		case '"', '\'':
			s, err := unquote(item)
			if err != nil {
				return nil, fmt.Errorf("yaml line %d: %w", num, err)
			}
			out = append(out, s)
		case '[', '{':
			return nil, fmt.Errorf("yaml line %d: nested flow collections are not supported", num)
		default:
			out = append(out, resolvePlain(item))
		}
	}
	return out, nil
}

// splitFlow splits flow-sequence content at commas outside quotes.
func splitFlow(s string) []string {
	var out []string
	start := 0
	var q byte
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case q != 0:
			if c == '\\' && q == '"' {
				i++
			} else if c == q {
				q = 0
			}
		case c == '"' || c == '\'':
			q = c
		case c == ',':
			out = append(out, s[start:i])
			start = i + 1
		}
	}
	return append(out, s[start:])
}

// closingQuote returns the index of the quote closing the string that
// starts at s[0], or -1.
func closingQuote(s string, q byte) int {
	for i := 1; i < len(s); i++ {
		switch {
		case q == '"' && s[i] == '\\':
			i++
		case q == '\'' && s[i] == '\'' && i+1 < len(s) && s[i+1] == '\'':
			i++
		case s[i] == q:
			return i
		}
	}
	return -1
}

// unquote decodes a complete quoted scalar.
func unquote(s string) (string, error) {
	if s[0] == '\'' {
		return strings.ReplaceAll(s[1:len(s)-1], "''", "'"), nil
	}
	body := s[1 : len(s)-1]
	var b strings.Builder
	for i := 0; i < len(body); i++ {
		c := body[i]
		if c != '\\' {
			b.WriteByte(c)
			continue
		}
		i++
		if i >= len(body) {
			return "", fmt.Errorf("bad escape at end of %s", s)
		}
		switch body[i] {
		case 'n':
			b.WriteByte('\n')
		case 't':
			b.WriteByte('\t')
		case 'r':
			b.WriteByte('\r')
		case '0':
			b.WriteByte(0)
		case '"', '\\', '/', ' ':
			b.WriteByte(body[i])
		case 'u', 'x', 'U':
			n := map[byte]int{'x': 2, 'u': 4, 'U': 8}[body[i]]
			if i+n >= len(body) {
				return "", fmt.Errorf("bad escape in %s", s)
			}
			v, err := strconv.ParseUint(body[i+1:i+1+n], 16, 32)
			if err != nil {
				return "", fmt.Errorf("bad escape in %s: %w", s, err)
			}
			b.WriteRune(rune(v))
			i += n
		default:
			return "", fmt.Errorf("unsupported escape \\%c in %s", body[i], s)
		}
	}
	return b.String(), nil
}

// stripComment removes a trailing " # comment" from a plain line.
func stripComment(s string) string {
	var q byte
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case q != 0:
			if c == q {
				q = 0
			}
		case (c == '"' || c == '\'') && (i == 0 || s[i-1] == ' ' || s[i-1] == '[' || s[i-1] == ','):
			q = c
		case c == '#' && (i == 0 || s[i-1] == ' '):
			return strings.TrimRight(s[:i], " ")
		}
	}
	return s
}

// resolvePlain gives a plain scalar its YAML 1.2 core-schema type.
func resolvePlain(s string) any {
	switch s {
	case "", "~", "null", "Null", "NULL":
		return nil
	case "true", "True", "TRUE":
		return true
	case "false", "False", "FALSE":
		return false
	}
	if i, err := strconv.ParseInt(s, 10, 64); err == nil {
		return i
	}
	if strings.ContainsAny(s, "0123456789") && !strings.ContainsAny(s, "_xob") {
		if f, err := strconv.ParseFloat(s, 64); err == nil {
			return f
		}
	}
	return s
}
