package cli

import (
	"encoding/json"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/spf13/cobra"
)

func wantCalls(t *testing.T, f *fakeServer, want ...string) {
	t.Helper()
	got := f.takeCalls()
	if !slices.Equal(got, want) {
		t.Errorf("server calls %q, want %q", got, want)
	}
}

// TestUseAcrossSubdirectories: `noid use` sets the active VM for a
// directory and everything below it; the nearest file wins, NOID_VM beats
// the file, an explicit name beats both, and --unset removes it.
func TestUseAcrossSubdirectories(t *testing.T) {
	f := newFakeServer(t, "vm1", "vm2", "vm3")
	r := f.runner(t)
	top := r.cwd
	deep := filepath.Join(top, "a", "b", "c")
	if err := os.MkdirAll(deep, 0o755); err != nil {
		t.Fatal(err)
	}

	// Nothing set: a usage error that says how to set one.
	res := r.in(deep).run("info")
	if res.code != 2 || !strings.Contains(res.stderr, "info needs a VM name") || !strings.Contains(res.stderr, "hint: ") || !strings.Contains(res.stderr, "noid use <vm>") {
		t.Fatalf("info without a VM: %+v", res)
	}

	res = r.run("use", "vm1")
	if res.code != 0 || !strings.Contains(res.stdout, "vm1") {
		t.Fatalf("use vm1: %+v", res)
	}
	b, err := os.ReadFile(filepath.Join(top, ActiveVMFile))
	if err != nil || string(b) != "vm1\n" {
		t.Fatalf("dotfile %q %v", b, err)
	}

	infoName := func(r *cliRunner, args ...string) string {
		t.Helper()
		res := r.run(append([]string{"info", "--json"}, args...)...)
		if res.code != 0 {
			t.Fatalf("info %v in %s: %+v", args, r.cwd, res)
		}
		var v struct{ Name string }
		if err := json.Unmarshal([]byte(res.stdout), &v); err != nil {
			t.Fatal(err)
		}
		return v.Name
	}
	if n := infoName(r.in(deep)); n != "vm1" {
		t.Errorf("info in a subdirectory used %q, want vm1", n)
	}
	if n := infoName(r.in(deep), "vm2"); n != "vm2" {
		t.Errorf("an explicit name lost: %q", n)
	}
	// exec: `--` with nothing before it uses the active VM.
	res = r.in(deep).run("exec", "--", "ls", "-la")
	if res.code != 2 || res.stdout != "exec vm=vm1 argv=ls|-la\n" {
		t.Errorf("exec -- ls -la in a subdirectory: %+v", res)
	}
	wantCalls(t, f, "exec vm1 ls|-la")

	// The nearest file wins.
	mid := filepath.Join(top, "a")
	if res := r.in(mid).run("use", "vm2"); res.code != 0 {
		t.Fatal(res)
	}
	if n := infoName(r.in(deep)); n != "vm2" {
		t.Errorf("nearest file: %q, want vm2", n)
	}
	if n := infoName(r); n != "vm1" {
		t.Errorf("top dir: %q, want vm1", n)
	}
	// NOID_VM beats the file; an explicit name beats NOID_VM.
	r3 := r.in(deep)
	r3.env = map[string]string{"NOID_VM": "vm3"}
	if n := infoName(r3); n != "vm3" {
		t.Errorf("NOID_VM: %q", n)
	}
	if n := infoName(r3, "vm1"); n != "vm1" {
		t.Errorf("explicit over NOID_VM: %q", n)
	}

	// current shows server, user and VM with where it is set.
	res = r.in(deep).run("current", "--json")
	var cur currentInfo
	if err := json.Unmarshal([]byte(res.stdout), &cur); err != nil || res.code != 0 {
		t.Fatalf("current: %+v %v", res, err)
	}
	if cur.Server != f.URL || cur.User != "tester" || cur.VM != "vm2" || cur.VMSource != filepath.Join(mid, ActiveVMFile) || cur.VMState != "running" {
		t.Errorf("current: %+v", cur)
	}
	if res := r.in(deep).run("current"); res.code != 0 || !strings.Contains(res.stdout, "tester") || !strings.Contains(res.stdout, "vm2 (running) from") {
		t.Errorf("current table: %+v", res)
	}

	// --unset removes the nearest file only.
	res = r.in(deep).run("use", "--unset")
	if res.code != 0 || !strings.Contains(res.stdout, filepath.Join(mid, ActiveVMFile)) || !strings.Contains(res.stdout, "now vm1") {
		t.Errorf("use --unset: %+v", res)
	}
	if n := infoName(r.in(deep)); n != "vm1" {
		t.Errorf("after unset: %q, want vm1", n)
	}
	if res := r.in(deep).run("use", "--unset"); res.code != 0 {
		t.Fatal(res)
	}
	if _, err := os.Stat(filepath.Join(top, ActiveVMFile)); !os.IsNotExist(err) {
		t.Errorf("top dotfile still there: %v", err)
	}
	if res := r.in(deep).run("use", "--unset"); res.code != 0 || !strings.Contains(res.stdout, "no active VM") {
		t.Errorf("unset with nothing set: %+v", res)
	}

	// A VM that does not exist is refused, and nothing is written.
	res = r.run("use", "nope")
	if res.code != 1 || !strings.Contains(res.stderr, "not found") || !strings.Contains(res.stderr, "hint:") {
		t.Errorf("use nope: %+v", res)
	}
	if _, err := os.Stat(filepath.Join(top, ActiveVMFile)); !os.IsNotExist(err) {
		t.Errorf("use nope wrote the dotfile")
	}
	// An active VM that disappeared says where it was set.
	if res := r.run("use", "--no-check", "gone"); res.code != 0 {
		t.Fatal(res)
	}
	res = r.in(deep).run("info")
	if res.code != 1 || !strings.Contains(res.stderr, `the active VM "gone" (from `+filepath.Join(top, ActiveVMFile)) {
		t.Errorf("info with a vanished active VM: %+v", res)
	}
	res = r.in(deep).run("current")
	if res.code != 1 || !strings.Contains(res.stdout, "gone (not found)") {
		t.Errorf("current with a vanished active VM: %+v", res)
	}
	// A broken dotfile is reported with its path.
	os.WriteFile(filepath.Join(top, ActiveVMFile), []byte("Not A Name\n"), 0o644)
	if res := r.in(deep).run("info"); res.code != 1 || !strings.Contains(res.stderr, "invalid vm name") || !strings.Contains(res.stderr, ActiveVMFile) {
		t.Errorf("broken dotfile: %+v", res)
	}
	// Usage errors.
	for _, args := range [][]string{{"use"}, {"use", "a", "b"}, {"use", "--unset", "a"}} {
		if res := r.run(args...); res.code != 2 {
			t.Errorf("%v: %+v", args, res)
		}
	}
}

