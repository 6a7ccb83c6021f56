//go:build e2e

package e2e

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"io/fs"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/noid-vm/noid/client"
	"github.com/noid-vm/noid/internal/server"
)

// cliIn runs the noid binary against e's server with dir as its working
// directory (for the active VM, which is found from there).
func cliIn(t *testing.T, e *Env, dir string, stdin io.Reader, args ...string) Result {
	t.Helper()
	cmd := exec.Command(e.Bins.Noid, args...)
	cmd.Dir = dir
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "NOID_") {
			env = append(env, kv)
		}
	}
	cmd.Env = append(env, "NOID_URL=unix://"+e.Socket)
	cmd.Stdin = stdin
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("running noid %v: %v", args, err)
	}
	return Result{Stdout: out.String(), Stderr: errb.String(), Code: code}
}

func mustIn(t *testing.T, e *Env, dir string, args ...string) string {
	t.Helper()
	r := cliIn(t, e, dir, nil, args...)
	if r.Code != 0 {
		t.Fatalf("noid %s (in %s): exit %d\nstdout: %s\nstderr: %s", strings.Join(args, " "), dir, r.Code, r.Stdout, r.Stderr)
	}
	return r.Stdout
}

// apiGet fetches path from the server's unix socket without credentials.
func apiGet(t *testing.T, e *Env, path string) []byte {
	t.Helper()
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", e.Socket)
	}}}
	resp, err := hc.Get("http://noid" + path)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		t.Fatalf("GET %s: %s\n%s", path, resp.Status, b)
	}
	return b
}

