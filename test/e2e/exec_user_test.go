//go:build e2e

package e2e

import (
	"os"
	"strings"
	"testing"

	"github.com/noid-vm/noid/client"
)

// TestExecFailuresAndUsers: a command that does not exist or cannot be
// executed exits 127 or 126 with a one-line message, as in a shell, while
// noid's own errors stay exit 1 (issue 14 finding 1); --user runs the
// command or console as a user of the guest, and the server's [exec]
// default_user applies to requests that name none (issue 17 finding 5).
// The tiny image has root, nobody and noid.
func TestExecFailuresAndUsers(t *testing.T) {
	e := NewEnv(t)
	e.Create("vm1")

	t.Run("not found and not executable", func(t *testing.T) {
		for _, c := range []struct {
			argv   []string
			code   int
			stderr string
		}{
			{[]string{"nonexistent-cmd", "arg"}, 127, "noid: nonexistent-cmd: command not found\n"},
			{[]string{"/nonexistent/prog"}, 127, "noid: /nonexistent/prog: no such file or directory\n"},
			{[]string{"/etc/hostname"}, 126, "noid: /etc/hostname: permission denied\n"},
			{[]string{"/tmp"}, 126, "noid: /tmp: is a directory\n"},
		} {
			r := e.CLI("", append([]string{"exec", "vm1", "--"}, c.argv...)...)
			if r.Code != c.code || r.Stderr != c.stderr || r.Stdout != "" {
				t.Errorf("noid exec vm1 -- %s: code %d stdout %q stderr %q; want %d and %q",
					strings.Join(c.argv, " "), r.Code, r.Stdout, r.Stderr, c.code, c.stderr)
			}
		}
		// A shell in the guest gives the same codes.
		if r := e.CLI("", "exec", "vm1", "--", "sh", "-c", "nonexistent-cmd"); r.Code != 127 {
			t.Errorf("sh -c nonexistent-cmd: code %d (%q)", r.Code, r.Stderr)
		}
		// The API's exit carries the code, the reason and the message.
		st, err := e.Client.Exec(ctx(t), "vm1", client.ExecRequest{Argv: []string{"nonexistent-cmd"}}, client.ExecIO{})
		if err != nil || st.Code != 127 || st.Reason != client.ReasonNotFound || st.Message != "nonexistent-cmd: command not found" {
			t.Errorf("API exec of a missing command: %+v, %v", st, err)
		}
		st, err = e.Client.Exec(ctx(t), "vm1", client.ExecRequest{Argv: []string{"/etc/hostname"}}, client.ExecIO{})
		if err != nil || st.Code != 126 || st.Reason != client.ReasonNotExecutable {
			t.Errorf("API exec of a non-executable file: %+v, %v", st, err)
		}
		// noid's errors stay exit 1, and nothing says "unavailable".
		r := e.CLI("", "exec", "vm1", "-w", "/nonexistent", "--", "true")
		if r.Code != 1 || r.Stderr != "noid: invalid argument: working directory /nonexistent: no such file or directory\n" {
			t.Errorf("bad workdir: code %d stderr %q", r.Code, r.Stderr)
		}
		if strings.Contains(e.Log(), "lost the process") {
			t.Error("the server reported a lost process")
		}
	})

	t.Run("users", func(t *testing.T) {
		r := e.CLI("", "exec", "vm1", "--user", "noid", "--", "sh", "-c", `id -u; id -g; echo "$HOME $USER $LOGNAME"; pwd`)
		if r.Code != 0 || r.Stdout != "1000\n1000\n/home/noid noid noid\n/home/noid\n" {
			t.Errorf("as noid: code %d stdout %q stderr %q", r.Code, r.Stdout, r.Stderr)
		}
		if r := e.CLI("", "exec", "vm1", "-u", "nobody", "--", "id", "-u"); r.Code != 0 || r.Stdout != "65534\n" {
			t.Errorf("as nobody: code %d stdout %q stderr %q", r.Code, r.Stdout, r.Stderr)
		}
		// Really not root: root's home is closed to noid.
		if r := e.CLI("", "exec", "vm1", "--user", "noid", "--", "touch", "/root/x"); r.Code == 0 {
			t.Errorf("noid could write to /root")
		}
		if r := e.CLI("", "exec", "vm1", "--", "id", "-u"); r.Stdout != "0\n" {
			t.Errorf("default user: %q", r.Stdout)
		}
		r = e.CLI("", "exec", "vm1", "--user", "bob", "--", "true")
		if r.Code != 1 || !strings.HasPrefix(r.Stderr, "noid: invalid argument: no user \"bob\" in the guest's /etc/passwd\nhint: ") {
			t.Errorf("unknown user: code %d stderr %q", r.Code, r.Stderr)
		}
		if r := e.CLI("", "exec", "vm1", "--user", "a:b", "--", "true"); r.Code != 1 || !strings.Contains(r.Stderr, `invalid user "a:b"`) {
			t.Errorf("bad user name: code %d stderr %q", r.Code, r.Stderr)
		}
		r = e.CLI("id -u\nexit 4\n", "console", "vm1", "--user", "noid")
		if r.Code != 4 || !strings.Contains(r.Stdout, "1000") {
			t.Errorf("console as noid: code %d stdout %q stderr %q", r.Code, r.Stdout, r.Stderr)
		}
	})

	t.Run("server default user", func(t *testing.T) {
		cfg, err := os.ReadFile(e.Config)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(e.Config, append(cfg, "\n[exec]\ndefault_user = \"noid\"\n"...), 0o600); err != nil {
			t.Fatal(err)
		}
		e.Stop()
		e.Start() // the VM keeps running and is adopted again
		if r := e.CLI("", "exec", "vm1", "--", "sh", "-c", `id -u; echo "$HOME"`); r.Code != 0 || r.Stdout != "1000\n/home/noid\n" {
			t.Errorf("with default_user noid: code %d stdout %q stderr %q", r.Code, r.Stdout, r.Stderr)
		}
		if r := e.CLI("", "exec", "vm1", "--user", "root", "--", "id", "-u"); r.Code != 0 || r.Stdout != "0\n" {
			t.Errorf("--user root over default_user: code %d stdout %q stderr %q", r.Code, r.Stdout, r.Stderr)
		}
		if r := e.CLI("id -u\nexit\n", "console", "vm1"); r.Code != 0 || !strings.Contains(r.Stdout, "1000") {
			t.Errorf("console with default_user noid: code %d stdout %q", r.Code, r.Stdout)
		}
	})
}
