// Package auth creates and checks API tokens and limits failed
// authentication attempts.
package auth

import (
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"strings"
)

// TokenPrefix starts every noid API token.
const TokenPrefix = "noid_tok_"

// NewToken returns a fresh token: TokenPrefix followed by 32 random bytes in hex.
func NewToken() string {
	var b [32]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic("crypto/rand failed: " + err.Error())
	}
	return TokenPrefix + hex.EncodeToString(b[:])
}

// HashToken returns the hex SHA-256 of a token; only hashes are stored.
func HashToken(tok string) string {
	h := sha256.Sum256([]byte(tok))
	return hex.EncodeToString(h[:])
}

// ShortPrefix returns the first characters of a token after TokenPrefix, used
// to show which token a user has and to rate-limit guesses per token family.
// It never reveals enough to matter (4 bytes of 32).
func ShortPrefix(tok string) string {
	t := strings.TrimPrefix(tok, TokenPrefix)
	if len(t) > 8 {
		t = t[:8]
	}
	return t
}

// WellFormed reports whether tok has the shape of a noid token.
func WellFormed(tok string) bool {
	if !strings.HasPrefix(tok, TokenPrefix) || len(tok) != len(TokenPrefix)+64 {
		return false
	}
	_, err := hex.DecodeString(tok[len(TokenPrefix):])
	return err == nil
}

// HashesEqual compares two hex hashes in constant time.
func HashesEqual(a, b string) bool {
	return subtle.ConstantTimeCompare([]byte(a), []byte(b)) == 1
}