// TestUX covers the everyday-UX issue end to end on real VMs: the active VM
// across subdirectories, cp in both directions, the JSON schemas, the
// served OpenAPI document and version.
func TestUX(t *testing.T) {
	e := NewEnv(t)
	e.Create("vm1")
	e.Create("vm2")

	t.Run("use", func(t *testing.T) {
		top := t.TempDir()
		deep := filepath.Join(top, "src", "pkg", "x")
		if err := os.MkdirAll(deep, 0o755); err != nil {
			t.Fatal(err)
		}
		if r := cliIn(t, e, deep, nil, "exec", "--", "true"); r.Code != 2 || !strings.Contains(r.Stderr, "hint:") || !strings.Contains(r.Stderr, "noid use <vm>") {
			t.Fatalf("exec without a VM: %+v", r)
		}
		mustIn(t, e, top, "use", "vm1")
		if got := strings.TrimSpace(mustIn(t, e, deep, "exec", "--", "hostname")); got != "vm1" {
			t.Errorf("exec -- hostname in a subdirectory ran on %q", got)
		}
		if got := strings.TrimSpace(mustIn(t, e, deep, "exec", "vm2", "--", "hostname")); got != "vm2" {
			t.Errorf("an explicit VM lost: %q", got)
		}
		var info struct{ Name string }
		json.Unmarshal([]byte(mustIn(t, e, deep, "info", "--json")), &info)
		if info.Name != "vm1" {
			t.Errorf("info in a subdirectory: %q", info.Name)
		}
		if r := cliIn(t, e, deep, nil, "exec", "--", "sh", "-c", "exit 7"); r.Code != 7 {
			t.Errorf("exec exit code: %d", r.Code)
		}
		mustIn(t, e, deep, "checkpoint", "--name", "from-subdir")
		cps, err := e.Client.ListCheckpoints(ctx(t), "vm1")
		if err != nil || len(cps) != 1 || cps[0].Name != "from-subdir" {
			t.Errorf("checkpoint of the active VM: %v %v", cps, err)
		}
		cur := mustIn(t, e, deep, "current")
		if !strings.Contains(cur, "root") || !strings.Contains(cur, "vm1 (running) from "+filepath.Join(top, ".noid-vm")) || !strings.Contains(cur, e.Socket) {
			t.Errorf("current:\n%s", cur)
		}
		mustIn(t, e, deep, "use", "--unset")
		if r := cliIn(t, e, deep, nil, "info"); r.Code != 2 {
			t.Errorf("info after --unset: %+v", r)
		}
		if r := cliIn(t, e, top, nil, "use", "ghost"); r.Code != 1 || !strings.Contains(r.Stderr, `vm "ghost"`) || !strings.Contains(r.Stderr, "hint:") {
			t.Errorf("use of a missing VM: %+v", r)
		}
	})

	t.Run("cp", func(t *testing.T) {
		local := t.TempDir()
		src := filepath.Join(local, "proj")
		big := make([]byte, 5<<20+123)
		rand.Read(big)
		mtime := time.Date(2023, 4, 5, 6, 7, 8, 0, time.UTC)
		files := map[string]struct {
			mode os.FileMode
			body []byte
		}{
			"proj/a.txt":          {0o640, []byte("hello from the host\n")},
			"proj/bin/run.sh":     {0o755, []byte("#!/bin/sh\necho run\n")},
			"proj/data/big.bin":   {0o600, big},
			"proj/data/empty.txt": {0o444, nil},
		}
		for name, f := range files {
			p := filepath.Join(local, name)
			os.MkdirAll(filepath.Dir(p), 0o755)
			if err := os.WriteFile(p, f.body, 0o600); err != nil {
				t.Fatal(err)
			}
			os.Chmod(p, f.mode)
			os.Chtimes(p, mtime, mtime)
		}
		os.Symlink("a.txt", filepath.Join(src, "link"))
		os.Chmod(filepath.Join(src, "bin"), 0o750)
		for _, d := range []string{"bin", "data", "."} {
			os.Chtimes(filepath.Join(src, d), mtime, mtime)
		}
		want := snapshotTree(t, src)

		// Host to VM: content, modes and mtimes as seen in the guest.
		if r := cliIn(t, e, local, nil, "cp", "./proj", "vm1:/root/"); r.Code != 0 || r.Stdout != "" || r.Stderr != "" {
			t.Fatalf("cp host->vm: %+v", r)
		}
		sum := sha256.Sum256(big)
		out := e.MustExec("vm1", "sh", "-c", "sha256sum /root/proj/data/big.bin; stat -c '%a %Y %n' /root/proj/a.txt /root/proj/bin/run.sh /root/proj/data/big.bin /root/proj/bin; readlink /root/proj/link")
		for _, w := range []string{
			hex.EncodeToString(sum[:]) + "  /root/proj/data/big.bin",
			"640 1680674828 /root/proj/a.txt", "755 1680674828 /root/proj/bin/run.sh",
			"600 1680674828 /root/proj/data/big.bin", "750 1680674828 /root/proj/bin", "\na.txt\n",
		} {
			if !strings.Contains(out, w) {
				t.Errorf("in the guest, no %q in:\n%s", w, out)
			}
		}
		// And back: byte-exact with modes and mtimes.
		back := filepath.Join(local, "back")
		if r := cliIn(t, e, local, nil, "cp", "vm1:/root/proj", back); r.Code != 0 {
			t.Fatalf("cp vm->host: %+v", r)
		}
		got := snapshotTree(t, back)
		if !maps(want, got) {
			t.Errorf("round trip differs:\nwant %v\ngot  %v", keys(want), keys(got))
			for k, w := range want {
				if got[k] != w {
					t.Errorf("  %s: want %+v got %+v", k, w, got[k])
				}
			}
		}
		// A single file from the VM under a new name, with its mode.
		e.MustExec("vm1", "sh", "-c", "echo guest-made > /root/g.txt && chmod 751 /root/g.txt && ln -s /etc /root/etc-link")
		mustIn(t, e, local, "cp", "vm1:/root/g.txt", "renamed.txt")
		if fi, err := os.Stat(filepath.Join(local, "renamed.txt")); err != nil || fi.Mode().Perm() != 0o751 || string(readOr(filepath.Join(local, "renamed.txt"))) != "guest-made\n" {
			t.Errorf("single file from the VM: %v %v", fi, err)
		}
		// A symlink in the VM comes back as a link, not what it points to.
		mustIn(t, e, local, "cp", "vm1:/root/etc-link", ".")
		if l, err := os.Readlink(filepath.Join(local, "etc-link")); err != nil || l != "/etc" {
			t.Errorf("guest symlink: %q %v", l, err)
		}
		// The active VM with :PATH.
		mustIn(t, e, local, "use", "vm2")
		mustIn(t, e, local, "cp", "proj/a.txt", ":/root/")
		if got := e.MustExec("vm2", "cat", "/root/a.txt"); got != "hello from the host\n" {
			t.Errorf("cp to the active VM: %q", got)
		}

		// A refused escape: the agent refuses, nothing lands outside.
		e.MustExec("vm1", "mkdir", "-p", "/root/outside")
		for name, entries := range map[string][]tarEnt{
			"dotdot":  {{name: "../outside/pwned", body: "x"}},
			"symlink": {{name: "esc", link: "/root/outside"}, {name: "esc/pwned", body: "x"}},
		} {
			r := cliIn(t, e, local, bytes.NewReader(craftTar(t, entries)), "cp", "-", "vm1:/root/dst-"+name)
			if r.Code != 1 || !strings.Contains(r.Stderr, "refused") || !strings.Contains(r.Stderr, "hint:") {
				t.Errorf("escape %s: %+v", name, r)
			}
			if out, _, code := e.Exec("vm1", "ls", "-A", "/root/outside"); code != 0 || strings.TrimSpace(out) != "" {
				t.Errorf("escape %s wrote outside: %q (exit %d)", name, out, code)
			}
		}
		// Missing path: a clear error with a hint.
		r := cliIn(t, e, local, nil, "cp", "vm1:/root/nope", ".")
		if r.Code != 1 || !strings.Contains(r.Stderr, `vm "vm1" has no /root/nope`) || !strings.Contains(r.Stderr, "hint:") {
			t.Errorf("missing path: %+v", r)
		}
		fi, err := e.Client.StatFile(ctx(t), "vm1", "/root/proj/bin/run.sh")
		if err != nil || fi.Type != "file" || fi.Mode != 0o755 || fi.Size != int64(len(files["proj/bin/run.sh"].body)) || !fi.ModTime.Equal(mtime) {
			t.Errorf("StatFile: %+v %v", fi, err)
		}
		if _, err := e.Client.StatFile(ctx(t), "vm1", "/root/nope"); !client.IsNotFound(err) {
			t.Errorf("StatFile of a missing path: %v", err)
		}
	})

	t.Run("json", func(t *testing.T) {
		var doc struct {
			Components struct {
				Schemas map[string]struct {
					Required   []string                   `json:"required"`
					Properties map[string]json.RawMessage `json:"properties"`
				} `json:"schemas"`
			} `json:"components"`
		}
		if err := json.Unmarshal(apiGet(t, e, "/v1/openapi.json"), &doc); err != nil {
			t.Fatal(err)
		}
		check := func(what, schema string, obj map[string]any) {
			t.Helper()
			s, ok := doc.Components.Schemas[schema]
			if !ok {
				t.Fatalf("no schema %s", schema)
			}
			for k := range obj {
				if _, ok := s.Properties[k]; !ok {
					t.Errorf("%s: field %q is not in the %s schema", what, k, schema)
				}
			}
			for _, k := range s.Required {
				if _, ok := obj[k]; !ok {
					t.Errorf("%s: required field %q missing", what, k)
				}
			}
		}
		array := func(args ...string) []map[string]any {
			t.Helper()
			var out []map[string]any
			if err := json.Unmarshal([]byte(e.MustCLI(args...)), &out); err != nil {
				t.Fatalf("noid %v: %v", args, err)
			}
			return out
		}
		vms := array("list", "--json")
		if len(vms) != 2 {
			t.Errorf("list --json: %d VMs", len(vms))
		}
		for _, v := range vms {
			check("list --json", "VM", v)
		}
		var info map[string]any
		json.Unmarshal([]byte(e.MustCLI("info", "vm1", "--json")), &info)
		check("info --json", "VM", info)
		if info["name"] != "vm1" || info["state"] != "running" {
			t.Errorf("info --json: %v", info)
		}
		if cps := array("checkpoints", "vm2", "--json"); len(cps) != 0 {
			t.Errorf("checkpoints of vm2: %v", cps)
		}
		cps := array("checkpoints", "vm1", "--json")
		if len(cps) != 1 {
			t.Fatalf("checkpoints --json: %v", cps)
		}
		check("checkpoints --json", "Checkpoint", cps[0])
		e.MustCLI("golden", "promote", "vm1", "from-subdir")
		gs := array("golden", "list", "--json")
		if len(gs) != 1 {
			t.Fatalf("golden list --json: %v", gs)
		}
		check("golden list --json", "Golden", gs[0])
	})

	t.Run("openapi", func(t *testing.T) {
		var doc struct {
			Paths map[string]map[string]json.RawMessage `json:"paths"`
		}
		if err := json.Unmarshal(apiGet(t, e, "/v1/openapi.json"), &doc); err != nil {
			t.Fatal(err)
		}
		var documented []string
		for p, ops := range doc.Paths {
			for m := range ops {
				if m != "parameters" {
					documented = append(documented, strings.ToUpper(m)+" "+p)
				}
			}
		}
		registered := new(server.Server).Routes()
		sort.Strings(documented)
		sort.Strings(registered)
		if !slices.Equal(documented, registered) {
			t.Errorf("served document and routes differ:\ndocumented %v\nregistered %v", documented, registered)
		}
	})

	t.Run("version", func(t *testing.T) {
		r := e.CLI("", "version")
		if r.Code != 0 || !strings.Contains(r.Stdout, "client: noid ") || !strings.Contains(r.Stdout, "server: noid-server ") || strings.Contains(r.Stdout, "unreachable") || r.Stderr != "" {
			t.Errorf("version: %+v", r)
		}
	})
}

