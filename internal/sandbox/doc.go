// Package sandbox confines VMM processes: a cgroup per VMM with memory and
// pids limits (cgroup v1 and v2 alike, detected at run time), placement of
// the process in that cgroup before it runs a single instruction of its own,
// and a pool of unprivileged uids, one per running VMM.
//
// # Cgroup layout
//
// Detect reads /proc/self/mountinfo and finds, for each controller noid
// limits (memory and pids), the hierarchy that carries it: a cgroup v1
// mount ("cgroup" with the controller in its super options, as on hosts
// that mount memory, pids, cpu, … separately) or the cgroup v2 unified
// hierarchy ("cgroup2" with the controller in its cgroup.controllers). On a
// hybrid host (v1 controllers plus a controller-less cgroup2 mount at
// /sys/fs/cgroup/unified) and on a v1 host with a name=systemd hierarchy,
// those are joined too, without limits: they are what systemd uses to track
// a service's processes, so joining them takes the VMM out of
// noid-server's unit for good.
//
// A VMM's cgroup is <mount point>/<parent>/<name> in every hierarchy used,
// where parent is Options.Parent ("noid" by default) taken from the
// hierarchy's root as mounted (in a container with its own cgroup
// namespace, that is the container's root), and name is the VM id. On v2 the
// controllers are enabled in cgroup.subtree_control from the root down to
// the parent; that needs the parent's ancestors to have no processes of
// their own (the v2 "no internal processes" rule), which holds for the real
// root and for a delegated subtree.
//
// Limits: memory.limit_in_bytes (v1) or memory.max (v2), and pids.max. The
// cpu controller is deliberately not joined: on both versions a new cgroup
// gets a default weight, and all VMs would then share one weight against
// the rest of the host.
//
// # Placement before the first instruction
//
// Cgroup.Start starts an exec.Cmd inside the cgroup, without a window in
// which the new process runs outside it:
//
//   - v2: clone3 with CLONE_INTO_CGROUP (Go's SysProcAttr.UseCgroupFD,
//     Linux 5.7 or later). The child is born in the cgroup.
//   - v1: there is no CLONE_INTO_CGROUP, but v1 cgroups hold threads, and a
//     child starts in the cgroups of the thread that forks it. Start locks a
//     goroutine to its OS thread, moves that one thread into the VMM's
//     cgroups (writing its tid to each "tasks" file), starts the command
//     from it, moves the thread back and lets the goroutine exit while still
//     locked, so the Go runtime destroys the thread. The Go runtime never
//     clones new threads from a locked thread (it hands that to its template
//     thread), so no runtime thread is ever created inside a VM's cgroup.
//
// Adding the pid after Start would leave a window in which the VMM runs
// unconfined and could fork or allocate before the limits apply; neither
// method above has it. A hierarchy that is only used for tracking is joined
// the same way (the v1 thread move for name=systemd, CLONE_INTO_CGROUP for a
// hybrid unified hierarchy).
//
// # Unprivileged uids
//
// UIDPool hands out one uid from a configured range to each running VMM and
// records it as a lease file (O_EXCL, so two VMMs never share a uid even
// across concurrent servers on one data dir). The gid equals the uid. A
// lease names the VM and the directory it belongs to; OpenUIDPool drops
// leases whose directory is gone, so the pool never leaks uids across
// crashes.
package sandbox
