package fctest

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
)

// SchemaRelPath is where the pinned Firecracker API schema lives, relative to
// the directory that holds the noid checkout (the repository's "..").
const SchemaRelPath = "shared/firecracker/firecracker-v1.16.1.yaml"

// ErrSchemaNotFound is returned by FindSchemaFile when no parent directory
// holds SchemaRelPath.
var ErrSchemaNotFound = errors.New("firecracker API schema not found")

// FindSchemaFile walks up from dir (the test's working directory) and
// returns the first existing <ancestor>/shared/firecracker/firecracker-v1.16.1.yaml.
// The schema is never copied into the repository; tests skip where it is
// absent.
func FindSchemaFile(dir string) (string, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return "", err
	}
	for d := abs; ; d = filepath.Dir(d) {
		p := filepath.Join(d, SchemaRelPath)
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
		if filepath.Dir(d) == d {
			return "", fmt.Errorf("%w: no %s in %s or any parent directory", ErrSchemaNotFound, SchemaRelPath, abs)
		}
	}
}

// Schema is the part of a swagger 2.0 document needed to validate requests:
// the operations and the definitions.
type Schema struct {
	// Version is info.version (the Firecracker release).
	Version string
	// Definitions are the named schemas under "definitions".
	Definitions map[string]any
	// Operations maps "METHOD /path/{template}" to its operation.
	Operations map[string]*Operation
}

// Operation is one method on one path.
type Operation struct {
	// Method (upper case) and Path (a template such as /drives/{drive_id})
	// identify the operation.
	Method, Path string
	// ID is the operationId.
	ID string
	// Body is the schema of the body parameter, or nil if there is none.
	Body any
	// BodyRequired tells whether the body parameter is required.
	BodyRequired bool
}

// LoadSchema reads and parses a swagger 2.0 YAML file.
func LoadSchema(path string) (*Schema, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("loading firecracker API schema: %w", err)
	}
	doc, err := ParseYAML(data)
	if err != nil {
		return nil, fmt.Errorf("loading firecracker API schema %s: %w", path, err)
	}
	root, ok := doc.(map[string]any)
	if !ok || root["swagger"] != "2.0" {
		return nil, fmt.Errorf("loading firecracker API schema %s: not a swagger 2.0 document", path)
	}
	s := &Schema{Operations: map[string]*Operation{}}
	if info, ok := root["info"].(map[string]any); ok {
		s.Version = fmt.Sprint(info["version"])
	}
	s.Definitions, _ = root["definitions"].(map[string]any)
	paths, _ := root["paths"].(map[string]any)
	for p, v := range paths {
		methods, _ := v.(map[string]any)
		for m, o := range methods {
			op, _ := o.(map[string]any)
			oper := &Operation{Method: strings.ToUpper(m), Path: p}
			oper.ID, _ = op["operationId"].(string)
			params, _ := op["parameters"].([]any)
			for _, pa := range params {
				param, _ := pa.(map[string]any)
				if param["in"] == "body" {
					oper.Body = param["schema"]
					oper.BodyRequired = param["required"] == true
				}
			}
			s.Operations[oper.Method+" "+p] = oper
		}
	}
	if len(s.Operations) == 0 || len(s.Definitions) == 0 {
		return nil, fmt.Errorf("loading firecracker API schema %s: no paths or definitions", path)
	}
	return s, nil
}

// Lookup finds the operation for a concrete method and URL path, matching
// path templates such as /drives/{drive_id}.
func (s *Schema) Lookup(method, urlPath string) (*Operation, bool) {
	if op, ok := s.Operations[method+" "+urlPath]; ok {
		return op, true
	}
	got := strings.Split(urlPath, "/")
	keys := make([]string, 0, len(s.Operations))
	for k := range s.Operations {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		op := s.Operations[k]
		if op.Method != method {
			continue
		}
		tmpl := strings.Split(op.Path, "/")
		if len(tmpl) != len(got) {
			continue
		}
		match := true
		for i := range tmpl {
			if strings.HasPrefix(tmpl[i], "{") && strings.HasSuffix(tmpl[i], "}") {
				if got[i] == "" {
					match = false
				}
				continue
			}
			if tmpl[i] != got[i] {
				match = false
				break
			}
		}
		if match {
			return op, true
		}
	}
	return nil, false
}

// ValidateRequest checks one request the way Firecracker would accept it:
// the method and path exist, and the body is valid JSON that satisfies the
// body parameter's schema (see Validate).
func (s *Schema) ValidateRequest(method, urlPath string, body []byte) error {
	op, ok := s.Lookup(method, urlPath)
	if !ok {
		return fmt.Errorf("%s %s: no such operation in the firecracker %s API", method, urlPath, s.Version)
	}
	if len(bytes.TrimSpace(body)) == 0 {
		if op.Body != nil && op.BodyRequired {
			return fmt.Errorf("%s %s (%s): the body is required", method, urlPath, op.ID)
		}
		return nil
	}
	if op.Body == nil {
		return fmt.Errorf("%s %s (%s): the operation takes no body", method, urlPath, op.ID)
	}
	if err := s.Validate(op.Body, body); err != nil {
		return fmt.Errorf("%s %s (%s): %w", method, urlPath, op.ID, err)
	}
	return nil
}