type fileState struct {
	Mode  fs.FileMode
	MTime int64
	Sum   string
	Link  string
}

func snapshotTree(t *testing.T, dir string) map[string]fileState {
	t.Helper()
	out := map[string]fileState{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		fi, err := os.Lstat(p)
		if err != nil {
			return err
		}
		st := fileState{Mode: fi.Mode(), MTime: fi.ModTime().Unix()}
		switch {
		case fi.Mode()&fs.ModeSymlink != 0:
			st.Link, _ = os.Readlink(p)
			st.MTime = 0
		case fi.Mode().IsRegular():
			b, _ := os.ReadFile(p)
			s := sha256.Sum256(b)
			st.Sum = hex.EncodeToString(s[:])
		}
		out[rel] = st
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func maps(a, b map[string]fileState) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

func keys(m map[string]fileState) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

func readOr(p string) []byte { b, _ := os.ReadFile(p); return b }

type tarEnt struct{ name, link, body string }

func craftTar(t *testing.T, ents []tarEnt) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range ents {
		h := &tar.Header{Name: e.name, Mode: 0o644, ModTime: time.Now(), Typeflag: tar.TypeReg, Size: int64(len(e.body))}
		if e.link != "" {
			h.Typeflag, h.Linkname, h.Size = tar.TypeSymlink, e.link, 0
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		io.WriteString(tw, e.body)
	}
	tw.Close()
	return buf.Bytes()
}
