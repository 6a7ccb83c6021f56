//go:build e2e

package e2e

import (
	"errors"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/noid-vm/noid/client"
)

// TestUserAdminAPI: the user routes are for admins (root on the socket);
// others get 404. rotate-token, set-quota, list-users, remove-user and
// audit work next to a running server; image build refuses.
func TestUserAdminAPI(t *testing.T) {
	e := NewEnv(t)
	c := ctx(t)
	ut, err := e.Client.CreateUser(c, "alice", false)
	if err != nil || ut.User.Name != "alice" || ut.User.Admin || !strings.HasPrefix(ut.Token, "noid_tok_") {
		t.Fatalf("CreateUser: %+v, %v", ut, err)
	}
	if _, err := e.Client.CreateUser(c, "alice", false); !errors.Is(err, client.ErrAlreadyExists) {
		t.Errorf("CreateUser of an existing user: %v", err)
	}
	if _, err := e.Client.CreateUser(c, "Not_Valid", false); !errors.Is(err, client.ErrInvalidArgument) {
		t.Errorf("CreateUser with a bad name: %v", err)
	}
	alice, err := client.New("unix://"+e.Socket, ut.Token)
	if err != nil {
		t.Fatal(err)
	}
	for what, call := range map[string]func() error{
		"list":   func() error { _, err := alice.ListUsers(c); return err },
		"create": func() error { _, err := alice.CreateUser(c, "mallory", true); return err },
		"rotate": func() error { _, err := alice.RotateToken(c, "alice"); return err },
		"quota":  func() error { _, err := alice.SetQuota(c, "alice", client.Quota{}); return err },
		"remove": func() error { _, err := alice.RemoveUser(c, "alice"); return err },
	} {
		if err := call(); !errors.Is(err, client.ErrNotFound) {
			t.Errorf("%s as a non-admin: %v, want not found", what, err)
		}
	}
	neg := int64(-1)
	if _, err := e.Client.SetQuota(c, "alice", client.Quota{MaxVMs: &neg}); !errors.Is(err, client.ErrInvalidArgument) {
		t.Errorf("SetQuota with a negative limit: %v", err)
	}

	r := e.ServerCLI("rotate-token", "alice")
	tok := strings.TrimSpace(r.Stdout)
	if r.Code != 0 || tok == ut.Token {
		t.Fatalf("rotate-token: exit %d, %q, %q", r.Code, r.Stdout, r.Stderr)
	}
	if _, err := alice.WhoAmI(c); !errors.Is(err, client.ErrUnauthenticated) {
		t.Errorf("the old token after rotate-token: %v", err)
	}
	checkTokens(t, e, map[string]string{"alice": tok})

	r = e.ServerCLI("set-quota", "alice", "--max-vms", "3", "--max-checkpoint-bytes", "1G")
	if r.Code != 0 || !regexp.MustCompile(`max_vms\s+3\s+user`).MatchString(r.Stdout) || !regexp.MustCompile(`max_checkpoint_bytes\s+1073741824\s+user`).MatchString(r.Stdout) {
		t.Errorf("set-quota: exit %d\n%s%s", r.Code, r.Stdout, r.Stderr)
	}
	r = e.ServerCLI("set-quota", "alice", "--max-vms", "default")
	if r.Code != 0 || !regexp.MustCompile(`max_vms\s+20\s+config`).MatchString(r.Stdout) { // the default [quota] max_vms
		t.Errorf("set-quota back to the default: exit %d\n%s%s", r.Code, r.Stdout, r.Stderr)
	}
	us, err := e.Client.ListUsers(c)
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, u := range us {
		if u.Name == "alice" {
			found = true
			if u.Quota.MaxVMs != nil || u.Quota.MaxCheckpointBytes == nil || *u.Quota.MaxCheckpointBytes != 1<<30 || u.UnixUID != nil || u.TokenPrefix == "" {
				t.Errorf("alice as listed: %+v", u)
			}
		}
	}
	if !found {
		t.Errorf("ListUsers lacks alice: %+v", us)
	}
	if r := e.ServerCLI("list-users"); r.Code != 0 || !regexp.MustCompile(`(?m)^alice\s+token\s+false\s+noid_tok_`).MatchString(r.Stdout) ||
		!regexp.MustCompile(`(?m)^root\s+unix uid 0\s+true`).MatchString(r.Stdout) {
		t.Errorf("list-users: exit %d\n%s%s", r.Code, r.Stdout, r.Stderr)
	}
	for _, action := range []string{"POST /v1/users/{user}/token", "PUT /v1/users/{user}/quota"} {
		if n := auditCount(t, e, action); n == 0 {
			t.Errorf("no %s in the audit log: the CLI did not go through the server", action)
		}
	}
	if r := e.ServerCLI("remove-user", "alice"); r.Code != 0 || !strings.Contains(r.Stdout, "removed user alice") {
		t.Errorf("remove-user: exit %d\n%s%s", r.Code, r.Stdout, r.Stderr)
	}
	if auditCount(t, e, "DELETE /v1/users/{user}") != 1 {
		t.Error("remove-user did not go through the server")
	}

	r = e.ServerCLI("image", "build", "--tiny")
	if r.Code != 1 || !strings.Contains(r.Stderr, "image build cannot run while noid-server serves the data dir") || !strings.Contains(r.Stderr, "\nhint: stop it first") {
		t.Errorf("image build next to a server: exit %d\n%s%s", r.Code, r.Stdout, r.Stderr)
	}
	if _, err := os.Stat(filepath.Join(e.Dir, "data", "images")); err == nil {
		t.Error("the refused image build wrote images/")
	}
}
