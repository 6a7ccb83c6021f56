// Package remotetest runs a real S3-compatible server (versitygw, which
// scripts/setup.sh installs) for tests: on loopback, on a free port,
// serving a temporary directory, stopped when the test ends.
package remotetest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"

	"github.com/noid-vm/noid/internal/config"
)

// Access key and secret of the test server's root user.
const (
	AccessKey = "noidtestaccess"
	SecretKey = "noidtestsecret-not-a-real-one"
	Bucket    = "noid-test"
)

// Binary finds the S3 server: $NOID_S3_SERVER, versitygw on PATH, or
// /usr/local/bin/versitygw.
func Binary() (string, error) {
	if p := os.Getenv("NOID_S3_SERVER"); p != "" {
		return p, nil
	}
	if p, err := exec.LookPath("versitygw"); err == nil {
		return p, nil
	}
	if _, err := os.Stat("/usr/local/bin/versitygw"); err == nil {
		return "/usr/local/bin/versitygw", nil
	}
	return "", errors.New("versitygw not found: run scripts/setup.sh --test (it builds it into /usr/local/bin)")
}

// Server is a running S3 server.
type Server struct {
	// Addr is host:port it listens on (and the test's client uses).
	Addr string
	// Extra are more addresses it listens on.
	Extra []string
	// Dir is the directory it serves (one subdirectory per bucket).
	Dir string
	// StartCmd, when set, starts the server's process instead of
	// cmd.Start (to start it in another network namespace, say).
	StartCmd func(*exec.Cmd) error
	// Dial, when set, is how the test's client connects to Addr.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
	bin  string
	cmd  *exec.Cmd
	done chan struct{}
	t    testing.TB
}

// Start starts a server on 127.0.0.1 with the bucket Bucket created.
func Start(t testing.TB) *Server {
	t.Helper()
	return StartAt(t, "127.0.0.1:"+strconv.Itoa(FreePort(t)), nil)
}

// StartAt starts a server listening on addr, its process started with
// startCmd when that is not nil (see Server.StartCmd).
func StartAt(t testing.TB, addr string, startCmd func(*exec.Cmd) error) *Server {
	t.Helper()
	return StartWith(t, &Server{Addr: addr, StartCmd: startCmd})
}

// StartWith starts the server s describes (Addr, and optionally Extra,
// StartCmd and Dial) with the bucket Bucket created.
func StartWith(t testing.TB, s *Server) *Server {
	t.Helper()
	s.t = t
	err := s.Launch(t.TempDir())
	if s.cmd != nil {
		t.Cleanup(s.Kill)
	}
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// Launch starts the server s describes, serving dir, and creates the
// bucket Bucket. The caller kills it (Kill).
func (s *Server) Launch(dir string) error {
	bin, err := Binary()
	if err != nil {
		return err
	}
	s.Dir, s.bin = dir, bin
	if err := s.Start(); err != nil {
		return err
	}
	c, err := s.client()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := c.MakeBucket(ctx, Bucket, minio.MakeBucketOptions{}); err != nil {
		return fmt.Errorf("creating bucket %s: %w", Bucket, err)
	}
	return nil
}

// FreePort returns a TCP port free on loopback now.
func FreePort(t testing.TB) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// Start (re)starts the server process and waits until it answers.
func (s *Server) Start() error {
	args := []string{"--access", AccessKey, "--secret", SecretKey, "--port", s.Addr}
	for _, a := range s.Extra {
		args = append(args, "--port", a)
	}
	cmd := exec.Command(s.bin, append(args, "posix", s.Dir)...)
	log, err := os.Create(s.Dir + ".log")
	if err != nil {
		return err
	}
	cmd.Stdout, cmd.Stderr = log, log
	cmd.Env = append(os.Environ(), "ROOT_ACCESS_KEY_ID=", "ROOT_SECRET_ACCESS_KEY=")
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	start := cmd.Start
	if s.StartCmd != nil {
		start = func() error { return s.StartCmd(cmd) }
	}
	if err := start(); err != nil {
		log.Close()
		return fmt.Errorf("starting %s: %w", s.bin, err)
	}
	log.Close()
	s.cmd, s.done = cmd, make(chan struct{})
	go func() { cmd.Wait(); close(s.done) }()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := s.client()
	if err != nil {
		s.Kill()
		return err
	}
	for {
		_, err := c.ListBuckets(ctx)
		if err == nil {
			return nil
		}
		select {
		case <-s.done:
			b, _ := os.ReadFile(s.Dir + ".log")
			return fmt.Errorf("versitygw exited at start: %s", b)
		case <-ctx.Done():
			s.Kill()
			return fmt.Errorf("versitygw did not answer on %s: %v", s.Addr, err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// Kill stops the server at once (SIGKILL) and waits for it.
func (s *Server) Kill() {
	if s.cmd == nil {
		return
	}
	s.cmd.Process.Kill()
	<-s.done
	s.cmd = nil
}

// Client is an S3 client of the server, for tests to look at the bucket.
func (s *Server) Client() *minio.Client {
	c, err := s.client()
	if err != nil {
		s.t.Fatal(err)
	}
	return c
}

func (s *Server) client() (*minio.Client, error) {
	opts := &minio.Options{Creds: credentials.NewStaticV4(AccessKey, SecretKey, ""), Secure: false, MaxRetries: 1, BucketLookup: minio.BucketLookupPath}
	if s.Dial != nil {
		opts.Transport = &http.Transport{DialContext: s.Dial}
	}
	return minio.New(s.Addr, opts)
}

// Config is a [remote] section for the server at endpoint (Addr, another
// of its addresses, or a proxy in front of it), with credentials in a 0600
// file in a temporary directory of the test.
func (s *Server) Config(t testing.TB, endpoint, prefix string) config.Remote {
	c, err := s.ConfigIn(t.TempDir(), endpoint, prefix)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// ConfigIn is Config with the credentials file in dir.
func (s *Server) ConfigIn(dir, endpoint, prefix string) (config.Remote, error) {
	f := filepath.Join(dir, "s3.credentials")
	body := fmt.Sprintf("access_key_id = %q\nsecret_access_key = %q\n", AccessKey, SecretKey)
	if err := os.WriteFile(f, []byte(body), 0o600); err != nil {
		return config.Remote{}, err
	}
	no := false
	return config.Remote{Endpoint: endpoint, Bucket: Bucket, Prefix: prefix, TLS: &no, PathStyle: true, CredentialsFile: f}, nil
}

// TOML is a [remote] section for this server at endpoint (see Config).
func (s *Server) TOML(t testing.TB, endpoint, prefix string) string {
	return RemoteTOML(s.Config(t, endpoint, prefix))
}

// RemoteTOML writes c as a [remote] section.
func RemoteTOML(c config.Remote) string {
	return fmt.Sprintf("[remote]\nendpoint = %q\nbucket = %q\nprefix = %q\ntls = false\npath_style = true\ncredentials_file = %q\n",
		"http://"+c.Endpoint, c.Bucket, c.Prefix, c.CredentialsFile)
}

// Empty removes every object of the bucket.
func (s *Server) Empty(ctx context.Context) error {
	c, err := s.client()
	if err != nil {
		return err
	}
	for o := range c.ListObjects(ctx, Bucket, minio.ListObjectsOptions{Recursive: true}) {
		if o.Err != nil {
			return o.Err
		}
		if err := c.RemoveObject(ctx, Bucket, o.Key, minio.RemoveObjectOptions{}); err != nil {
			return err
		}
	}
	return nil
}
