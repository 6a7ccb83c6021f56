// Package remote keeps checkpoints and golden snapshots in an
// S3-compatible object store shared by several noid hosts.
//
// A snapshot directory is pushed as content-addressed chunks plus one
// manifest. Each file is cut into chunks of ChunkSize logical bytes; a
// chunk holds only the file's non-zero 64 KiB blocks (holes and zero
// pages are not sent), is compressed with zstd and stored under the
// SHA-256 of its uncompressed encoding. Chunks move in parallel; a chunk
// already in the store (the same base image under every checkpoint, the
// untouched memory of an earlier push, the chunks of an interrupted push)
// is not sent again. The manifest, which names every chunk and the
// SHA-256 of every file, is written last: until it is, nothing of the push
// is visible, and a reader never sees half a snapshot.
//
// A pull reads the manifest, lets the caller refuse a snapshot that cannot
// run on this host before any data moves, fetches the chunks in parallel
// (each checked against its SHA-256), writes their blocks at their offsets
// into sparse files, and checks each file's SHA-256 at the end.
//
// Keys are namespaced: every user's objects live under users/<name>/, and
// the goldens an admin publishes for everyone under system/.
package remote

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"path"
	"strings"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"

	"github.com/noid-vm/noid/internal/config"
	"github.com/noid-vm/noid/internal/errdefs"
)

// Store is the small part of an object store noid uses. Keys are relative
// to the store's prefix. Objects are written whole: a Put is visible
// completely or not at all.
type Store interface {
	// Put writes an object.
	Put(ctx context.Context, key string, data []byte) error
	// Get reads an object whole; a missing one is errdefs.ErrNotFound.
	Get(ctx context.Context, key string) ([]byte, error)
	// Stat tells whether an object is there, and its size.
	Stat(ctx context.Context, key string) (size int64, ok bool, err error)
	// List returns the keys under a prefix (relative to the store's).
	List(ctx context.Context, prefix string) ([]string, error)
	// Delete removes an object; a missing one is not an error.
	Delete(ctx context.Context, key string) error
	// Check makes sure the bucket is there and the credentials work.
	Check(ctx context.Context) error
	// String names the store (endpoint, bucket, prefix; no credentials).
	String() string
}

// maxObject bounds what Get reads into memory: chunks and manifests only.
const maxObject = 256 << 20

// S3 is a Store on an S3-compatible server, through minio-go.
type S3 struct {
	c      *minio.Client
	bucket string
	prefix string
	host   string
}

// NewS3 connects to the store [remote] describes with creds. It does not
// talk to it yet (see Check).
func NewS3(cfg config.Remote, creds config.RemoteCredentials) (*S3, error) {
	lookup := minio.BucketLookupAuto
	if cfg.PathStyle {
		lookup = minio.BucketLookupPath
	}
	tr, err := minio.DefaultTransport(cfg.Secure())
	if err != nil {
		return nil, fmt.Errorf("remote store transport: %w", err)
	}
	tr.ResponseHeaderTimeout = 2 * time.Minute
	tr.DialContext = (&net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second}).DialContext
	c, err := minio.New(cfg.Host(), &minio.Options{
		Creds:        credentials.NewStaticV4(creds.AccessKeyID, creds.SecretAccessKey, creds.SessionToken),
		Secure:       cfg.Secure(),
		Region:       cfg.RegionOrDefault(),
		BucketLookup: lookup,
		Transport:    tr,
		MaxRetries:   5,
	})
	if err != nil {
		return nil, fmt.Errorf("remote store %s: %w", cfg.Host(), err)
	}
	c.SetAppInfo("noid", "1")
	return &S3{c: c, bucket: cfg.Bucket, prefix: strings.Trim(cfg.Prefix, "/"), host: cfg.Host()}, nil
}

func (s *S3) key(k string) string {
	if s.prefix == "" {
		return k
	}
	return s.prefix + "/" + k
}

// String names the store.
func (s *S3) String() string {
	return "s3://" + path.Join(s.bucket, s.prefix) + " at " + s.host
}

// Put writes an object in one request.
func (s *S3) Put(ctx context.Context, key string, data []byte) error {
	_, err := s.c.PutObject(ctx, s.bucket, s.key(key), bytes.NewReader(data), int64(len(data)),
		minio.PutObjectOptions{ContentType: "application/octet-stream", DisableMultipart: true})
	return s.classify(ctx, "writing "+key, err)
}

// Get reads an object whole.
func (s *S3) Get(ctx context.Context, key string) ([]byte, error) {
	o, err := s.c.GetObject(ctx, s.bucket, s.key(key), minio.GetObjectOptions{})
	if err != nil {
		return nil, s.classify(ctx, "reading "+key, err)
	}
	defer o.Close()
	b, err := io.ReadAll(io.LimitReader(o, maxObject+1))
	if err != nil {
		return nil, s.classify(ctx, "reading "+key, err)
	}
	if len(b) > maxObject {
		return nil, fmt.Errorf("%w: remote object %s is larger than %d bytes", errdefs.ErrConflict, key, maxObject)
	}
	return b, nil
}