// TestVMArgumentRules pins down the documented rules for commands whose VM
// argument is optional.
func TestVMArgumentRules(t *testing.T) {
	f := newFakeServer(t, "act", "dev")
	r := f.runner(t)
	if res := r.run("use", "act"); res.code != 0 {
		t.Fatal(res)
	}
	cases := []struct {
		args  []string
		code  int
		calls []string
	}{
		// exec: before -- is the VM, after it the command; no command is the console.
		{[]string{"exec", "--", "ls"}, 1, []string{"exec act ls"}},
		{[]string{"exec", "dev", "--", "ls", "/"}, 2, []string{"exec dev ls|/"}},
		{[]string{"exec", "dev", "ls", "/"}, 2, []string{"exec dev ls|/"}},
		{[]string{"exec", "dev"}, 0, []string{"console dev"}},
		{[]string{"exec"}, 0, []string{"console act"}},
		{[]string{"exec", "--"}, 0, []string{"console act"}},
		{[]string{"exec", "a", "b", "--", "ls"}, 2, nil},
		{[]string{"console"}, 0, []string{"console act"}},
		// checkpoint: one argument is always the VM; --name names the active VM's.
		{[]string{"checkpoint"}, 0, []string{"checkpoint act"}},
		{[]string{"checkpoint", "dev"}, 0, []string{"checkpoint dev"}},
		{[]string{"checkpoint", "dev", "x"}, 0, []string{"checkpoint dev x"}},
		{[]string{"checkpoint", "--name", "x"}, 0, []string{"checkpoint act x"}},
		{[]string{"checkpoint", "dev", "--name", "x"}, 0, []string{"checkpoint dev x"}},
		{[]string{"checkpoint", "dev", "x", "--name", "y"}, 2, nil},
		{[]string{"checkpoint", "a", "b", "c"}, 2, nil},
		// restore and checkpoint rm: one argument is a checkpoint of the active VM.
		{[]string{"restore", "clean"}, 0, []string{"restore act clean as="}},
		{[]string{"restore", "dev", "clean"}, 0, []string{"restore dev clean as="}},
		{[]string{"restore", "clean", "--as", "new"}, 0, []string{"restore act clean as=new"}},
		{[]string{"restore"}, 2, nil},
		{[]string{"checkpoint", "rm", "c1"}, 0, []string{"checkpoint-rm act c1"}},
		{[]string{"checkpoint", "rm", "dev", "c1", "c2"}, 0, []string{"checkpoint-rm dev c1", "checkpoint-rm dev c2"}},
		{[]string{"checkpoint", "rm"}, 2, nil},
		// destroy never uses the active VM.
		{[]string{"destroy"}, 2, nil},
	}
	for _, c := range cases {
		res := r.run(c.args...)
		if res.code != c.code {
			t.Errorf("noid %s: exit %d, want %d (stderr %q)", strings.Join(c.args, " "), res.code, c.code, res.stderr)
		}
		if got := f.takeCalls(); !slices.Equal(got, c.calls) {
			t.Errorf("noid %s: server saw %q, want %q", strings.Join(c.args, " "), got, c.calls)
		}
	}
	// Without an active VM, leaving the VM out is a usage error.
	os.Remove(filepath.Join(r.cwd, ActiveVMFile))
	for _, args := range [][]string{{"exec"}, {"exec", "--", "ls"}, {"checkpoint"}, {"restore", "clean"}, {"checkpoints"}, {"logs"}, {"console"}, {"cp", "/etc/hostname", ":/root/"}} {
		res := r.run(args...)
		if res.code != 2 || !strings.Contains(res.stderr, "needs a VM name") || !strings.Contains(res.stderr, "noid use <vm>") {
			t.Errorf("noid %s without an active VM: %+v", strings.Join(args, " "), res)
		}
		f.takeCalls()
	}
}

