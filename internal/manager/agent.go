package manager

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/noid-vm/noid/internal/agent/client"
	"github.com/noid-vm/noid/internal/agent/proto"
	"github.com/noid-vm/noid/internal/errdefs"
	"github.com/noid-vm/noid/internal/store"
)

// agentAnswerTimeout bounds how long a create, restore or clone, or the
// first exec after a server start, waits for the agent of a running guest
// to answer: one that never does (stopped, wedged, or its port taken over
// by a process in the guest) fails the operation with a clear error
// instead of holding it (and the VM's lock) forever.
const agentAnswerTimeout = 2 * time.Minute

// agentClient returns a connected, synchronised agent client for the VM,
// connecting (hello + sync) if there is none. A new connection always sends
// the host clock, fresh entropy and the VM's identity, which is what makes
// restores and clones come back with the right time, RNG state and network.
func (rt *vmRT) agentClient(ctx context.Context, v *store.VM) (*client.Client, error) {
	rt.mu.Lock()
	c := rt.agent
	rt.mu.Unlock()
	if c != nil && c.Err() == nil {
		return c, nil
	}
	rt.agentMu.Lock()
	defer rt.agentMu.Unlock()
	rt.mu.Lock()
	c = rt.agent
	rt.mu.Unlock()
	if c != nil && c.Err() == nil {
		return c, nil
	}
	inst, err := rt.instance()
	if err != nil {
		return nil, err
	}
	// Abort promptly if the VMM dies while we wait for the guest, and
	// give up on a guest that never answers.
	cctx, cancel := context.WithTimeout(ctx, agentAnswerTimeout)
	defer cancel()
	go func() {
		select {
		case <-inst.Done():
			cancel()
		case <-cctx.Done():
		}
	}()
	t0 := time.Now()
	c, err = client.Dial(cctx, func(ctx context.Context) (io.ReadWriteCloser, error) { return inst.DialAgent(ctx) }, client.Options{Logger: rt.log})
	if err != nil {
		select {
		case <-inst.Done():
			return nil, errdefs.ErrNotRunning
		default:
		}
		if errors.Is(err, context.DeadlineExceeded) {
			return nil, fmt.Errorf("%w: the agent did not answer within %s (no reply to the host's hello): the guest may be stopped or overloaded, or a process in it may have taken over the agent's port",
				errdefs.ErrUnavailable, time.Since(t0).Round(time.Second))
		}
		return nil, fmt.Errorf("%w: connecting to agent: %v", errdefs.ErrUnavailable, err)
	}
	t1 := time.Now()
	rt.m.metrics.agentCall("hello", t0)
	res, err := c.Sync(cctx, rt.m.syncFor(v))
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("%w: syncing agent: %v", errdefs.ErrUnavailable, err)
	}
	rt.m.metrics.agentCall("sync", t1)
	rt.log.Debug("agent connected", "hello_ms", ms(t1.Sub(t0)), "sync_ms", ms(time.Since(t1)), "clock_step_ms", res.ClockStepNS/1e6, "changed", res.Changed, "errors", res.Errors, "guest_steps_us", res.StepsUS)
	rt.mu.Lock()
	if rt.inst != inst {
		rt.mu.Unlock()
		c.Close()
		return nil, errdefs.ErrNotRunning
	}
	rt.agent = c
	rt.mu.Unlock()
	return c, nil
}

// takeAgent makes c, an agent connection made before the VM existed (a
// running warm spare's), the VM's: it syncs the VM's clock, entropy and
// identity over it first.
func (rt *vmRT) takeAgent(ctx context.Context, c *client.Client, v *store.VM) error {
	t0 := time.Now()
	res, err := c.Sync(ctx, rt.m.syncFor(v))
	if err != nil {
		c.Close()
		return err
	}
	rt.m.metrics.agentCall("sync", t0)
	rt.log.Debug("agent taken over from a warm spare", "sync_ms", ms(time.Since(t0)), "clock_step_ms", res.ClockStepNS/1e6, "changed", res.Changed, "errors", res.Errors, "guest_steps_us", res.StepsUS)
	rt.mu.Lock()
	old := rt.agent
	rt.agent = c
	rt.mu.Unlock()
	if old != nil && old != c {
		old.Close()
	}
	return nil
}

// dropAgent forgets the current agent connection (after a restore).
func (rt *vmRT) dropAgent() {
	rt.mu.Lock()
	c := rt.agent
	rt.agent = nil
	rt.mu.Unlock()
	if c != nil {
		c.Close()
	}
}

// hostSync is a sync message with the host's time and fresh entropy only.
func hostSync() proto.Sync {
	ent := make([]byte, 64)
	rand.Read(ent)
	return proto.Sync{TimeUnixNano: time.Now().UnixNano(), Entropy: ent}
}

// syncFor builds the sync message: host time, fresh entropy, identity.
func (m *Manager) syncFor(v *store.VM) proto.Sync {
	host := strings.TrimPrefix(v.Name, "_")
	id := &proto.Identity{Hostname: host}
	if v.IP != "" && v.Tap != "" {
		id.MAC = v.MAC
		id.IPv4 = v.IP + "/" + fmt.Sprint(m.poolBits())
		id.Gateway = m.gateway()
		id.DNS = []string{m.gateway()}
	}
	sync := hostSync()
	sync.Identity = id
	return sync
}
