package config

import (
	"fmt"
	"net/url"
	"os"
	"strings"

	"github.com/pelletier/go-toml/v2"
)

// Remote is the [remote] section: an S3-compatible object store (AWS S3,
// MinIO, SeaweedFS, Ceph RGW, R2, versitygw, …) shared by the hosts of a
// fleet. It is off while Endpoint is empty.
type Remote struct {
	// Endpoint is the store's host[:port], or an http(s):// URL whose
	// scheme then decides TLS. Default "" (no remote store).
	Endpoint string `toml:"endpoint"`
	// Bucket is the bucket every key lives in (it must exist).
	Bucket string `toml:"bucket"`
	// Prefix starts every key noid writes ("" for the bucket's root), so
	// one bucket can hold several fleets.
	Prefix string `toml:"prefix"`
	// Region is the bucket's region. Default "us-east-1".
	Region string `toml:"region"`
	// TLS talks HTTPS to the store. Default true; an http:// endpoint
	// turns it off.
	TLS *bool `toml:"tls"`
	// PathStyle addresses the bucket in the path (host/bucket/key) rather
	// than in the host name (bucket.host/key); most self-hosted stores
	// need it. Default false (the library picks from the endpoint).
	PathStyle bool `toml:"path_style"`
	// CredentialsFile holds the access key and secret as TOML
	// (access_key_id = "…", secret_access_key = "…", optionally
	// session_token = "…"). It must not be readable by group or others
	// (mode 0600 or 0400). Default "": the environment's
	// AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN.
	CredentialsFile string `toml:"credentials_file"`
	// Parallel is how many parts move at once per push or pull. Default 4.
	Parallel int `toml:"parallel"`
}

// RemoteCredentials are the object store's credentials. They are never
// logged: String hides them.
type RemoteCredentials struct {
	AccessKeyID     string `toml:"access_key_id"`
	SecretAccessKey string `toml:"secret_access_key"`
	SessionToken    string `toml:"session_token"`
}

// String names where the credentials' key id starts, never the secret.
func (c RemoteCredentials) String() string {
	if c.AccessKeyID == "" {
		return "(no credentials)"
	}
	return "access key " + c.AccessKeyID[:min(4, len(c.AccessKeyID))] + "…"
}

// Enabled tells whether a remote store is configured.
func (r *Remote) Enabled() bool { return r.Endpoint != "" }

// Secure tells whether the store is reached over TLS.
func (r *Remote) Secure() bool {
	if strings.HasPrefix(r.Endpoint, "http://") {
		return false
	}
	if strings.HasPrefix(r.Endpoint, "https://") {
		return true
	}
	return r.TLS == nil || *r.TLS
}

// Host is the endpoint without its scheme.
func (r *Remote) Host() string {
	h := strings.TrimPrefix(strings.TrimPrefix(r.Endpoint, "https://"), "http://")
	return strings.TrimSuffix(h, "/")
}

// RegionOrDefault is Region, or "us-east-1".
func (r *Remote) RegionOrDefault() string {
	if r.Region == "" {
		return "us-east-1"
	}
	return r.Region
}

// ParallelOrDefault is Parallel, or 4.
func (r *Remote) ParallelOrDefault() int {
	if r.Parallel <= 0 {
		return 4
	}
	return r.Parallel
}

func (r *Remote) validate() error {
	if !r.Enabled() {
		return nil
	}
	h := r.Host()
	if h == "" || strings.ContainsAny(h, "/ ") {
		return fmt.Errorf("remote.endpoint must be host[:port] or an http(s):// URL with no path, got %q", r.Endpoint)
	}
	if _, err := url.Parse("http://" + h); err != nil {
		return fmt.Errorf("remote.endpoint: %v", err)
	}
	if strings.HasPrefix(r.Endpoint, "http://") && r.TLS != nil && *r.TLS {
		return fmt.Errorf("remote.endpoint is http:// but remote.tls is true")
	}
	if r.Bucket == "" {
		return fmt.Errorf("remote.bucket must be set with remote.endpoint")
	}
	if strings.HasPrefix(r.Prefix, "/") || strings.Contains(r.Prefix, "..") {
		return fmt.Errorf("remote.prefix must be a relative key prefix like \"noid/fleet1\", got %q", r.Prefix)
	}
	if r.Parallel < 0 || r.Parallel > 64 {
		return fmt.Errorf("remote.parallel must be 1..64, got %d", r.Parallel)
	}
	return nil
}

// LoadRemoteCredentials reads the store's credentials: from
// credentials_file when it is set (refused when group or others may read
// it), else from the environment. Errors never quote the file's content.
func (r *Remote) LoadRemoteCredentials() (RemoteCredentials, error) {
	var c RemoteCredentials
	if r.CredentialsFile == "" {
		c.AccessKeyID, c.SecretAccessKey, c.SessionToken = os.Getenv("AWS_ACCESS_KEY_ID"), os.Getenv("AWS_SECRET_ACCESS_KEY"), os.Getenv("AWS_SESSION_TOKEN")
		if c.AccessKeyID == "" || c.SecretAccessKey == "" {
			return c, fmt.Errorf("no credentials for the remote store: set remote.credentials_file, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the server's environment")
		}
		return c, nil
	}
	fi, err := os.Stat(r.CredentialsFile)
	if err != nil {
		return c, fmt.Errorf("remote.credentials_file: %w", err)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return c, fmt.Errorf("remote.credentials_file %s has mode %04o: group and others must not read it (chmod 600 %s)", r.CredentialsFile, fi.Mode().Perm(), r.CredentialsFile)
	}
	b, err := os.ReadFile(r.CredentialsFile)
	if err != nil {
		return c, fmt.Errorf("remote.credentials_file: %w", err)
	}
	d := toml.NewDecoder(strings.NewReader(string(b)))
	d.DisallowUnknownFields()
	if err := d.Decode(&c); err != nil {
		// The decoder's message may quote a line of the file: a secret.
		return c, fmt.Errorf("remote.credentials_file %s is not TOML with access_key_id and secret_access_key", r.CredentialsFile)
	}
	if c.AccessKeyID == "" || c.SecretAccessKey == "" {
		return c, fmt.Errorf("remote.credentials_file %s lacks access_key_id or secret_access_key", r.CredentialsFile)
	}
	return c, nil
}
