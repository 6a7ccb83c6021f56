package servercli

import (
	"github.com/spf13/cobra"
)

func newStorageCmd(e *env) *cobra.Command {
	cmd := &cobra.Command{Use: "storage", Short: "Manage where VM and checkpoint files live"}
	return cmd
}
