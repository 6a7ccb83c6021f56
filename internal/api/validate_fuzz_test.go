package api

import (
	"encoding/json"
	"errors"
	"net/url"
	"path/filepath"
	"strings"
	"testing"

	"github.com/noid-vm/noid/internal/errdefs"
)

// FuzzValidateNames checks the VM and checkpoint name validators: they
// never panic, every rejection is an invalid-argument error, and a name
// they accept is safe everywhere noid puts one: as a URL path segment and
// a file name unchanged, lowercase, at most MaxNameLen (plus a leading
// underscore for system VMs), and it survives a JSON round trip.
func FuzzValidateNames(f *testing.F) {
	for _, s := range []string{"a", "web-1", "_provision", "__x", "A", "-a", "a.b", "a_b", "a/b", "..", ".", "",
		strings.Repeat("a", 63), strings.Repeat("a", 64), "é", "a\x00", "a b", "a%2f"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, name string) {
		for _, v := range []struct {
			kind  string
			check func(string) error
			max   int
		}{{"vm", ValidateVMName, MaxNameLen + 1}, {"checkpoint", ValidateCheckpointName, MaxNameLen}} {
			err := v.check(name)
			if err != nil {
				if !errors.Is(err, errdefs.ErrInvalidArgument) {
					t.Fatalf("%s name %q: error %v is not invalid-argument", v.kind, name, err)
				}
				continue
			}
			if name == "" || len(name) > v.max || strings.ToLower(name) != name {
				t.Fatalf("%s name %q accepted (length %d)", v.kind, name, len(name))
			}
			if url.PathEscape(name) != name || filepath.Base(name) != name || filepath.Clean(name) != name || name == "." || name == ".." {
				t.Fatalf("%s name %q is not a plain path segment", v.kind, name)
			}
			b, _ := json.Marshal(name)
			var back string
			if json.Unmarshal(b, &back) != nil || back != name {
				t.Fatalf("%s name %q does not survive JSON", v.kind, name)
			}
			for i := 0; i < len(name); i++ {
				c := name[i]
				ok := c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' && i > 0 ||
					v.kind == "checkpoint" && i > 0 && (c == '_' || c == '.') || v.kind == "vm" && i == 0 && c == '_'
				if !ok {
					t.Fatalf("%s name %q accepted with %q at %d", v.kind, name, c, i)
				}
			}
		}
	})
}