// Stat tells whether an object is there, and its size.
func (s *S3) Stat(ctx context.Context, key string) (int64, bool, error) {
	oi, err := s.c.StatObject(ctx, s.bucket, s.key(key), minio.StatObjectOptions{})
	if err == nil {
		return oi.Size, true, nil
	}
	err = s.classify(ctx, "looking up "+key, err)
	if errors.Is(err, errdefs.ErrNotFound) && !isBucketMissing(err) {
		return 0, false, nil
	}
	return 0, false, err
}

// List returns the keys under prefix.
func (s *S3) List(ctx context.Context, prefix string) ([]string, error) {
	var out []string
	full := s.key(prefix)
	for o := range s.c.ListObjects(ctx, s.bucket, minio.ListObjectsOptions{Prefix: full, Recursive: true}) {
		if o.Err != nil {
			return nil, s.classify(ctx, "listing "+prefix, o.Err)
		}
		k := o.Key
		if s.prefix != "" {
			k = strings.TrimPrefix(k, s.prefix+"/")
		}
		out = append(out, k)
	}
	return out, nil
}

// Delete removes an object.
func (s *S3) Delete(ctx context.Context, key string) error {
	return s.classify(ctx, "deleting "+key, s.c.RemoveObject(ctx, s.bucket, s.key(key), minio.RemoveObjectOptions{}))
}

// Check makes sure the bucket exists and the credentials are accepted.
func (s *S3) Check(ctx context.Context) error {
	ok, err := s.c.BucketExists(ctx, s.bucket)
	if err != nil {
		return s.classify(ctx, "checking bucket "+s.bucket, err)
	}
	if !ok {
		return s.bucketMissing("checking bucket " + s.bucket)
	}
	return nil
}

// bucketMissingErr marks the error of a missing bucket.
type bucketMissingErr struct{ error }

func (e bucketMissingErr) Unwrap() error { return e.error }

func isBucketMissing(err error) bool {
	var b bucketMissingErr
	return errors.As(err, &b)
}

func (s *S3) bucketMissing(what string) error {
	return bucketMissingErr{errdefs.WithHint(fmt.Errorf("%w: remote store: %s: bucket %q does not exist at %s", errdefs.ErrUnavailable, what, s.bucket, s.host),
		"create the bucket on the store, or fix [remote] bucket in the server's config")}
}

// classify turns a store error into an errdefs error with a hint. The
// credentials never appear in it (minio-go's errors do not carry them).
func (s *S3) classify(ctx context.Context, what string, err error) error {
	if err == nil {
		return nil
	}
	if ctx.Err() != nil {
		return ctx.Err()
	}
	resp := minio.ToErrorResponse(err)
	switch resp.Code {
	case "NoSuchKey", "NotFound":
		return fmt.Errorf("%w: remote store: %s: no such object", errdefs.ErrNotFound, what)
	case "NoSuchBucket":
		return s.bucketMissing(what)
	case "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken":
		return errdefs.WithHint(fmt.Errorf("%w: remote store: %s: the store refused the server's credentials (%s)", errdefs.ErrUnavailable, what, resp.Code),
			"fix the access key and secret in [remote] credentials_file (or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY of noid-server), and that they may use bucket "+s.bucket)
	case "SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout":
		return errdefs.WithHint(fmt.Errorf("%w: remote store: %s: the store kept answering %d %s", errdefs.ErrUnavailable, what, resp.StatusCode, resp.Code),
			"the store is overloaded or failing; try again later (a push that is retried sends only the chunks that did not arrive)")
	}
	switch {
	case resp.StatusCode == http.StatusNotFound && resp.Code == "":
		return fmt.Errorf("%w: remote store: %s: no such object", errdefs.ErrNotFound, what)
	case resp.StatusCode == http.StatusForbidden:
		return errdefs.WithHint(fmt.Errorf("%w: remote store: %s: access denied", errdefs.ErrUnavailable, what),
			"fix [remote] credentials_file, or the key's rights on bucket "+s.bucket)
	case resp.StatusCode >= 500:
		return errdefs.WithHint(fmt.Errorf("%w: remote store: %s: the store kept answering %d", errdefs.ErrUnavailable, what, resp.StatusCode),
			"the store is overloaded or failing; try again later (a push that is retried sends only the chunks that did not arrive)")
	case resp.StatusCode != 0:
		return fmt.Errorf("%w: remote store: %s: %d %s %s", errdefs.ErrUnavailable, what, resp.StatusCode, resp.Code, resp.Message)
	}
	return errdefs.WithHint(fmt.Errorf("%w: remote store: %s: cannot reach %s: %v", errdefs.ErrUnavailable, what, s.host, err),
		"check [remote] endpoint and tls, and that the store is up; try again (a push that is retried sends only the chunks that did not arrive)")
}
