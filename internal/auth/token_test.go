package auth

import (
	"strings"
	"testing"
)

func TestToken(t *testing.T) {
	a, b := NewToken(), NewToken()
	if a == b || !strings.HasPrefix(a, TokenPrefix) || len(a) != len(TokenPrefix)+64 || !WellFormed(a) {
		t.Fatalf("tokens %q %q", a, b)
	}
	if WellFormed(a[:len(a)-1]) || WellFormed("noid_tok_"+strings.Repeat("z", 64)) || WellFormed("x"+a[1:]) {
		t.Fatal("malformed token accepted")
	}
	if HashToken(a) == HashToken(b) || len(HashToken(a)) != 64 || strings.Contains(HashToken(a), a[9:]) {
		t.Fatal("bad hash")
	}
	if !HashesEqual(HashToken(a), HashToken(a)) || HashesEqual(HashToken(a), HashToken(b)) {
		t.Fatal("compare")
	}
	if p := ShortPrefix(a); len(p) != 8 || !strings.HasPrefix(a[len(TokenPrefix):], p) {
		t.Fatalf("prefix %q", p)
	}
}
