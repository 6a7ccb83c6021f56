//go:build e2e

package e2e

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/noid-vm/noid/client"
)

// TestAdminSeesEveryUser: root lists every user's VMs with `noid list
// --all` and works on alice's VM as alice/dev in every command: info,
// logs, exec, cp both ways, checkpoint, checkpoints, restore (rewind and
// clone, which stays alice's), golden promote (a system golden),
// checkpoint rm and destroy. Bob, who is not an admin, gets exactly the
// not-found answer of a VM that does not exist, for --all and for
// alice/dev alike.
func TestAdminSeesEveryUser(t *testing.T) {
	e := NewEnv(t)
	c := ctx(t)
	tokens := map[string]string{}
	for _, name := range []string{"alice", "bob"} {
		ut, err := e.Client.CreateUser(c, name, false)
		if err != nil {
			t.Fatal(err)
		}
		tokens[name] = ut.Token
	}
	alice, err := client.New("unix://"+e.Socket, tokens["alice"])
	if err != nil {
		t.Fatal(err)
	}
	if _, err := alice.CreateVM(c, client.CreateVMRequest{Name: "dev"}); err != nil {
		t.Fatal(err)
	}
	e.Create("mine")

	// Root's own list is unchanged; --all has everyone's, with a USER column.
	if out := e.MustCLI("list"); !strings.Contains(out, "mine") || strings.Contains(out, "dev") || strings.Contains(out, "USER") {
		t.Errorf("noid list as root:\n%s", out)
	}
	out := e.MustCLI("list", "--all")
	if !regexp.MustCompile(`(?m)^USER\s+NAME\s+STATE`).MatchString(out) || !regexp.MustCompile(`(?m)^alice\s+dev\s+running`).MatchString(out) ||
		!regexp.MustCompile(`(?m)^root\s+mine\s+running`).MatchString(out) {
		t.Errorf("noid list --all:\n%s", out)
	}
	var all []client.VM
	if err := json.Unmarshal([]byte(e.MustCLI("list", "--all", "--json")), &all); err != nil {
		t.Fatal(err)
	}
	owners := map[string]string{}
	for _, v := range all {
		owners[v.Name] = v.Owner
	}
	if len(all) != 2 || owners["dev"] != "alice" || owners["mine"] != "root" {
		t.Errorf("noid list --all --json: %+v", all)
	}

	// Every command on alice/dev.
	if out := e.MustCLI("info", "alice/dev"); !regexp.MustCompile(`(?m)^user\s+alice$`).MatchString(out) || !regexp.MustCompile(`(?m)^name\s+dev$`).MatchString(out) {
		t.Errorf("noid info alice/dev:\n%s", out)
	}
	if out := e.MustCLI("exec", "alice/dev", "--", "hostname"); out != "dev\n" {
		t.Errorf("noid exec alice/dev: %q", out)
	}
	if out := e.MustCLI("logs", "alice/dev"); out == "" {
		t.Error("noid logs alice/dev printed nothing")
	}
	local := filepath.Join(t.TempDir(), "note.txt")
	if err := os.WriteFile(local, []byte("from root\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	e.MustCLI("cp", local, "alice/dev:/root/")
	if out, _, _ := aliceExec(t, alice, "cat", "/root/note.txt"); out != "from root\n" {
		t.Errorf("the file root copied into alice/dev: %q", out)
	}
	back := filepath.Join(t.TempDir(), "back.txt")
	e.MustCLI("cp", "alice/dev:/root/note.txt", back)
	if b, _ := os.ReadFile(back); string(b) != "from root\n" {
		t.Errorf("copied out of alice/dev: %q", b)
	}
	e.MustCLI("checkpoint", "alice/dev", "one")
	if out := e.MustCLI("checkpoints", "alice/dev"); !strings.Contains(out, "one") {
		t.Errorf("noid checkpoints alice/dev:\n%s", out)
	}
	// The checkpoint is alice's.
	if cps, err := alice.ListCheckpoints(c, "dev"); err != nil || len(cps) != 1 || cps[0].Name != "one" {
		t.Errorf("alice's checkpoints of dev: %+v %v", cps, err)
	}
	if _, err := e.Client.ListCheckpoints(c, "dev"); !errors.Is(err, client.ErrNotFound) {
		t.Errorf("root's own dev: %v", err)
	}
	aliceExec(t, alice, "sh", "-c", "echo two > /root/note.txt")
	e.MustCLI("restore", "alice/dev", "one")
	if out, _, _ := aliceExec(t, alice, "cat", "/root/note.txt"); out != "from root\n" {
		t.Errorf("after root rewound alice/dev: %q", out)
	}
	e.MustCLI("restore", "alice/dev", "one", "--as", "dev2")
	if v, err := alice.GetVM(c, "dev2"); err != nil || v.Owner != "alice" || v.State != "running" {
		t.Errorf("the clone root made of alice/dev: %+v %v", v, err)
	}
	e.MustCLI("golden", "promote", "alice/dev", "one")
	if out := e.MustCLI("golden", "list"); !strings.Contains(out, "system") {
		t.Errorf("the golden promoted from alice/dev is not a system one:\n%s", out)
	}
	e.MustCLI("checkpoint", "rm", "alice/dev", "one")
	if cps, err := alice.ListCheckpoints(c, "dev"); err != nil || len(cps) != 0 {
		t.Errorf("alice's checkpoints after root removed one: %+v %v", cps, err)
	}
	if out := e.MustCLI("destroy", "alice/dev2"); !strings.Contains(out, "destroyed alice/dev2") {
		t.Errorf("noid destroy alice/dev2: %q", out)
	}
	if _, err := alice.GetVM(c, "dev2"); !errors.Is(err, client.ErrNotFound) {
		t.Errorf("dev2 after root destroyed it: %v", err)
	}
	if audit := e.ServerCLI("audit").Stdout; !regexp.MustCompile(`(?m)^\S+\s+root\s+DELETE /v1/vms/\{name\}\s+alice/dev2\s+ok\s`).MatchString(audit) {
		t.Errorf("the audit log does not name alice/dev2:\n%s", audit)
	}

	// An unknown user's VM is not found like any other.
	if r := e.CLI("", "info", "zed/dev"); r.Code != 1 || !strings.Contains(r.Stderr, `vm "zed/dev": not found`) {
		t.Errorf("noid info zed/dev: exit %d %s", r.Code, r.Stderr)
	}

	// Bob is no admin: alice's VM does not exist for him, whichever way he asks.
	nothing := e.CLIAs(tokens["bob"], "info", "nosuch")
	if nothing.Code != 1 || !strings.Contains(nothing.Stderr, "not found") {
		t.Fatalf("bob: noid info nosuch: exit %d %s", nothing.Code, nothing.Stderr)
	}
	for _, args := range [][]string{{"info", "alice/dev"}, {"exec", "alice/dev", "--", "true"}, {"checkpoint", "alice/dev"},
		{"destroy", "alice/dev"}, {"logs", "alice/dev"}, {"restore", "alice/dev", "one"}} {
		r := e.CLIAs(tokens["bob"], args...)
		want := strings.ReplaceAll(nothing.Stderr, "nosuch", "alice/dev")
		if r.Code != 1 || !strings.Contains(r.Stderr, `vm "alice/dev": not found`) || (args[0] == "info" && r.Stderr != want) {
			t.Errorf("bob: noid %s: exit %d %s", strings.Join(args, " "), r.Code, r.Stderr)
		}
	}
	if r := e.CLIAs(tokens["bob"], "list", "--all"); r.Code != 1 || !strings.Contains(r.Stderr, "not found") || strings.Contains(r.Stdout, "dev") {
		t.Errorf("bob: noid list --all: exit %d %s%s", r.Code, r.Stdout, r.Stderr)
	}
	bob, err := client.New("unix://"+e.Socket, tokens["bob"])
	if err != nil {
		t.Fatal(err)
	}
	if _, err := bob.GetVM(c, "alice/dev"); !errors.Is(err, client.ErrNotFound) {
		t.Errorf("bob: GetVM alice/dev: %v", err)
	}
	if v, err := alice.GetVM(c, "dev"); err != nil || v.State != "running" {
		t.Errorf("alice's dev after bob's attempts: %+v %v", v, err)
	}
}

// aliceExec runs argv in alice's VM dev with her client.
func aliceExec(t *testing.T, alice *client.Client, argv ...string) (string, string, int) {
	t.Helper()
	var out, errb strings.Builder
	st, err := alice.Exec(ctx(t), "dev", client.ExecRequest{Argv: argv}, client.ExecIO{Stdout: &out, Stderr: &errb})
	if err != nil {
		t.Fatalf("exec %v in alice's dev: %v", argv, err)
	}
	return out.String(), errb.String(), st.Code
}
