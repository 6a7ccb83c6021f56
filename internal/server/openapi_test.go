package server

import (
	"encoding/json"
	"net/http/httptest"
	"reflect"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/noid-vm/noid/internal/api"
)

type oaSchema struct {
	Type       string               `json:"type"`
	Format     string               `json:"format"`
	Nullable   bool                 `json:"nullable"`
	Ref        string               `json:"$ref"`
	Required   []string             `json:"required"`
	Properties map[string]*oaSchema `json:"properties"`
	Items      *oaSchema            `json:"items"`
}

type oaDoc struct {
	OpenAPI string `json:"openapi"`
	Info    struct {
		Version string `json:"version"`
	} `json:"info"`
	Paths      map[string]map[string]json.RawMessage `json:"paths"`
	Components struct {
		Schemas map[string]*oaSchema `json:"schemas"`
	} `json:"components"`
}

func loadDoc(t *testing.T, b []byte) *oaDoc {
	t.Helper()
	var d oaDoc
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatalf("openapi.json is not valid JSON: %v", err)
	}
	return &d
}

// docRoutes lists "METHOD /path" for every operation in the document.
func docRoutes(d *oaDoc) []string {
	var out []string
	for p, item := range d.Paths {
		for m := range item {
			switch m {
			case "get", "put", "post", "delete", "patch", "head", "options", "trace":
				out = append(out, strings.ToUpper(m)+" "+p)
			}
		}
	}
	sort.Strings(out)
	return out
}

// TestOpenAPIRouteParity: every route the server registers is in the
// document, and nothing else is.
func TestOpenAPIRouteParity(t *testing.T) {
	d := loadDoc(t, OpenAPI())
	if !strings.HasPrefix(d.OpenAPI, "3.") {
		t.Errorf("openapi version %q, want 3.x", d.OpenAPI)
	}
	if d.Info.Version != api.Version {
		t.Errorf("document version %q, api.Version %q", d.Info.Version, api.Version)
	}
	registered := new(Server).Routes()
	sort.Strings(registered)
	documented := docRoutes(d)
	for _, r := range registered {
		if !slices.Contains(documented, r) {
			t.Errorf("route %s is registered but not in openapi.json", r)
		}
	}
	for _, r := range documented {
		if !slices.Contains(registered, r) {
			t.Errorf("openapi.json documents %s, which the server does not register", r)
		}
	}
	if len(registered) < 20 {
		t.Errorf("only %d routes registered; Routes() looks broken", len(registered))
	}
}

// TestOpenAPIRefsResolve: every $ref points at something in the document.
func TestOpenAPIRefsResolve(t *testing.T) {
	var raw map[string]any
	if err := json.Unmarshal(OpenAPI(), &raw); err != nil {
		t.Fatal(err)
	}
	var walk func(v any)
	n := 0
	walk = func(v any) {
		switch x := v.(type) {
		case map[string]any:
			if ref, ok := x["$ref"].(string); ok {
				n++
				parts := strings.Split(strings.TrimPrefix(ref, "#/"), "/")
				var cur any = raw
				for _, p := range parts {
					m, ok := cur.(map[string]any)
					if !ok || m[p] == nil {
						t.Errorf("$ref %s does not resolve", ref)
						return
					}
					cur = m[p]
				}
			}
			for _, c := range x {
				walk(c)
			}
		case []any:
			for _, c := range x {
				walk(c)
			}
		}
	}
	walk(raw)
	if n == 0 {
		t.Fatal("no $ref found")
	}
}

