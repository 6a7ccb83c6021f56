package cli

import (
	"context"
	"fmt"
	"runtime"
	"strconv"
	"strings"

	"github.com/spf13/cobra"

	"github.com/noid-vm/noid/client"
	"github.com/noid-vm/noid/internal/api"
)

// versionInfo is `noid version --json`. Field names are stable.
type versionInfo struct {
	Client struct {
		Version   string `json:"version"`
		API       string `json:"api"`
		GoVersion string `json:"go_version"`
	} `json:"client"`
	Server *client.VersionInfo `json:"server,omitempty"`
	// ServerError says why the server's version is missing.
	ServerError string `json:"server_error,omitempty"`
	// Compatible is false when the client and server API majors differ.
	Compatible bool `json:"compatible"`
	// Warning explains an incompatibility or a missing feature.
	Warning string `json:"warning,omitempty"`
}

func newVersionCmd(e *env) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "version",
		Short: "Print the client and server versions",
		Long: `Print the versions of this client and of the server it talks to, with their API
versions. A warning is printed (on stderr) when the API major versions differ,
which means they are incompatible, or when the server's API is older than the
client's, which means some commands may not work. A server that cannot be
reached is reported, not an error.`,
		Example: `  noid version
  noid version --json | jq -r .server.server`,
		Args: exactArgs(0, "no arguments"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return printVersion(cmd.Context(), e, asJSON)
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

// printVersion prints the client's version and, when it can be reached,
// the server's (noid version, noid --version).
func printVersion(ctx context.Context, e *env, asJSON bool) error {
	var vi versionInfo
	vi.Client.Version, vi.Client.API, vi.Client.GoVersion = Version, api.Version, runtime.Version()
	vi.Compatible = true
	c, err := e.client()
	if err == nil {
		vi.Server, err = c.Version(ctx)
	}
	if err != nil {
		vi.Server, vi.ServerError = nil, err.Error()
	} else {
		vi.Compatible, vi.Warning = apiCompat(api.Version, vi.Server.API)
	}
	if asJSON {
		return printJSON(e.stdout, vi)
	}
	fmt.Fprintf(e.stdout, "client: noid %s (api %s, %s)\n", Version, api.Version, runtime.Version())
	if vi.Server == nil {
		fmt.Fprintf(e.stdout, "server: unreachable (%s)\n", vi.ServerError)
		return nil
	}
	v := vi.Server
	fmt.Fprintf(e.stdout, "server: noid-server %s (api %s, vmm %s %s, accel %s)\n", v.Server, v.API, v.VMM, v.VMMVersion, v.Accel)
	if vi.Warning != "" {
		fmt.Fprintf(e.stderr, "warning: %s\n", vi.Warning)
	}
	return nil
}

// apiCompat compares the client's and server's API versions ("MAJOR.MINOR").
func apiCompat(clientAPI, serverAPI string) (bool, string) {
	cMaj, cMin := splitAPI(clientAPI)
	sMaj, sMin := splitAPI(serverAPI)
	switch {
	case cMaj != sMaj:
		return false, fmt.Sprintf("client api %s and server api %s are incompatible; upgrade the older one", clientAPI, serverAPI)
	case sMin < cMin:
		return true, fmt.Sprintf("the server's api %s is older than the client's %s; some commands may not work until noid-server is upgraded", serverAPI, clientAPI)
	}
	return true, ""
}

func splitAPI(v string) (string, int) {
	maj, min, _ := strings.Cut(v, ".")
	n, _ := strconv.Atoi(min)
	return maj, n
}
