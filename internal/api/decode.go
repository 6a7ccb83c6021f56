package api

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"

	"github.com/noid-vm/noid/internal/errdefs"
)

// MaxRequestBody is the largest JSON request body the API accepts.
const MaxRequestBody = 1 << 20

// Decode reads one JSON request body from r into v: unknown fields,
// trailing data and an empty body are refused, each as ErrInvalidArgument.
// The caller bounds r (the server reads at most MaxRequestBody bytes).
func Decode(r io.Reader, v any) error {
	dec := json.NewDecoder(r)
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		if errors.Is(err, io.EOF) {
			return fmt.Errorf("%w: empty request body", errdefs.ErrInvalidArgument)
		}
		return fmt.Errorf("%w: bad request body: %v", errdefs.ErrInvalidArgument, err)
	}
	if dec.More() {
		return fmt.Errorf("%w: trailing data after JSON body", errdefs.ErrInvalidArgument)
	}
	return nil
}