// TestExitCodesAndHints: 0 for success, the command's own for exec, 1 for
// errors (with a hint), 2 for usage.
func TestExitCodesAndHints(t *testing.T) {
	f := newFakeServer(t, "dev")
	r := f.runner(t)
	cases := []struct {
		args       []string
		code       int
		msg, hint  string
		stdoutPart string
	}{
		{[]string{"list"}, 0, "", "", "dev"},
		{[]string{"--help"}, 0, "", "", "Available Commands"},
		{[]string{"exec", "dev", "--", "a", "b", "c"}, 3, "", "", "argv=a|b|c"},
		{[]string{"exec", "dev", "--user", "noid", "--", "id"}, 1, "", "", "exec vm=dev argv=id user=noid\n"},
		{[]string{"exec", "dev", "-u", "noid"}, 0, "", "", "console vm=dev argv= user=noid\n"},
		{[]string{"console", "dev", "--user", "1000"}, 0, "", "", "console vm=dev argv= user=1000\n"},
		{[]string{"exec", "dev", "--", "nosuchcmd", "x"}, 127, "noid: nosuchcmd: command not found\n", "", ""},
		{[]string{"info", "nope"}, 1, `vm "nope": not found`, "hint: noid list", ""},
		{[]string{"frobnicate"}, 2, "unknown command", "hint: `noid --help`", ""},
		{[]string{"list", "--bogus"}, 2, "unknown flag: --bogus", "", ""},
		{[]string{"info", "a", "b"}, 2, "info takes an optional VM name (got 2 arguments)", "", ""},
		{[]string{"create"}, 2, "create needs a VM name", "", ""},
		{[]string{"cp", "a", "b"}, 2, "cp needs one side in a VM", "", ""},
		{[]string{"cp", "dev:/a", "dev:/b"}, 2, "between the host and a VM", "", ""},
		{[]string{"cp", "dev:rel", "/tmp/x"}, 2, "must be absolute", "", ""},
		{[]string{"completion"}, 2, "needs a shell", "", ""},
		{[]string{"completion", "tcsh"}, 2, "bash, zsh and fish", "", ""},
	}
	for _, c := range cases {
		res := r.run(c.args...)
		if res.code != c.code || !strings.Contains(res.stderr, c.msg) || !strings.Contains(res.stderr, c.hint) || !strings.Contains(res.stdout, c.stdoutPart) {
			t.Errorf("noid %s: exit %d stdout %q stderr %q; want exit %d, %q, %q", strings.Join(c.args, " "), res.code, res.stdout, res.stderr, c.code, c.msg, c.hint)
		}
		// A command that could not run is reported in one plain line.
		if c.code == 127 && res.stderr != c.msg {
			t.Errorf("noid %s: stderr %q, want exactly %q", strings.Join(c.args, " "), res.stderr, c.msg)
		}
	}
	// No server: exit 1 with a hint about starting it.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := "http://" + l.Addr().String()
	l.Close()
	r2 := f.runner(t)
	r2.url = dead
	res := r2.run("list")
	if res.code != 1 || !strings.Contains(res.stderr, "cannot reach noid-server") || !strings.Contains(res.stderr, "hint: is noid-server running?") {
		t.Errorf("unreachable server: %+v", res)
	}
}

