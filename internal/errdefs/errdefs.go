// Package errdefs defines the sentinel errors shared by every layer of noid and
// maps them to HTTP status codes in one place.
//
// Lower layers wrap a sentinel with context (fmt.Errorf("vm %q: %w", name,
// errdefs.ErrNotFound)); the API layer turns the wrapped error into a status
// code with HTTPStatus, and the client turns the status code back into the same
// sentinel with FromHTTP, so errors.Is works across the wire.
package errdefs

import (
	"errors"
	"net/http"
)

// Sentinel errors. Each one names a class of failure a caller can act on.
var (
	// ErrInvalidArgument means the request itself is malformed or out of range.
	ErrInvalidArgument = errors.New("invalid argument")
	// ErrUnauthenticated means no valid credentials were presented.
	ErrUnauthenticated = errors.New("unauthenticated")
	// ErrNotFound means the named object does not exist for this caller.
	ErrNotFound = errors.New("not found")
	// ErrAlreadyExists means an object with that name already exists.
	ErrAlreadyExists = errors.New("already exists")
	// ErrConflict means the object is in a state that does not allow the operation.
	ErrConflict = errors.New("conflict")
	// ErrNotRunning means the VM's VMM process is gone.
	ErrNotRunning = errors.New("vm is not running")
	// ErrRateLimited means the caller must slow down.
	ErrRateLimited = errors.New("rate limited")
	// ErrQuotaExceeded means the operation would exceed the caller's quota.
	ErrQuotaExceeded = errors.New("quota exceeded")
	// ErrUnavailable means a dependency (VMM, agent, host resource) is not usable now.
	ErrUnavailable = errors.New("unavailable")
	// ErrResourceExhausted means a host resource (disk, address pool, memory) ran out.
	ErrResourceExhausted = errors.New("resource exhausted")
	// ErrNotImplemented means the backend does not support the operation.
	ErrNotImplemented = errors.New("not implemented")
	// ErrInternal is everything else.
	ErrInternal = errors.New("internal error")
)

// Code is the stable, machine-readable error code sent in API error bodies.
type Code string

// The error codes sent on the wire; one per sentinel.
const (
	CodeInvalidArgument   Code = "invalid_argument"
	CodeUnauthenticated   Code = "unauthenticated"
	CodeNotFound          Code = "not_found"
	CodeAlreadyExists     Code = "already_exists"
	CodeConflict          Code = "conflict"
	CodeNotRunning        Code = "not_running"
	CodeRateLimited       Code = "rate_limited"
	CodeQuotaExceeded     Code = "quota_exceeded"
	CodeUnavailable       Code = "unavailable"
	CodeResourceExhausted Code = "resource_exhausted"
	CodeNotImplemented    Code = "not_implemented"
	CodeInternal          Code = "internal"
)

type mapping struct {
	err    error
	code   Code
	status int
}

// table is the single place where sentinels, codes and HTTP statuses meet.
var table = []mapping{
	{ErrInvalidArgument, CodeInvalidArgument, http.StatusBadRequest},
	{ErrUnauthenticated, CodeUnauthenticated, http.StatusUnauthorized},
	{ErrNotFound, CodeNotFound, http.StatusNotFound},
	{ErrAlreadyExists, CodeAlreadyExists, http.StatusConflict},
	{ErrConflict, CodeConflict, http.StatusConflict},
	{ErrNotRunning, CodeNotRunning, http.StatusConflict},
	{ErrRateLimited, CodeRateLimited, http.StatusTooManyRequests},
	{ErrQuotaExceeded, CodeQuotaExceeded, http.StatusForbidden},
	{ErrUnavailable, CodeUnavailable, http.StatusServiceUnavailable},
	{ErrResourceExhausted, CodeResourceExhausted, http.StatusInsufficientStorage},
	{ErrNotImplemented, CodeNotImplemented, http.StatusNotImplemented},
	{ErrInternal, CodeInternal, http.StatusInternalServerError},
}

// Classify returns the code and HTTP status for err. Unknown errors are internal.
func Classify(err error) (Code, int) {
	for _, m := range table {
		if errors.Is(err, m.err) {
			return m.code, m.status
		}
	}
	return CodeInternal, http.StatusInternalServerError
}

// HTTPStatus returns the HTTP status code for err.
func HTTPStatus(err error) int {
	_, s := Classify(err)
	return s
}

// FromCode returns the sentinel for a wire code, or ErrInternal if unknown.
func FromCode(c Code) error {
	for _, m := range table {
		if m.code == c {
			return m.err
		}
	}
	return ErrInternal
}

// Error is an error received from the API: it keeps the server's message and
// unwraps to the sentinel named by its code.
type Error struct {
	Code      Code
	Message   string
	Hint      string
	RequestID string
}

// Error returns the server's message.
func (e *Error) Error() string { return e.Message }

// Unwrap returns the sentinel for the error's code.
func (e *Error) Unwrap() error { return FromCode(e.Code) }

// Hinted attaches a user-facing next step ("noid list") to an error.
type Hinted struct {
	Err  error
	Hint string
}

// Error returns the wrapped message.
func (h *Hinted) Error() string { return h.Err.Error() }

// Unwrap returns the wrapped error.
func (h *Hinted) Unwrap() error { return h.Err }

// WithHint wraps err with a hint shown to users as "hint: …".
func WithHint(err error, hint string) error {
	if err == nil {
		return nil
	}
	return &Hinted{Err: err, Hint: hint}
}

// HintOf returns the innermost hint attached to err, if any.
func HintOf(err error) string {
	var h *Hinted
	if errors.As(err, &h) {
		return h.Hint
	}
	var e *Error
	if errors.As(err, &e) {
		return e.Hint
	}
	return ""
}
