package api

import (
	"errors"
	"strings"
	"testing"

	"github.com/noid-vm/noid/internal/errdefs"
)

func TestValidateVMName(t *testing.T) {
	for _, ok := range []string{"a", "vm-1", "0abc", strings.Repeat("a", 63), "_provision"} {
		if err := ValidateVMName(ok); err != nil {
			t.Errorf("%q: %v", ok, err)
		}
	}
	for _, bad := range []string{"", "-a", "A", "a_b", "a.b", "a b", strings.Repeat("a", 64), "__x", "_", "ü", "a/b", "../x"} {
		err := ValidateVMName(bad)
		if !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), "invalid vm name") {
			t.Errorf("%q: %v", bad, err)
		}
	}
}

func TestValidateCheckpointName(t *testing.T) {
	for _, ok := range []string{"c1", "before.upgrade", "a_b-c"} {
		if err := ValidateCheckpointName(ok); err != nil {
			t.Errorf("%q: %v", ok, err)
		}
	}
	for _, bad := range []string{"", ".x", "_x", "A", "a/b", "..", strings.Repeat("c", 64)} {
		if err := ValidateCheckpointName(bad); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("%q: %v", bad, err)
		}
	}
}

// TestValidateVMRef: a VM name, or USER/VM with any account name as USER.
func TestValidateVMRef(t *testing.T) {
	for ref, ok := range map[string]bool{
		"dev": true, "alice/dev": true, "john.doe/dev": true, "uid1001/_provision": true, "Admin_1/x": true,
		"alice/": false, "/dev": false, "alice/Dev": false, "a/b/c": false, "a:b/c": false, "a b/c": false, "alice/dev:": false, "": false,
	} {
		if err := ValidateVMRef(ref); (err == nil) != ok {
			t.Errorf("ValidateVMRef(%q) = %v, want ok %v", ref, err, ok)
		}
	}
}

func TestValidateGuestUser(t *testing.T) {
	for _, ok := range []string{"root", "noid", "1000", "0", "Debian-exim", "www.data", "_apt", "machine$", strings.Repeat("u", 32)} {
		if err := ValidateGuestUser(ok); err != nil {
			t.Errorf("%q: %v", ok, err)
		}
	}
	for _, bad := range []string{"", "-x", "a:b", "a/b", "a b", "a\n", "a\x00", "$", "a$b", "ü", strings.Repeat("u", 33), "../etc"} {
		err := ValidateGuestUser(bad)
		if !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), "invalid user") {
			t.Errorf("%q: %v", bad, err)
		}
	}
}
