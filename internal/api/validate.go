package api

import (
	"fmt"
	"strings"

	"github.com/noid-vm/noid/internal/errdefs"
)

// MaxNameLen is the longest VM or checkpoint name.
const MaxNameLen = 63

// ValidateVMName checks a VM name: [a-z0-9][a-z0-9-]{0,62}. A single leading
// underscore marks a temporary system VM (such as "_provision", used by the
// golden provisioning script) and is also accepted.
func ValidateVMName(name string) error {
	n := name
	if len(n) > 0 && n[0] == '_' {
		n = n[1:]
	}
	if err := checkName(n, false); err != nil {
		return fmt.Errorf("%w: invalid vm name %q: %s (use lowercase letters, digits and '-', starting with a letter or digit, at most 63 characters)",
			errdefs.ErrInvalidArgument, name, err)
	}
	return nil
}

// ValidateVMRef checks how a client names a VM: a VM name, or "user/vm",
// with which an admin names another user's VM. The user part may be any
// account name without "/", ":", spaces or control characters.
func ValidateVMRef(ref string) error {
	user, name, ok := strings.Cut(ref, "/")
	if !ok {
		return ValidateVMName(ref)
	}
	if user == "" || strings.ContainsAny(user, ":/") || strings.IndexFunc(user, func(r rune) bool { return r <= ' ' || r == 0x7f }) >= 0 {
		return fmt.Errorf("%w: invalid vm %q: write another user's VM as USER/VM", errdefs.ErrInvalidArgument, ref)
	}
	return ValidateVMName(name)
}

// ValidateCheckpointName checks a checkpoint name: [a-z0-9][a-z0-9._-]{0,62}.
func ValidateCheckpointName(name string) error {
	if err := checkName(name, true); err != nil {
		return fmt.Errorf("%w: invalid checkpoint name %q: %s (use lowercase letters, digits, '-', '_' and '.', starting with a letter or digit, at most 63 characters)",
			errdefs.ErrInvalidArgument, name, err)
	}
	return nil
}

// MaxGuestUserLen is the longest guest user name (Linux's useradd limit).
const MaxGuestUserLen = 32

// ValidateGuestUser checks the name of a user in the guest (exec's user): a
// user name or a numeric uid, 1 to 32 characters of letters, digits, '.',
// '_' and '-' (not first), with an optional trailing '$'. Whether the user
// exists is for the guest to say.
func ValidateGuestUser(name string) error {
	bad := func(why string) error {
		return fmt.Errorf("%w: invalid user %q: %s (a user name or uid of the guest, at most %d characters of letters, digits, '.', '_' and '-')",
			errdefs.ErrInvalidArgument, name, why, MaxGuestUserLen)
	}
	if name == "" {
		return bad("empty")
	}
	if len(name) > MaxGuestUserLen {
		return bad(fmt.Sprintf("longer than %d characters", MaxGuestUserLen))
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '_', c == '.':
		case c == '-' && i > 0:
		case c == '$' && i == len(name)-1 && i > 0:
		default:
			return bad(fmt.Sprintf("character %q at position %d is not allowed", c, i+1))
		}
	}
	return nil
}

func checkName(n string, extended bool) error {
	if n == "" {
		return fmt.Errorf("empty")
	}
	if len(n) > MaxNameLen {
		return fmt.Errorf("longer than %d characters", MaxNameLen)
	}
	for i := 0; i < len(n); i++ {
		c := n[i]
		switch {
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9':
		case i > 0 && c == '-':
		case i > 0 && extended && (c == '_' || c == '.'):
		default:
			return fmt.Errorf("character %q at position %d is not allowed", c, i+1)
		}
	}
	return nil
}
