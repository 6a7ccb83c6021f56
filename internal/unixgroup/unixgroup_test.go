package unixgroup

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"os"
	"os/exec"
	"testing"
)

// tempGroupName returns a group name no host uses, and deletes the group
// when the test ends.
func tempGroupName(t *testing.T) string {
	t.Helper()
	b := make([]byte, 4)
	rand.Read(b)
	g := "noid-t-" + hex.EncodeToString(b)
	t.Cleanup(func() { exec.Command("groupdel", g).Run() })
	return g
}

func TestEnsureAndMembers(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates a group on the host")
	}
	ctx := context.Background()
	g := tempGroupName(t)
	if _, ok := Lookup(g); ok {
		t.Fatalf("group %s exists before the test", g)
	}
	gid, created, err := Ensure(ctx, g)
	if err != nil || !created {
		t.Fatalf("Ensure: %d %v %v", gid, created, err)
	}
	if again, created, err := Ensure(ctx, g); err != nil || created || again != gid {
		t.Fatalf("Ensure again: %d %v %v, want %d and not created", again, created, err, gid)
	}
	if IsMember("nobody", g) {
		t.Fatal("nobody is a member of a new group")
	}
	for range 2 {
		if err := AddMember(ctx, "nobody", g); err != nil {
			t.Fatal(err)
		}
	}
	if !IsMember("nobody", g) {
		t.Fatal("nobody is not a member after AddMember")
	}
	for range 2 {
		if err := RemoveMember(ctx, "nobody", g); err != nil {
			t.Fatal(err)
		}
	}
	if IsMember("nobody", g) {
		t.Fatal("nobody is still a member after RemoveMember")
	}
	if err := AddMember(ctx, "no-such-user-noid", g); err == nil {
		t.Error("added a user that does not exist")
	}
}
