package cli

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"testing"
)

func TestExecEnv(t *testing.T) {
	dir := t.TempDir()
	a := filepath.Join(dir, "a.env")
	b := filepath.Join(dir, "b.env")
	os.WriteFile(a, []byte("\ufeffX=from a\n# comment\n\t Y = spaced\nZ=a\nHOME_VAL\nMISSING\n"), 0o600)
	os.WriteFile(b, []byte("Z=b\r\nW=\n"), 0o600)
	lookup := func(k string) (string, bool) {
		v, ok := map[string]string{"HOME_VAL": "/home/x", "FLAG": "from env"}[k]
		return v, ok
	}
	_, err := execEnv([]string{a}, nil, lookup)
	var ue *usageError
	if !errors.As(err, &ue) {
		t.Fatalf("a key with a space: %v, want a usage error", err)
	}
	os.WriteFile(a, []byte("\ufeffX=from a\n# comment\n\t Y= spaced \nZ=a\nHOME_VAL\nMISSING\n"), 0o600)
	got, err := execEnv([]string{a, b}, []string{"FLAG", "X=flag", "NOPE"}, lookup)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"X": "flag", "Y": " spaced ", "Z": "b", "HOME_VAL": "/home/x", "W": "", "FLAG": "from env"}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("execEnv = %q, want %q", got, want)
	}
	if _, err := execEnv([]string{filepath.Join(dir, "none")}, nil, lookup); !errors.As(err, &ue) {
		t.Errorf("a missing file: %v, want a usage error", err)
	}
	if _, err := execEnv(nil, []string{"=v"}, lookup); !errors.As(err, &ue) {
		t.Errorf("-e =v: %v, want a usage error", err)
	}
}
