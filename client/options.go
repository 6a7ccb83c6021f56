package client

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net/http"
	"os"
)

// Options tune a Client beyond its URL and token.
type Options struct {
	// TLSConfig is used for https:// URLs (for example a private CA).
	TLSConfig *tls.Config
	// CACertFile, when set, is a PEM file of CAs trusted for https:// URLs
	// in addition to the system's.
	CACertFile string
}

// NewWithOptions is New with extra options.
func NewWithOptions(rawURL, token string, opts Options) (*Client, error) {
	c, err := New(rawURL, token)
	if err != nil {
		return nil, err
	}
	tc := opts.TLSConfig
	if opts.CACertFile != "" {
		pem, err := os.ReadFile(opts.CACertFile)
		if err != nil {
			return nil, fmt.Errorf("reading CA file: %w", err)
		}
		pool, _ := x509.SystemCertPool()
		if pool == nil {
			pool = x509.NewCertPool()
		}
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("%w: no PEM certificates in %s", ErrInvalidArgument, opts.CACertFile)
		}
		if tc == nil {
			tc = &tls.Config{}
		} else {
			tc = tc.Clone()
		}
		tc.RootCAs = pool
	}
	if tc != nil {
		if t, ok := c.hc.Transport.(*http.Transport); ok {
			t.TLSClientConfig = tc
		}
	}
	return c, nil
}
