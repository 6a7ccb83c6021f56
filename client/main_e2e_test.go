//go:build e2e

package client_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/noid-vm/noid/client"
	"github.com/noid-vm/noid/internal/testutil"
)

// mainTB lets TestMain use the testutil helpers, which take a testing.TB:
// Fatal panics with the message, which startExampleServer recovers.
type mainTB struct{ testing.TB }

type tbFatal struct{ msg string }

func (mainTB) Helper()                           {}
func (mainTB) Fatal(args ...any)                 { panic(tbFatal{fmt.Sprint(args...)}) }
func (mainTB) Fatalf(format string, args ...any) { panic(tbFatal{fmt.Sprintf(format, args...)}) }
func (mainTB) Logf(format string, args ...any)   {}

// startExampleServer starts noid-server (as root) on a fresh data dir with
// the tiny image, waits until it listens, and sets NOID_URL for the
// examples. stop destroys what is left and stops the server.
func startExampleServer() (stop func(), skip string, err error) {
	if os.Geteuid() != 0 {
		return func() {}, "needs root to run VMs", nil
	}
	defer func() {
		if r := recover(); r != nil {
			f, ok := r.(tbFatal)
			if !ok {
				panic(r)
			}
			err = fmt.Errorf("%s", f.msg)
		}
	}()
	tb := mainTB{}
	bins := testutil.Build(tb)
	img := testutil.TinyImage(tb)
	dir, err := os.MkdirTemp("", "noid-examples-")
	if err != nil {
		return nil, "", err
	}
	sock := filepath.Join(dir, "noid.sock")
	cfg := fmt.Sprintf("data_dir = %q\nsocket = %q\nkernel = %q\ninitrd = %q\nrootfs = %q\naccel = \"tcg\"\ndefault_memory_mib = 256\n\n[network]\nenabled = false\n",
		filepath.Join(dir, "data"), sock, img.Kernel, img.Initrd, img.Rootfs)
	cfgPath := filepath.Join(dir, "config.toml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		os.RemoveAll(dir)
		return nil, "", err
	}
	cmd := exec.Command(bins.Server, "serve", "--config", cfgPath)
	pr, pw := io.Pipe()
	cmd.Stdout, cmd.Stderr = pw, pw
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		os.RemoveAll(dir)
		return nil, "", fmt.Errorf("starting noid-server: %w", err)
	}
	var logMu sync.Mutex
	var log strings.Builder
	ready := make(chan struct{})
	exited := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(pr)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		var once sync.Once
		for sc.Scan() {
			logMu.Lock()
			log.WriteString(sc.Text() + "\n")
			logMu.Unlock()
			if strings.Contains(sc.Text(), "msg=listening") {
				once.Do(func() { close(ready) })
			}
		}
		io.Copy(io.Discard, pr)
	}()
	go func() { cmd.Wait(); pw.Close(); close(exited) }()
	serverLog := func() string { logMu.Lock(); defer logMu.Unlock(); return log.String() }
	select {
	case <-ready:
	case <-exited:
		os.RemoveAll(dir)
		return nil, "", fmt.Errorf("noid-server exited during start-up:\n%s", serverLog())
	case <-time.After(60 * time.Second):
		cmd.Process.Kill()
		<-exited
		os.RemoveAll(dir)
		return nil, "", fmt.Errorf("noid-server did not start listening:\n%s", serverLog())
	}
	url := "unix://" + sock
	os.Setenv("NOID_URL", url)
	os.Setenv("NOID_TOKEN", "")
	stop = func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if c, err := client.New(url, ""); err == nil {
			if vms, err := c.ListVMs(ctx); err == nil {
				for _, v := range vms {
					c.DestroyVM(ctx, v.Name)
				}
			}
		}
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(30 * time.Second):
			fmt.Fprintf(os.Stderr, "client examples: noid-server did not stop on SIGTERM; killing it\n")
			syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-exited
		}
		os.RemoveAll(dir)
	}
	return stop, "", nil
}