// TestJSONOutputs: --json prints arrays even when empty, and objects with
// the API's field names.
func TestJSONOutputs(t *testing.T) {
	f := newFakeServer(t)
	r := f.runner(t)
	if res := r.run("list", "--json"); res.code != 0 || strings.TrimSpace(res.stdout) != "[]" {
		t.Errorf("empty list --json: %+v", res)
	}
	f2 := newFakeServer(t, "dev")
	r2 := f2.runner(t)
	if res := r2.run("checkpoints", "dev", "--json"); res.code != 0 || strings.TrimSpace(res.stdout) != "[]" {
		t.Errorf("empty checkpoints --json: %+v", res)
	}
	res := r2.run("info", "dev", "--json")
	var m map[string]any
	if err := json.Unmarshal([]byte(res.stdout), &m); err != nil {
		t.Fatalf("info --json: %v %+v", err, res)
	}
	for _, k := range []string{"name", "id", "state", "pid", "vcpus", "memory_mib", "disk_bytes", "created_at", "ip", "network", "vmm", "accel", "boot_path", "uptime_seconds", "checkpoints"} {
		if _, ok := m[k]; !ok {
			t.Errorf("info --json lacks %q", k)
		}
	}
	res = r2.run("version", "--json")
	var vi map[string]any
	if err := json.Unmarshal([]byte(res.stdout), &vi); err != nil || vi["compatible"] != true || vi["client"] == nil || vi["server"] == nil {
		t.Errorf("version --json: %v %+v", err, res)
	}
}

// TestVersionCompatibility: noid version prints both versions and warns
// (exit 0) when the API majors differ.
func TestVersionCompatibility(t *testing.T) {
	f := newFakeServer(t)
	r := f.runner(t)
	res := r.run("version")
	if res.code != 0 || !strings.Contains(res.stdout, "client: noid "+Version) || !strings.Contains(res.stdout, "server: noid-server 9.9.9-fake") || res.stderr != "" {
		t.Errorf("compatible version: %+v", res)
	}
	if res := r.run("--version"); res.code != 0 || !strings.Contains(res.stdout, "client: noid "+Version) || !strings.Contains(res.stdout, "server: noid-server 9.9.9-fake") {
		t.Errorf("noid --version: %+v", res)
	}
	f.apiVersion = "2.0"
	res = r.run("version")
	if res.code != 0 || !strings.Contains(res.stderr, "warning: client api 1.0 and server api 2.0 are incompatible") {
		t.Errorf("incompatible version: %+v", res)
	}
	res = r.run("version", "--json")
	if !strings.Contains(res.stdout, `"compatible": false`) {
		t.Errorf("incompatible version --json: %+v", res)
	}
	if ok, w := apiCompat("1.3", "1.1"); !ok || !strings.Contains(w, "older") {
		t.Errorf("older minor: %v %q", ok, w)
	}
	if ok, w := apiCompat("1.0", "1.4"); !ok || w != "" {
		t.Errorf("newer server minor: %v %q", ok, w)
	}
	r.url = "http://127.0.0.1:1"
	if res := r.run("version"); res.code != 0 || !strings.Contains(res.stdout, "server: unreachable") {
		t.Errorf("unreachable: %+v", res)
	}
	if res := r.run("--version"); res.code != 0 || !strings.Contains(res.stdout, "client: noid "+Version) || !strings.Contains(res.stdout, "server: unreachable") {
		t.Errorf("noid --version, server unreachable: %+v", res)
	}
}

