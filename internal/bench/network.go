package bench

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/noid-vm/noid/client"
)

// runNetwork measures issue 5: what network set-up adds to create and
// clone. One server runs in a network namespace made for it with
// networking on; a second one, with networking off, runs the same
// operations interleaved so the end-to-end difference is visible too.
func (b *Bench) runNetwork(ctx context.Context) error {
	end := b.section("network", "network (issue 5): set-up cost added to create and clone (server in its own network namespace)")
	defer end()
	on, err := b.startServer(ctx, ServerOpts{Name: "net-on", Network: true})
	if err != nil {
		return err
	}
	off, err := b.startServer(ctx, ServerOpts{Name: "net-off"})
	if err != nil {
		return err
	}
	octx, cancel := context.WithTimeout(ctx, 30*time.Minute)
	defer cancel()
	for _, s := range []*Server{on, off} {
		if err := provisionGolden(octx, s, 256); err != nil {
			return fmt.Errorf("%s: %w", s.Opts.Name, err)
		}
		// Cold-booted: the clone source must not come from a warm spare
		// (see the note on checkpoints of warm-spare VMs in BENCHMARKS.md).
		if _, err := s.Client.CreateVM(octx, client.CreateVMRequest{Name: "src", MemoryMiB: 256, ColdBoot: true}); err != nil {
			return err
		}
		if _, err := s.Client.Checkpoint(octx, "src", client.CheckpointRequest{Name: "base"}); err != nil {
			return err
		}
	}
	// The VM really has a working network: its address is configured.
	if out, err := execOK(octx, on.Client, "src", "ip", "addr", "show", "eth0"); err != nil || !strings.Contains(out, "inet ") {
		return fmt.Errorf("the networked VM has no IPv4 address on eth0 (%v): %s", err, out)
	}

	type series struct {
		total Sample
		ps    parts
	}
	newSeries := func() *series { return &series{ps: parts{}} }
	res := map[string]*series{"create-on": newSeries(), "create-off": newSeries(), "clone-on": newSeries(), "clone-off": newSeries(), "cold-on": newSeries()}
	run := func(key string, s *Server, name string, op func() (*client.VM, error), record bool) error {
		t0 := time.Now()
		vm, err := op()
		if err != nil {
			return fmt.Errorf("%s %s: %w\n%s", key, name, err, s.LogTail(20))
		}
		if _, _, err := firstExec(octx, s.Client, name); err != nil {
			return err
		}
		tt := time.Since(t0)
		if strings.HasSuffix(key, "-on") && (vm.IP == "" || vm.Timings == nil || vm.Timings.NetMs == 0) {
			return fmt.Errorf("%s %s: no IP or no net timing in the answer (ip %q, timings %+v)", key, name, vm.IP, vm.Timings)
		}
		b.vlogf("%s %s: %v server %+v", key, name, tt, vm.Timings)
		b.destroy(ctx, s, name)
		if record {
			res[key].total.AddDur(tt)
			res[key].ps.addTimings(vm.Timings)
		}
		return nil
	}
	for i := -b.opts.Warmup; i < b.opts.NetRuns; i++ {
		rec := i >= 0
		for _, x := range []struct {
			key string
			s   *Server
		}{{"on", on}, {"off", off}} {
			s := x.s
			name := fmt.Sprintf("gc-%d", i+b.opts.Warmup)
			if err := run("create-"+x.key, s, name, func() (*client.VM, error) {
				return s.Client.CreateVM(octx, client.CreateVMRequest{Name: name, MemoryMiB: 256})
			}, rec); err != nil {
				return err
			}
			cname := fmt.Sprintf("cl-%d", i+b.opts.Warmup)
			if err := run("clone-"+x.key, s, cname, func() (*client.VM, error) {
				return s.Client.Clone(octx, "src", "base", cname)
			}, rec); err != nil {
				return err
			}
		}
	}
	coldRuns := b.opts.NetRuns / 2
	if coldRuns < 3 {
		coldRuns = 3
	}
	for i := 0; i < coldRuns; i++ {
		name := fmt.Sprintf("cold-%d", i)
		if err := run("cold-on", on, name, func() (*client.VM, error) {
			return on.Client.CreateVM(octx, client.CreateVMRequest{Name: name, MemoryMiB: 256, ColdBoot: true})
		}, true); err != nil {
			return err
		}
	}
	for _, x := range []struct{ key, what string }{{"cold-on", "cold create"}, {"create-on", "golden create"}, {"clone-on", "clone"}} {
		r := res[x.key]
		net := r.ps["net"]
		if net == nil {
			continue
		}
		b.add(&Figure{Section: "network", Name: "network set-up in " + x.what + " (server net_ms)", Unit: "ms", Stats: net.Stats(),
			Note: "TAP creation, bridge attach and nftables rules for the VM (attachNetwork), measured by the server"}).below(10, false)
	}
	for _, x := range []struct{ key, what string }{{"create", "golden create"}, {"clone", "clone"}} {
		a, z := res[x.key+"-on"], res[x.key+"-off"]
		d := a.total.Stats().P50 - z.total.Stats().P50
		b.add(&Figure{Section: "network", Name: x.what + " → first exec: with network − without (p50)", Unit: "ms", Value: val(d),
			Note: fmt.Sprintf("end to end, interleaved: %.0f ms with a NIC (server net %.1f, agent %.0f) against %.0f ms without (agent %.0f); includes the guest configuring eth0 under TCG",
				a.total.Stats().P50, p50(a.ps, "net"), p50(a.ps, "agent"), z.total.Stats().P50, p50(z.ps, "agent"))})
	}
	return nil
}

func p50(p parts, k string) float64 {
	if s := p[k]; s != nil {
		return s.Stats().P50
	}
	return 0
}
