package server

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"testing"
	"time"

	"github.com/noid-vm/noid/internal/promtext"
)

// request sends GET path on c (keeping the connection open) and reads the
// response.
func request(t *testing.T, c net.Conn, br *bufio.Reader, path string) *http.Response {
	t.Helper()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: noid\r\n\r\n", path); err != nil {
		t.Fatalf("sending a request: %v", err)
	}
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("reading the response: %v", err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp
}

// closedByServer reports whether the server closes c (a read ends with EOF
// or a reset) before limit.
func closedByServer(c net.Conn, br *bufio.Reader, limit time.Duration) bool {
	c.SetReadDeadline(time.Now().Add(limit))
	_, err := br.ReadByte()
	var ne net.Error
	return err != nil && !(errors.As(err, &ne) && ne.Timeout())
}

// TestIdleConnectionsClosed: a keep-alive connection that carries no
// request for idle_timeout is closed by the server, on TCP and on the
// unix socket.
func TestIdleConnectionsClosed(t *testing.T) {
	ts := newTestServer(t, true, "[http]\nidle_timeout = \"200ms\"")
	for _, a := range [][2]string{{"tcp", ts.addr}, {"unix", ts.sock}} {
		c, err := net.Dial(a[0], a[1])
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		br := bufio.NewReader(c)
		if resp := request(t, c, br, "/healthz"); resp.StatusCode != 200 || resp.Close {
			t.Fatalf("%s: /healthz answered %d, close %v", a[0], resp.StatusCode, resp.Close)
		}
		if !closedByServer(c, br, 10*time.Second) {
			t.Errorf("%s: an idle keep-alive connection is still open", a[0])
		}
	}
}

// TestConnectionsPerClientCapped: with max_conns_per_client = 2, a third
// TCP connection from the same address is closed before any answer, and
// counted; once one of the two closes, a new one is served. The unix
// socket has no cap.
func TestConnectionsPerClientCapped(t *testing.T) {
	ts := newTestServer(t, true, "[http]\nmax_conns_per_client = 2")
	var open []net.Conn
	for i := 0; i < 2; i++ {
		c, err := net.Dial("tcp", ts.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if resp := request(t, c, bufio.NewReader(c), "/healthz"); resp.StatusCode != 200 {
			t.Fatalf("connection %d: %d", i+1, resp.StatusCode)
		}
		open = append(open, c)
	}
	third, err := net.Dial("tcp", ts.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer third.Close()
	fmt.Fprintf(third, "GET /healthz HTTP/1.1\r\nHost: noid\r\n\r\n")
	br := bufio.NewReader(third)
	if !closedByServer(third, br, 10*time.Second) {
		t.Fatal("a third connection from the same address was served")
	}
	// Unix socket connections do not count.
	for i := 0; i < 3; i++ {
		if err := ts.client("").Health(context.Background()); err != nil {
			t.Fatalf("the unix socket while TCP is at its cap: %v", err)
		}
	}
	open[0].Close()
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.Dial("tcp", ts.addr)
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(10 * time.Second))
		fmt.Fprintf(c, "GET /healthz HTTP/1.1\r\nHost: noid\r\nConnection: close\r\n\r\n")
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		c.Close()
		if err == nil && resp.StatusCode == 200 {
			break
		}
		// The server may not have seen the close yet.
		if time.Now().After(deadline) {
			t.Fatalf("no connection is served after one of the two closed: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	text, err := ts.client("").Metrics(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	f, err := promtext.Parse(text)
	if err != nil {
		t.Fatal(err)
	}
	if n := f.Sum("noid_http_connections_refused_total", nil); n < 1 {
		t.Errorf("refused connections counted: %v", n)
	}
}
