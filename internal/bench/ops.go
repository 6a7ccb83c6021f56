package bench

import (
	"bytes"
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/noid-vm/noid/client"
)

// execOK runs argv in vm and fails unless it exits 0. It returns stdout.
func execOK(ctx context.Context, c *client.Client, vm string, argv ...string) (string, error) {
	var out, errb bytes.Buffer
	st, err := c.Exec(ctx, vm, client.ExecRequest{Argv: argv}, client.ExecIO{Stdout: &out, Stderr: &errb})
	if err != nil {
		return "", fmt.Errorf("exec %v in %s: %w", argv, vm, err)
	}
	if st.Code != 0 {
		return out.String(), fmt.Errorf("exec %v in %s: exit %d: %s", argv, vm, st.Code, strings.TrimSpace(errb.String()))
	}
	return out.String(), nil
}

// firstExec runs `true` in vm until it succeeds (the "first successful
// exec") and returns how long that took. Create and restore return only
// once the agent answers, so the first attempt normally succeeds; a failed
// attempt is retried for up to a minute and counted in the time.
func firstExec(ctx context.Context, c *client.Client, vm string) (time.Duration, int, error) {
	start := time.Now()
	deadline := start.Add(time.Minute)
	tries := 0
	for {
		tries++
		_, err := execOK(ctx, c, vm, "true")
		if err == nil {
			return time.Since(start), tries, nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return time.Since(start), tries, err
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// secondExec times one more `true` right after the first one: the
// difference shows what the first exec paid for cold caches (under TCG the
// new QEMU process starts with an empty translation cache).
func secondExec(ctx context.Context, c *client.Client, vm string) (time.Duration, error) {
	t0 := time.Now()
	_, err := execOK(ctx, c, vm, "true")
	return time.Since(t0), err
}

// parts collects server-reported timings across runs.
type parts map[string]*Sample

func (p parts) add(name string, v float64) {
	s := p[name]
	if s == nil {
		s = &Sample{}
		p[name] = s
	}
	s.Add(v)
}

func (p parts) addTimings(t *client.Timings) {
	if t == nil {
		return
	}
	p.add("total", t.TotalMs)
	for _, x := range []struct {
		k string
		v float64
	}{{"pause", t.PauseMs}, {"copy", t.CopyMs}, {"spawn", t.SpawnMs}, {"load", t.LoadMs}, {"agent", t.AgentMs}, {"net", t.NetMs}} {
		if x.v >= 0.005 { // skip parts the operation did not have (the server reports 0 or a rounding µs)
			p.add(x.k, x.v)
		}
	}
}

func (p parts) stats() map[string]*Stats {
	if len(p) == 0 {
		return nil
	}
	m := map[string]*Stats{}
	for k, s := range p {
		m[k] = s.Stats()
	}
	return m
}

// destroy removes a VM, logging (not failing) on error.
func (b *Bench) destroy(ctx context.Context, s *Server, name string) {
	dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Minute)
	defer cancel()
	if _, err := s.Client.DestroyVM(dctx, name); err != nil && !client.IsNotFound(err) {
		b.failf("destroying %s: %v", name, err)
	}
}

// opCtx bounds one VM operation.
func opCtx(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, 5*time.Minute)
}

func (b *Bench) vlogf(format string, a ...any) {
	if b.opts.Verbose {
		b.logf(format, a...)
	}
}
