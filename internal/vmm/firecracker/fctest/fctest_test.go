package fctest

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func TestParseYAMLSubset(t *testing.T) {
	src := `swagger: "2.0"   # a comment
info:
  title: Test API
  version: 1.16.1
  description: A plain scalar
    that continues on the next line.

    And a second paragraph.
list:
  - one
  - "two, quoted"
  - 3
  - true
  - name: drive_id
    in: path
    required: true
  -
    nested: value
sameIndentList:
- a
- b
flow: [Error, "Warning", 'it''s', 42]
empty_flow: []
empty_map: {}
quoted_multiline:
  "[x86_64 only] When set to true,
  passes KVM_CLOCK_REALTIME."
single: 'a # not a comment'
"/drives/{drive_id}":
  put: {}
200:
  description: ok
colons: api_server::request
null_value:
tilde: ~
float: 1.5
`
	got, err := ParseYAML([]byte(src))
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]any{
		"swagger": "2.0",
		"info": map[string]any{
			"title":       "Test API",
			"version":     "1.16.1",
			"description": "A plain scalar that continues on the next line.\nAnd a second paragraph.",
		},
		"list": []any{"one", "two, quoted", int64(3), true,
			map[string]any{"name": "drive_id", "in": "path", "required": true},
			map[string]any{"nested": "value"}},
		"sameIndentList":     []any{"a", "b"},
		"flow":               []any{"Error", "Warning", "it's", int64(42)},
		"empty_flow":         []any{},
		"empty_map":          map[string]any{},
		"quoted_multiline":   "[x86_64 only] When set to true, passes KVM_CLOCK_REALTIME.",
		"single":             "a # not a comment",
		"/drives/{drive_id}": map[string]any{"put": map[string]any{}},
		"200":                map[string]any{"description": "ok"},
		"colons":             "api_server::request",
		"null_value":         nil,
		"tilde":              nil,
		"float":              1.5,
	}
	if !reflect.DeepEqual(got, want) {
		for k, v := range want {
			if !reflect.DeepEqual(got.(map[string]any)[k], v) {
				t.Errorf("%s: got %#v, want %#v", k, got.(map[string]any)[k], v)
			}
		}
		t.FailNow()
	}
}

func TestParseYAMLRejectsUnsupported(t *testing.T) {
	for name, src := range map[string]string{
		"block scalar":  "a: |\n  text\n",
		"anchor":        "a: &x 1\n",
		"alias":         "a: *x\n",
		"tag":           "a: !!str 1\n",
		"flow mapping":  "a: {b: 1}\n",
		"tab indent":    "a:\n\tb: 1\n",
		"two documents": "a: 1\n---\nb: 2\n",
		"duplicate key": "a: 1\na: 2\n",
		"bad indent":    "a:\n    b: 1\n  c: 2\n",
		"unterminated":  "a: \"open\n",
		"not a mapping": "a: 1\njust text\n",
	} {
		if _, err := ParseYAML([]byte(src)); err == nil {
			t.Errorf("%s: parsed without error", name)
		} else {
			t.Logf("%s: %v", name, err)
		}
	}
}

func TestFindSchemaFileAbsent(t *testing.T) {
	_, err := FindSchemaFile(t.TempDir())
	if !errors.Is(err, ErrSchemaNotFound) {
		t.Fatalf("got %v", err)
	}
	// A layout like the real one is found from deep inside the "repo".
	root := t.TempDir()
	os.MkdirAll(filepath.Join(root, "shared", "firecracker"), 0o755)
	os.WriteFile(filepath.Join(root, SchemaRelPath), []byte("swagger: \"2.0\"\n"), 0o644)
	deep := filepath.Join(root, "main", "internal", "vmm", "firecracker")
	os.MkdirAll(deep, 0o755)
	got, err := FindSchemaFile(deep)
	if err != nil || got != filepath.Join(root, SchemaRelPath) {
		t.Fatalf("got %q %v", got, err)
	}
}

