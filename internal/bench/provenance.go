package bench

import (
	"context"
	"os/exec"
	"strings"
	"time"
)

// CodeInfo says which code a run measured: the commit of the source tree
// noid-bench built noid-server and noid-agent from, and whether tracked
// files differed from it (untracked files, such as result JSON, do not
// count).
type CodeInfo struct {
	Commit string `json:"commit"`
	Branch string `json:"branch,omitempty"`
	Dirty  bool   `json:"dirty"`
	// DirtyFiles are the tracked files that differed (at most 20).
	DirtyFiles []string `json:"dirty_files,omitempty"`
}

// String is "abc1234" or "abc1234+dirty".
func (c *CodeInfo) String() string {
	if c == nil || c.Commit == "" {
		return "unknown"
	}
	if c.Dirty {
		return c.Commit + "+dirty"
	}
	return c.Commit
}

// gitInfo reads the commit and dirty state of the tree at root. Without
// git, or outside a repository, Commit is "unknown".
func gitInfo(root string) *CodeInfo {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	output := func(args ...string) (string, error) {
		cmd := exec.CommandContext(ctx, "git", args...)
		cmd.Dir = root
		out, err := cmd.Output()
		return string(out), err
	}
	run := func(args ...string) (string, error) {
		out, err := output(args...)
		return strings.TrimSpace(out), err
	}
	c := &CodeInfo{Commit: "unknown"}
	commit, err := run("rev-parse", "--short", "HEAD")
	if err != nil || commit == "" {
		return c
	}
	c.Commit = commit
	if br, err := run("rev-parse", "--abbrev-ref", "HEAD"); err == nil && br != "HEAD" {
		c.Branch = br
	}
	// Not trimmed: the first line's leading space is part of its status.
	st, err := output("status", "--porcelain", "--untracked-files=no")
	if err != nil {
		return c
	}
	c.DirtyFiles = parsePorcelain(st)
	c.Dirty = len(c.DirtyFiles) > 0
	if len(c.DirtyFiles) > 20 {
		c.DirtyFiles = append(c.DirtyFiles[:20], "…")
	}
	return c
}

// parsePorcelain returns the paths of `git status --porcelain` output
// ("XY path" or "XY old -> new" lines).
func parsePorcelain(s string) []string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if len(l) < 4 {
			continue
		}
		p := l[3:]
		if i := strings.Index(p, " -> "); i >= 0 {
			p = p[i+4:]
		}
		out = append(out, strings.Trim(p, `"`))
	}
	return out
}