// TestEveryCommandHasExample: every command's --help carries an example
// that uses the command itself.
func TestEveryCommandHasExample(t *testing.T) {
	root := newRoot(newEnv(strings.NewReader(""), &strings.Builder{}, &strings.Builder{}, func(string) string { return "" }))
	var n int
	var walk func(c *cobra.Command)
	walk = func(c *cobra.Command) {
		if c.Hidden || strings.HasPrefix(c.Name(), "__") {
			return
		}
		n++
		if strings.TrimSpace(c.Example) == "" {
			t.Errorf("%q has no example", c.CommandPath())
		} else if !strings.Contains(c.Example, c.CommandPath()) {
			t.Errorf("the example of %q does not use it:\n%s", c.CommandPath(), c.Example)
		}
		if c.Short == "" {
			t.Errorf("%q has no short description", c.CommandPath())
		}
		for _, s := range c.Commands() {
			walk(s)
		}
	}
	walk(root)
	if n < 20 {
		t.Errorf("only %d commands walked", n)
	}
	// And --help shows it.
	f := newFakeServer(t)
	res := f.runner(t).run("cp", "--help")
	if res.code != 0 || !strings.Contains(res.stdout, "Examples:\n  noid cp ./src dev:/root/") {
		t.Errorf("cp --help: %+v", res)
	}
}

// TestCompletionScripts: the scripts generate, bash loads its script, and
// completing `noid ex` and `noid exec <TAB>` works in a real bash through
// the noid binary.
func TestCompletionScripts(t *testing.T) {
	f := newFakeServer(t, "alpha", "beta")
	r := f.runner(t)
	scripts := map[string]string{}
	for sh, marker := range map[string]string{"bash": "__start_noid", "zsh": "#compdef noid", "fish": "complete -c noid"} {
		res := r.run("completion", sh)
		if res.code != 0 || !strings.Contains(res.stdout, marker) {
			t.Errorf("completion %s: exit %d, no %q in %d bytes", sh, res.code, marker, len(res.stdout))
		}
		scripts[sh] = res.stdout
	}
	bash, err := exec.LookPath("bash")
	if err != nil {
		t.Skip("bash not installed")
	}
	dir := t.TempDir()
	noid := filepath.Join(dir, "noid")
	build := exec.Command("go", "build", "-o", noid, "../../cmd/noid")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	script := `source <(noid completion bash) || exit 1
complete -p noid || exit 1
complete_line() {
  COMP_LINE="$1"; COMP_POINT=${#COMP_LINE}
  read -r -a COMP_WORDS <<<"$COMP_LINE"
  if [[ "$COMP_LINE" == *" " ]]; then COMP_WORDS+=(""); fi
  COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))
  COMPREPLY=()
  # compopt only works inside real completion; outside it just complains.
  __start_noid noid "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}" 2>/dev/null
  echo "[$1] ${COMPREPLY[*]}"
}
complete_line "noid ex"
complete_line "noid exec "
complete_line "noid checkpoint r"
`
	cmd := exec.Command(bash, "--norc", "--noprofile", "-c", script)
	cmd.Env = append(os.Environ(), "PATH="+dir+":"+os.Getenv("PATH"), "NOID_URL="+f.URL, "HOME="+t.TempDir())
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("bash: %v\n%s", err, out)
	}
	got := string(out)
	for _, want := range []string{"-F __start_noid noid", "[noid ex] exec", "[noid exec ] alpha beta", "[noid checkpoint r] rm"} {
		if !strings.Contains(got, want) {
			t.Errorf("bash completion output lacks %q:\n%s", want, got)
		}
	}
	for sh, bin := range map[string]string{"zsh": "zsh", "fish": "fish"} {
		p, err := exec.LookPath(bin)
		if err != nil {
			t.Logf("%s not installed; only checked that its script generates", sh)
			continue
		}
		file := filepath.Join(dir, "noid."+sh)
		os.WriteFile(file, []byte(scripts[sh]), 0o644)
		args := []string{"-n", file}
		if out, err := exec.Command(p, args...).CombinedOutput(); err != nil {
			t.Errorf("%s -n on the completion script: %v\n%s", sh, err, out)
		}
	}
}
