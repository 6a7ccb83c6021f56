package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
)

// fixture is a module whose packages pass, skip (with reasons, in a subtest
// too), fail, crash mid-test, fail to build, and have no tests.
var fixture = map[string]string{
	"go.mod": "module fixture\n\ngo 1.22\n",
	"ok/ok_test.go": `package ok

import "testing"

func TestOK(t *testing.T) {}
`,
	"a/a_test.go": `package a

import "testing"

func TestPass(t *testing.T) {}

func TestSkipReason(t *testing.T) {
	t.Log("noise before the skip")
	t.Skip("needs root (network namespaces)")
}

func TestSkipf(t *testing.T) { t.Skipf("line %s\nline two", "one") }

func TestSub(t *testing.T) {
	t.Run("ok", func(t *testing.T) {})
	t.Run("skipped", func(t *testing.T) { t.Skip("sub reason") })
}

func TestFail(t *testing.T) {
	t.Log("context line")
	t.Errorf("boom: want %d", 1)
}
`,
	"crash/crash_test.go": `package crash

import "testing"

func TestCrash(t *testing.T) {
	t.Log("started the worker")
	go func() { panic("worker exploded") }()
	<-make(chan int)
}
`,
	"broken/broken_test.go": `package broken

import "testing"

func TestNever(t *testing.T) { var x int = "s"; _ = x }
`,
	"empty/empty.go": "package empty\n",
}

var (
	streamOnce sync.Once
	streamData []byte
	streamErr  error
)

// goTestJSON runs the real `go test -json` over the fixture module, once per
// test binary, and returns its stream.
func goTestJSON(t *testing.T) []byte {
	t.Helper()
	streamOnce.Do(func() {
		dir, err := os.MkdirTemp("", "testreport-fixture")
		if err != nil {
			streamErr = err
			return
		}
		defer os.RemoveAll(dir)
		for name, text := range fixture {
			p := filepath.Join(dir, name)
			if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
				streamErr = err
				return
			}
			if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
				streamErr = err
				return
			}
		}
		goBin, err := exec.LookPath("go")
		if err != nil {
			goBin = filepath.Join(runtime.GOROOT(), "bin", "go")
		}
		cmd := exec.Command(goBin, "test", "-json", "-count=1", "./...")
		cmd.Dir = dir
		cmd.Env = append(os.Environ(), "GOFLAGS=", "GOWORK=off", "GOTOOLCHAIN=local")
		out, err := cmd.CombinedOutput()
		if _, ok := err.(*exec.ExitError); !ok && err != nil {
			streamErr = err
		}
		streamData = out
	})
	if streamErr != nil {
		t.Fatalf("go test -json on the fixture: %v", streamErr)
	}
	return streamData
}

// only keeps the events of pkg.
func only(t *testing.T, stream []byte, pkg string) []byte {
	t.Helper()
	var out []byte
	sc := bufio.NewScanner(bytes.NewReader(stream))
	for sc.Scan() {
		var e event
		if json.Unmarshal(sc.Bytes(), &e) == nil && e.Package == pkg {
			out = append(out, sc.Bytes()...)
			out = append(out, '\n')
		}
	}
	return out
}

func stream(t *testing.T, in []byte, args ...string) (bool, string) {
	t.Helper()
	var console bytes.Buffer
	ok, err := streamCmd(append([]string{"-module", "fixture"}, args...), bytes.NewReader(in), &console)
	if err != nil {
		t.Fatal(err)
	}
	return ok, console.String()
}

func TestStreamFailures(t *testing.T) {
	in := goTestJSON(t)
	dir := t.TempDir()
	jsonPath, logPath := filepath.Join(dir, "x.json"), filepath.Join(dir, "x.log")
	ok, console := stream(t, in, "-json", jsonPath, "-log", logPath)
	t.Logf("console:\n%s", console)
	if ok {
		t.Error("a stream with failures reported success")
	}
	for _, want := range []string{
		"ok   ./ok ",
		"--- FAIL ./a TestFail",
		"context line",
		"boom: want 1",
		"./crash TestCrash",
		"started the worker",
		"worker exploded",
		"./broken",
		`cannot use "s"`,
		"full log: " + logPath,
		"4 packages: 4 tests passed, 3 skipped, 1 failed; 3 packages failed, 0 incomplete",
	} {
		if !strings.Contains(console, want) {
			t.Errorf("console lacks %q", want)
		}
	}
	for _, not := range []string{"=== RUN", "--- PASS", "./empty", "noise before the skip"} {
		if strings.Contains(console, not) {
			t.Errorf("console has %q without -v", not)
		}
	}
	if raw, _ := os.ReadFile(jsonPath); !bytes.Equal(raw, in) {
		t.Errorf("the -json file differs from the stream (%d bytes, want %d)", len(raw), len(in))
	}
	if text, _ := os.ReadFile(logPath); !bytes.Contains(text, []byte("--- PASS: TestPass")) || !bytes.Contains(text, []byte("noise before the skip")) {
		t.Errorf("the -log file lacks the tests' plain output:\n%s", text)
	}
}

func TestStreamVerbose(t *testing.T) {
	ok, console := stream(t, only(t, goTestJSON(t), "fixture/a"), "-v")
	if ok {
		t.Error("package a has a failing test, the stream reported success")
	}
	for _, want := range []string{"=== RUN   TestPass", "--- PASS: TestPass", "--- SKIP: TestSkipReason", "--- SKIP: TestSub/skipped", "--- FAIL: TestFail"} {
		if !strings.Contains(console, want) {
			t.Errorf("-v console lacks %q:\n%s", want, console)
		}
	}
}

func TestStreamPassAndIncomplete(t *testing.T) {
	pass := only(t, goTestJSON(t), "fixture/ok")
	if ok, console := stream(t, pass); !ok || !strings.Contains(console, "1 packages: 1 tests passed, 0 skipped, 0 failed") {
		t.Errorf("a passing package: ok %v\n%s", ok, console)
	}
	// Cut before the package's result: a killed `go test` must not pass.
	lines := bytes.SplitAfter(bytes.TrimRight(pass, "\n"), []byte("\n"))
	cut := bytes.Join(lines[:len(lines)-1], nil)
	if ok, console := stream(t, cut); ok || !strings.Contains(console, "INCOMPLETE ./ok") {
		t.Errorf("a stream cut before the package result: ok %v\n%s", ok, console)
	}
	if ok, console := stream(t, nil); ok || !strings.Contains(console, "no test results") {
		t.Errorf("an empty stream: ok %v\n%s", ok, console)
	}
	// Lines that are not events (the go command's stderr) are shown.
	if ok, console := stream(t, append([]byte("go: warning: something\n"), pass...)); !ok || !strings.Contains(console, "go: warning: something") {
		t.Errorf("a non-JSON line: ok %v\n%s", ok, console)
	}
}

func TestSkips(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "unit.json")
	if err := os.WriteFile(p, goTestJSON(t), 0o644); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	if err := skipsCmd([]string{"-module", "fixture", "unit=" + p, "e2e=" + filepath.Join(dir, "never-ran.json")}, &out); err != nil {
		t.Fatal(err)
	}
	want := "skipped tests: 3\n" +
		"  unit   ./a TestSkipReason: needs root (network namespaces)\n" +
		"  unit   ./a TestSkipf: line one / line two\n" +
		"  unit   ./a TestSub/skipped: sub reason\n"
	if out.String() != want {
		t.Errorf("skips:\n%s\nwant:\n%s", out.String(), want)
	}
	if err := skipsCmd([]string{"no-label"}, &out); err == nil {
		t.Error("an argument without LABEL= was accepted")
	}
}
