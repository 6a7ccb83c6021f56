package cli

import (
	"context"
	"io"
	"sort"
	"strings"
	"time"

	"github.com/spf13/cobra"
)

func newCompletionCmd(e *env) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "completion bash|zsh|fish",
		Short: "Print a shell completion script",
		Long: `Print the completion script for bash, zsh or fish. Commands, flags and the names
of your VMs (asked from the server as you type) complete.

bash: source it from ~/.bashrc, or install it system-wide:
  noid completion bash > /etc/bash_completion.d/noid
zsh: put it on your $fpath as _noid (with compinit enabled):
  noid completion zsh > "${fpath[1]}/_noid"
fish:
  noid completion fish > ~/.config/fish/completions/noid.fish`,
		Example: `  source <(noid completion bash)
  noid completion zsh > ~/.zfunc/_noid
  noid completion fish | source`,
		ValidArgs: []string{"bash", "zsh", "fish"},
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) != 1 {
				return usagef("completion needs a shell: bash, zsh or fish")
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			root := cmd.Root()
			switch args[0] {
			case "bash":
				if _, err := io.WriteString(e.stdout, bashShim); err != nil {
					return err
				}
				return root.GenBashCompletionV2(e.stdout, true)
			case "zsh":
				return root.GenZshCompletion(e.stdout)
			case "fish":
				return root.GenFishCompletion(e.stdout, true)
			}
			return usagef("completion supports bash, zsh and fish, not %q", args[0])
		},
	}
	return cmd
}

// bashShim defines minimal stand-ins for the two helpers of the
// bash-completion package that cobra's bash script uses, so that completion
// also works where that package is not installed. When it is loaded, its own
// functions are kept.
const bashShim = `# Minimal stand-ins for helpers of the bash-completion package, defined
# only when it is not loaded.
if ! declare -F _get_comp_words_by_ref >/dev/null 2>&1; then
_get_comp_words_by_ref() {
    while [[ $# -gt 0 && $1 == -* ]]; do
        [[ $1 == -n ]] && shift
        shift
    done
    cur=${COMP_WORDS[COMP_CWORD]}
    prev=${COMP_WORDS[COMP_CWORD-1]}
    words=("${COMP_WORDS[@]}")
    cword=$COMP_CWORD
}
fi
if ! declare -F _filedir >/dev/null 2>&1; then
_filedir() {
    local IFS=$'\n'
    if [[ ${1-} == -d ]]; then
        COMPREPLY+=($(compgen -d -- "$cur"))
    else
        COMPREPLY+=($(compgen -f -- "$cur"))
    fi
}
fi

`

// completeVMs completes the first n positional arguments with the caller's
// VM names. Errors (no server) complete nothing rather than failing.
func completeVMs(e *env, n int) func(*cobra.Command, []string, string) ([]string, cobra.ShellCompDirective) {
	return func(cmd *cobra.Command, args []string, toComplete string) ([]string, cobra.ShellCompDirective) {
		if len(args) >= n {
			return nil, cobra.ShellCompDirectiveNoFileComp
		}
		return vmNames(e, cmd.Context(), toComplete), cobra.ShellCompDirectiveNoFileComp
	}
}

func vmNames(e *env, ctx context.Context, prefix string) []string {
	c, err := e.client()
	if err != nil {
		return nil
	}
	if ctx == nil {
		ctx = context.Background()
	}
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	vms, err := c.ListVMs(ctx)
	if err != nil {
		return nil
	}
	var out []string
	for _, v := range vms {
		if strings.HasPrefix(v.Name, prefix) {
			out = append(out, v.Name)
		}
	}
	sort.Strings(out)
	return out
}

// completeCheckpoints completes "<vm> <checkpoint>" arguments.
func completeCheckpoints(e *env) func(*cobra.Command, []string, string) ([]string, cobra.ShellCompDirective) {
	return func(cmd *cobra.Command, args []string, toComplete string) ([]string, cobra.ShellCompDirective) {
		if len(args) == 0 {
			return vmNames(e, cmd.Context(), toComplete), cobra.ShellCompDirectiveNoFileComp
		}
		c, err := e.client()
		if err != nil {
			return nil, cobra.ShellCompDirectiveNoFileComp
		}
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		cps, err := c.ListCheckpoints(ctx, args[0])
		if err != nil {
			return nil, cobra.ShellCompDirectiveNoFileComp
		}
		var out []string
		for _, cp := range cps {
			if strings.HasPrefix(cp.Name, toComplete) {
				out = append(out, cp.Name)
			}
		}
		return out, cobra.ShellCompDirectiveNoFileComp
	}
}
