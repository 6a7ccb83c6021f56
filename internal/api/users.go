package api

import (
	"fmt"
	"time"

	"github.com/noid-vm/noid/internal/errdefs"
)

// User is a user of the server as admins see it (GET /v1/users).
type User struct {
	Name  string `json:"name"`
	Admin bool   `json:"admin"`
	// UnixUID is the local uid the user stands for on the unix socket;
	// absent for token users.
	UnixUID *int64 `json:"unix_uid,omitempty"`
	// TokenPrefix starts the user's token ("noid_tok_" + it + "…"); empty
	// when the user has no token.
	TokenPrefix string    `json:"token_prefix,omitempty"`
	CreatedAt   time.Time `json:"created_at"`
	// Quota is the user's own limits.
	Quota Quota `json:"quota"`
}

// Quota is a user's own limits (PUT /v1/users/{user}/quota replaces them
// all). Each overrides the server's [quota] value of the same name; null
// means that default, 0 means unlimited.
type Quota struct {
	MaxVMs             *int64 `json:"max_vms"`
	MaxVCPUs           *int64 `json:"max_vcpus"`
	MaxMemoryMiB       *int64 `json:"max_memory_mib"`
	MaxCheckpointBytes *int64 `json:"max_checkpoint_bytes"`
}

// Validate checks that no limit is negative.
func (q Quota) Validate() error {
	for _, v := range []*int64{q.MaxVMs, q.MaxVCPUs, q.MaxMemoryMiB, q.MaxCheckpointBytes} {
		if v != nil && *v < 0 {
			return fmt.Errorf("%w: quota values must not be negative (0 means unlimited, null the server's default)", errdefs.ErrInvalidArgument)
		}
	}
	return nil
}

// CreateUserRequest is the body of POST /v1/users.
type CreateUserRequest struct {
	Name  string `json:"name"`
	Admin bool   `json:"admin,omitempty"`
}

// AddLocalUserRequest is the body of POST /v1/users/local: the local
// unix account to let use the unix socket.
type AddLocalUserRequest struct {
	UnixUser string `json:"unix_user"`
}

// UserToken is a user with the token just issued to it by POST /v1/users
// or POST /v1/users/{user}/token. The server keeps only the token's hash:
// this is the only time it is shown.
type UserToken struct {
	User  User   `json:"user"`
	Token string `json:"token"`
}

// ValidateUserName checks the name of a new token user: lowercase letters,
// digits and '-', starting with a letter or digit, at most MaxNameLen
// characters.
func ValidateUserName(name string) error {
	if err := checkName(name, false); err != nil {
		return fmt.Errorf("%w: invalid user name %q: %s (use lowercase letters, digits and '-', starting with a letter or digit, at most %d characters)",
			errdefs.ErrInvalidArgument, name, err, MaxNameLen)
	}
	return nil
}