// Validate checks a JSON document against a schema node (which may be a
// {$ref: ...}). Checked: types (object, array, string, integer with int32
// and int64 ranges, number, boolean), required properties, enums,
// minimum/maximum, array items, readOnly properties (which a request must
// not send), and unknown properties.
//
// Unknown properties are rejected unless the schema says
// additionalProperties: true. Swagger's default would allow them, but
// Firecracker deserialises every request with serde's deny_unknown_fields
// and answers 400, so the strict reading is the one that matches the
// server. JSON null is rejected everywhere, because Firecracker's
// non-optional fields reject it and noid never needs to send it.
func (s *Schema) Validate(schema any, doc []byte) error {
	dec := json.NewDecoder(bytes.NewReader(doc))
	dec.UseNumber()
	var v any
	if err := dec.Decode(&v); err != nil {
		return fmt.Errorf("body is not valid JSON: %w", err)
	}
	if dec.More() {
		return fmt.Errorf("body has trailing data after the JSON value")
	}
	var errs []string
	s.validate(schema, v, "body", &errs)
	if len(errs) > 0 {
		return fmt.Errorf("schema violation: %s", strings.Join(errs, "; "))
	}
	return nil
}

// ValidateDefinition validates doc against the named definition.
func (s *Schema) ValidateDefinition(name string, doc []byte) error {
	if _, ok := s.Definitions[name]; !ok {
		return fmt.Errorf("no definition %q in the schema", name)
	}
	return s.Validate(map[string]any{"$ref": "#/definitions/" + name}, doc)
}

func (s *Schema) resolve(node any) (map[string]any, error) {
	for range 32 {
		m, ok := node.(map[string]any)
		if !ok {
			return nil, fmt.Errorf("schema node is %T, not an object", node)
		}
		ref, ok := m["$ref"].(string)
		if !ok {
			return m, nil
		}
		name, ok := strings.CutPrefix(ref, "#/definitions/")
		if !ok {
			return nil, fmt.Errorf("unsupported $ref %q", ref)
		}
		node, ok = s.Definitions[name]
		if !ok {
			return nil, fmt.Errorf("$ref to missing definition %q", name)
		}
	}
	return nil, fmt.Errorf("$ref loop")
}

func (s *Schema) validate(node, v any, at string, errs *[]string) {
	fail := func(format string, args ...any) {
		*errs = append(*errs, at+": "+fmt.Sprintf(format, args...))
	}
	sch, err := s.resolve(node)
	if err != nil {
		fail("%v", err)
		return
	}
	if v == nil {
		fail("null is not allowed")
		return
	}
	typ, _ := sch["type"].(string)
	if typ == "" && sch["properties"] != nil {
		typ = "object"
	}
	switch typ {
	case "object":
		obj, ok := v.(map[string]any)
		if !ok {
			fail("want an object, got %s", jsonType(v))
			return
		}
		props, _ := sch["properties"].(map[string]any)
		if req, ok := sch["required"].([]any); ok {
			for _, r := range req {
				if _, present := obj[fmt.Sprint(r)]; !present {
					fail("required property %q is missing", r)
				}
			}
		}
		keys := make([]string, 0, len(obj))
		for k := range obj {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			if p, ok := props[k]; ok {
				if pm, _ := p.(map[string]any); pm != nil && pm["readOnly"] == true {
					fail("property %q is read-only and must not be sent", k)
				}
				s.validate(p, obj[k], at+"."+k, errs)
				continue
			}
			switch ap := sch["additionalProperties"].(type) {
			case bool:
				if ap {
					continue
				}
			case map[string]any:
				s.validate(ap, obj[k], at+"."+k, errs)
				continue
			}
			fail("unknown property %q (Firecracker rejects unknown fields)", k)
		}
	case "array":
		arr, ok := v.([]any)
		if !ok {
			fail("want an array, got %s", jsonType(v))
			return
		}
		if items, ok := sch["items"]; ok {
			for i, it := range arr {
				s.validate(items, it, fmt.Sprintf("%s[%d]", at, i), errs)
			}
		}
	case "string":
		if _, ok := v.(string); !ok {
			fail("want a string, got %s", jsonType(v))
			return
		}
	case "boolean":
		if _, ok := v.(bool); !ok {
			fail("want a boolean, got %s", jsonType(v))
			return
		}
	case "integer", "number":
		n, ok := v.(json.Number)
		if !ok {
			fail("want %s, got %s", typ, jsonType(v))
			return
		}
		f, err := n.Float64()
		if err != nil {
			fail("bad number %s", n)
			return
		}
		if typ == "integer" {
			i, err := n.Int64()
			if err != nil {
				fail("want an integer, got %s", n)
				return
			}
			switch sch["format"] {
			case "int32":
				if i < math.MinInt32 || i > math.MaxInt32 {
					fail("%d does not fit int32", i)
				}
			}
		}
		if min, ok := toFloat(sch["minimum"]); ok && f < min {
			fail("%s is below the minimum %v", n, min)
		}
		if max, ok := toFloat(sch["maximum"]); ok && f > max {
			fail("%s is above the maximum %v", n, max)
		}
	case "":
		// No type: anything goes (e.g. free-form MMDS content).
	default:
		fail("unsupported schema type %q", typ)
		return
	}
	if enum, ok := sch["enum"].([]any); ok {
		if !slices.ContainsFunc(enum, func(e any) bool { return fmt.Sprint(e) == fmt.Sprint(v) }) {
			fail("%v is not one of %v", v, enum)
		}
	}
}

func toFloat(v any) (float64, bool) {
	switch x := v.(type) {
	case int64:
		return float64(x), true
	case float64:
		return x, true
	}
	return 0, false
}

func jsonType(v any) string {
	switch v.(type) {
	case map[string]any:
		return "an object"
	case []any:
		return "an array"
	case string:
		return "a string"
	case bool:
		return "a boolean"
	case json.Number:
		return "a number"
	case nil:
		return "null"
	}
	return fmt.Sprintf("%T", v)
}