// TestOpenAPISchemasMatchTypes: each schema has exactly the JSON fields of
// its Go type, with matching types; for responses, a field is required
// exactly when the server always sends it (no omitempty).
func TestOpenAPISchemasMatchTypes(t *testing.T) {
	d := loadDoc(t, OpenAPI())
	responses := map[string]any{
		"ErrorBody": api.ErrorBody{}, "ErrorDetail": api.ErrorDetail{}, "VersionInfo": api.VersionInfo{},
		"WhoAmI": api.WhoAmI{}, "VM": api.VM{}, "Timings": api.Timings{}, "DestroyResult": api.DestroyResult{},
		"Checkpoint": api.Checkpoint{}, "Golden": api.Golden{}, "StreamMsg": api.StreamMsg{},
		"PutFilesResult": api.PutFilesResult{}, "FileInfo": api.FileInfo{},
		"User": api.User{}, "Quota": api.Quota{}, "UserToken": api.UserToken{},
		"Capabilities": api.Capabilities{}, "CapabilityDefaults": api.CapabilityDefaults{},
		"CapabilityLimits": api.CapabilityLimits{}, "CapabilityQuota": api.CapabilityQuota{}, "QuotaUsage": api.QuotaUsage{},
		"RemoteSnapshot": api.RemoteSnapshot{}, "RemoteTransfer": api.RemoteTransfer{},
	}
	requests := map[string]any{
		"CreateVMRequest": api.CreateVMRequest{}, "CheckpointRequest": api.CheckpointRequest{},
		"RestoreRequest": api.RestoreRequest{}, "GoldenPromoteRequest": api.GoldenPromoteRequest{},
		"ExecRequest": api.ExecRequest{}, "CreateUserRequest": api.CreateUserRequest{},
		"RemotePushRequest": api.RemotePushRequest{}, "RemoteCloneRequest": api.RemoteCloneRequest{}, "GoldenRemoteRequest": api.GoldenRemoteRequest{},
	}
	check := func(name string, v any, response bool) {
		s := d.Components.Schemas[name]
		if s == nil {
			t.Errorf("schema %s missing", name)
			return
		}
		typ := reflect.TypeOf(v)
		seen := map[string]bool{}
		for i := 0; i < typ.NumField(); i++ {
			f := typ.Field(i)
			tag := f.Tag.Get("json")
			jn, opts, _ := strings.Cut(tag, ",")
			if jn == "-" || jn == "" {
				continue
			}
			seen[jn] = true
			p := s.Properties[jn]
			if p == nil {
				t.Errorf("schema %s lacks property %q (field %s)", name, jn, f.Name)
				continue
			}
			if want := oaType(f.Type); want != "" && p.Type != want {
				t.Errorf("schema %s.%s has type %q, Go field %s is %s (want %q)", name, jn, p.Type, f.Name, f.Type, want)
			}
			if oaType(f.Type) == "" && p.Ref == "" {
				t.Errorf("schema %s.%s should $ref the schema of %s", name, jn, f.Type)
			}
			if f.Type.Kind() == reflect.Pointer && !strings.Contains(opts, "omitempty") && !p.Nullable {
				t.Errorf("schema %s.%s can be null (Go field %s is %s) but is not nullable", name, jn, f.Name, f.Type)
			}
			if response {
				omit := strings.Contains(opts, "omitempty")
				req := slices.Contains(s.Required, jn)
				if !omit && !req {
					t.Errorf("schema %s: %q is always sent but not listed as required", name, jn)
				}
				if omit && req {
					t.Errorf("schema %s: %q is omitempty but listed as required", name, jn)
				}
			}
		}
		for p := range s.Properties {
			if !seen[p] {
				t.Errorf("schema %s documents %q, which %s does not have", name, p, typ)
			}
		}
		for _, r := range s.Required {
			if !seen[r] {
				t.Errorf("schema %s requires unknown property %q", name, r)
			}
		}
	}
	for n, v := range responses {
		check(n, v, true)
	}
	for n, v := range requests {
		check(n, v, false)
	}
}

// oaType maps a Go type to its OpenAPI type; "" means a $ref to a schema.
func oaType(t reflect.Type) string {
	if t == reflect.TypeOf(time.Time{}) {
		return "string"
	}
	if t.Kind() == reflect.Pointer {
		return oaType(t.Elem()) // nullable, or absent with omitempty
	}
	switch t.Kind() {
	case reflect.String:
		return "string"
	case reflect.Bool:
		return "boolean"
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64, reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return "integer"
	case reflect.Float32, reflect.Float64:
		return "number"
	case reflect.Slice, reflect.Array:
		return "array"
	case reflect.Map:
		return "object"
	}
	return ""
}

// TestOpenAPIServed: the handler serves the embedded document as JSON.
func TestOpenAPIServed(t *testing.T) {
	rec := httptest.NewRecorder()
	if err := new(Server).hOpenAPI(rec, httptest.NewRequest("GET", "/v1/openapi.json", nil)); err != nil {
		t.Fatal(err)
	}
	if ct := rec.Header().Get("Content-Type"); ct != "application/json" {
		t.Errorf("content type %q", ct)
	}
	d := loadDoc(t, rec.Body.Bytes())
	if len(d.Paths) == 0 {
		t.Error("served document has no paths")
	}
}
