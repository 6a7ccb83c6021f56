package store

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/noid-vm/noid/internal/auth"
	"github.com/noid-vm/noid/internal/errdefs"
)

// TestImportUser imports a user by its token hash, as the original noid
// stored it: the token authenticates, a near miss does not, a second
// import changes nothing, and an existing user of that name is never
// overwritten.
func TestImportUser(t *testing.T) {
	ctx := context.Background()
	s := open(t)
	tok := auth.TokenPrefix + strings.Repeat("ab", 32)
	created := time.Date(2026, 2, 14, 10, 0, 0, 0, time.UTC)
	if res, err := s.ImportUser(ctx, "alice", auth.HashToken(tok), created); err != nil || res != UserImported {
		t.Fatalf("import: %v %v", res, err)
	}
	u, err := s.UserByToken(ctx, tok)
	if err != nil || u.Name != "alice" || u.IsAdmin || !u.CreatedAt.Equal(created) {
		t.Fatalf("the imported token: %+v %v", u, err)
	}
	if _, err := s.UserByToken(ctx, auth.TokenPrefix+strings.Repeat("ab", 31)+"ac"); !errors.Is(err, errdefs.ErrUnauthenticated) {
		t.Errorf("another token authenticated: %v", err)
	}
	if res, err := s.ImportUser(ctx, "alice", auth.HashToken(tok), created); err != nil || res != UserAlreadyImported {
		t.Errorf("second import: %v %v", res, err)
	}
	_, bobTok, err := s.CreateUser(ctx, "bob", false)
	if err != nil {
		t.Fatal(err)
	}
	if res, err := s.ImportUser(ctx, "bob", auth.HashToken(tok), created); err != nil || res != UserNameTaken {
		t.Errorf("import over bob: %v %v", res, err)
	}
	if u, err := s.UserByToken(ctx, bobTok); err != nil || u.Name != "bob" {
		t.Errorf("bob's own token after the import: %+v %v", u, err)
	}
	if res, err := s.ImportUser(ctx, "carol", auth.HashToken(tok), created); err != nil || res != UserTokenTaken {
		t.Errorf("import of alice's token as carol: %v %v", res, err)
	}
	if _, err := s.UserByName(ctx, "carol"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("carol was added: %v", err)
	}
}