// realSchema loads the pinned schema or skips, saying why.
func realSchema(t *testing.T) *Schema {
	t.Helper()
	wd, _ := os.Getwd()
	path, err := FindSchemaFile(wd)
	if errors.Is(err, ErrSchemaNotFound) {
		t.Skipf("SKIP: the Firecracker API schema is absent (%v); it is expected at ../shared/firecracker/ next to the repository", err)
	}
	s, err := LoadSchema(path)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestLoadRealSchema(t *testing.T) {
	s := realSchema(t)
	if s.Version != "1.16.1" {
		t.Fatalf("version %q", s.Version)
	}
	for _, op := range []string{"PUT /snapshot/load", "PATCH /vm", "GET /", "PUT /drives/{drive_id}"} {
		if _, ok := s.Operations[op]; !ok {
			t.Errorf("missing %s", op)
		}
	}
	if op, ok := s.Lookup("PUT", "/drives/rootfs"); !ok || op.ID != "putGuestDriveByID" || !op.BodyRequired {
		t.Fatalf("lookup of a templated path: %+v %v", op, ok)
	}
	if _, ok := s.Lookup("PUT", "/drives/"); ok {
		t.Fatal("empty path parameter matched")
	}
	if _, ok := s.Lookup("DELETE", "/vm"); ok {
		t.Fatal("unknown method matched")
	}
}

// TestValidatorRejects proves the validator is not vacuous: each kind of
// violation the contract relies on is caught.
func TestValidatorRejects(t *testing.T) {
	s := realSchema(t)
	ok := map[string]string{
		"PUT /machine-config": `{"vcpu_count":2,"mem_size_mib":256}`,
		"PATCH /vm":           `{"state":"Paused"}`,
		"PUT /snapshot/load":  `{"snapshot_path":"s","mem_backend":{"backend_type":"File","backend_path":"m"}}`,
		"PUT /entropy":        `{}`,
		"PUT /drives/rootfs":  `{"drive_id":"rootfs","is_root_device":false,"path_on_host":"r"}`,
	}
	for req, body := range ok {
		m, p, _ := strings.Cut(req, " ")
		if err := s.ValidateRequest(m, p, []byte(body)); err != nil {
			t.Errorf("%s %s rejected: %v", req, body, err)
		}
	}
	bad := []struct{ req, body, want string }{
		{"PUT /machine-config", `{"vcpu_count":2}`, `required property "mem_size_mib"`},
		{"PUT /machine-config", `{"vcpu_count":"2","mem_size_mib":256}`, "want integer"},
		{"PUT /machine-config", `{"vcpu_count":2.5,"mem_size_mib":256}`, "want an integer"},
		{"PUT /machine-config", `{"vcpu_count":33,"mem_size_mib":256}`, "above the maximum"},
		{"PUT /machine-config", `{"vcpu_count":0,"mem_size_mib":256}`, "below the minimum"},
		{"PUT /machine-config", `{"vcpu_count":1,"mem_size_mib":256,"huge_pages":"1G"}`, "is not one of"},
		{"PUT /machine-config", `{"vcpu_count":1,"mem_size_mib":256,"ht_enabled":true}`, `unknown property "ht_enabled"`},
		{"PUT /machine-config", `{"vcpu_count":1,"mem_size_mib":null}`, "null"},
		{"PATCH /vm", `{"state":"Stopped"}`, "is not one of"},
		{"PUT /snapshot/load", `{"snapshot_path":"s","mem_backend":{"backend_type":"File"}}`, `required property "backend_path"`},
		{"PUT /snapshot/load", `{"snapshot_path":"s","network_overrides":{"iface_id":"x"}}`, "want an array"},
		{"PUT /snapshot/load", `{"snapshot_path":"s","vsock_override":{"uds_path":1}}`, "want a string"},
		{"PUT /snapshot/create", `{"snapshot_path":"s","mem_file_path":"m","version":"1.0"}`, `unknown property "version"`},
		{"PUT /drives/rootfs", `{"drive_id":"rootfs","is_root_device":"no"}`, "want a boolean"},
		{"PUT /drives/rootfs", `{"drive_id":"r","is_root_device":false,"rate_limiter":{"bandwidth":{"size":1}}}`, `required property "refill_time"`},
		{"PUT /drives/rootfs", `not json`, "not valid JSON"},
		{"PUT /drives/rootfs", `{} {}`, "trailing data"},
		{"PUT /drives/rootfs", ``, "body is required"},
		{"PUT /vms", `{}`, "no such operation"},
		{"GET /version", `{}`, "takes no body"},
	}
	for _, b := range bad {
		m, p, _ := strings.Cut(b.req, " ")
		err := s.ValidateRequest(m, p, []byte(b.body))
		if err == nil || !strings.Contains(err.Error(), b.want) {
			t.Errorf("%s %s: got %v, want an error containing %q", b.req, b.body, err, b.want)
		}
	}
	// readOnly: the Error definition's fault_message must never be sent.
	if err := s.ValidateDefinition("Error", []byte(`{"fault_message":"x"}`)); err == nil || !strings.Contains(err.Error(), "read-only") {
		t.Errorf("readOnly property accepted: %v", err)
	}
	// Free-form objects (additionalProperties: true) accept anything.
	if err := s.ValidateRequest("PUT", "/mmds", []byte(`{"latest":{"meta-data":{"x":1}}}`)); err != nil {
		t.Errorf("MMDS content rejected: %v", err)
	}
}
