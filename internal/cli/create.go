package cli

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/noid-vm/noid/client"
)

func newCreateCmd(e *env) *cobra.Command {
	var req client.CreateVMRequest
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "create <vm>",
		Short: "Create a VM and wait until it answers",
		Long: `Create a VM. By default it has 1 vCPU and 2048 MiB of memory, and the command
returns once the guest agent answers (use --no-wait to return as soon as the VMM runs).
When a golden snapshot matches the requested vCPUs and memory, the VM is restored
from it instead of booting.`,
		Example: `  noid create dev
  noid create big --vcpus 2 --memory 4096 --disk-size 10G
  noid create offline --network none`,
		Args: exactArgs(1, "a VM name"),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := e.client()
			if err != nil {
				return err
			}
			req.Name = args[0]
			stop := e.spin("creating " + req.Name)
			vm, err := c.CreateVM(cmd.Context(), req)
			stop()
			if err != nil {
				return err
			}
			for _, w := range vm.Warnings {
				fmt.Fprintf(e.stderr, "warning: %s\n", w)
			}
			if asJSON {
				return printJSON(e.stdout, vm)
			}
			how := vm.BootPath
			if vm.BootReason != "" {
				how += " (" + vm.BootReason + ")"
			}
			ms := 0.0
			if vm.Timings != nil {
				ms = vm.Timings.TotalMs
			}
			fmt.Fprintf(e.stdout, "created %s: %d vCPU, %d MiB, ip %s, %s boot in %.0f ms\n", vm.Name, vm.VCPUs, vm.MemoryMiB, orDash(vm.IP), how, ms)
			return nil
		},
	}
	f := cmd.Flags()
	f.IntVar(&req.VCPUs, "vcpus", 0, "number of vCPUs (default: the server's default_vcpus, 1 unless configured)")
	f.IntVar(&req.VCPUs, "cpus", 0, "alias of --vcpus")
	f.IntVar(&req.MemoryMiB, "memory", 0, "memory in MiB (default: the server's default_memory_mib, 2048 unless configured)")
	f.IntVar(&req.MemoryMiB, "mem", 0, "alias of --memory")
	f.StringVar(&req.DiskSize, "disk-size", "", "root disk size, e.g. 4G (default: the image's size)")
	f.StringVar(&req.Network, "network", "", `"default" for a NIC with NAT, "none" for no network`)
	f.BoolVar(&req.AllowPeers, "allow-peers", false, "let this VM reach your other VMs that also allow it")
	f.BoolVar(&req.NoWait, "no-wait", false, "return once the VMM runs, without waiting for the agent")
	f.BoolVar(&req.ColdBoot, "cold", false, "always cold-boot, even when a golden snapshot matches")
	f.BoolVar(&asJSON, "json", false, "print the VM as JSON")
	cmd.Flags().MarkHidden("cpus")
	cmd.Flags().MarkHidden("mem")
	return cmd
}
