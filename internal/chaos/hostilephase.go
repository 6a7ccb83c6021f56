package chaos

import (
	"context"
	"debug/elf"
	"errors"
	"fmt"
	"strings"
	"time"
)

// guestToolPath is where the hostile phase puts the hostile program in
// the victim VM.
const guestToolPath = "/chaos-hostile"

// checkGuestTool makes sure path is a static x86-64 executable, which the
// guest (busybox, no loader for Go's dynamic builds) can run.
func checkGuestTool(path string) error {
	f, err := elf.Open(path)
	if err != nil {
		return fmt.Errorf("the hostile guest program %s: %w", path, err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return fmt.Errorf("the hostile guest program %s is dynamically linked; build noid-chaos with CGO_ENABLED=0", path)
		}
	}
	if f.Machine != elf.EM_X86_64 {
		return fmt.Errorf("the hostile guest program %s is for %s, not x86-64", path, f.Machine)
	}
	return nil
}

// hostilePhase runs the hostile program in a victim VM once per mode
// (HostileModes), each for Options.HostileSeconds, with the workers held
// and nothing else in flight. While a mode runs: noid-server must stay up,
// another VM must answer exec, and an exec in the victim must succeed or
// fail with the server's error, never hang (the client gives it 4
// minutes). After a mode ends the victim must answer exec again (the host
// recovers once the guest behaves). At the end the victim is rewound to
// an acknowledged checkpoint, which must restore its write.
func (r *runner) hostilePhase(ctx context.Context, n int) bool {
	r.gate.Lock()
	defer r.gate.Unlock()
	c := r.srv.client
	victim, acks := r.pickAcked(ctx, n, "hostile guest")
	if victim == "" {
		return false
	}
	bystander := ""
	if vms, err := c.ListVMs(ctx); err == nil {
		for _, v := range vms {
			if v.State == "running" && v.Name != victim {
				bystander = v.Name
				break
			}
		}
	}
	r.record(fmt.Sprintf("fault %d at %.1fs: hostile guest in VM %s (bystander %q), modes %s, %ds each", n, r.since(), victim, bystander,
		strings.Join(r.o.HostileModes, ", "), r.o.HostileSeconds))
	cctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	_, err := c.CopyToVM(cctx, victim, r.o.GuestTool, guestToolPath, nil)
	cancel()
	if err != nil {
		r.violate("fault %d: copying the hostile program into %s: %v", n, victim, err)
		return true
	}
	serverPid := r.srv.pid()
	for _, mode := range r.o.HostileModes {
		what := fmt.Sprintf("fault %d, hostile %s in %s", n, mode, victim)
		start := time.Now()
		cmd := fmt.Sprintf("%s hostile-guest %s %d </dev/null >>/chaos-hostile.log 2>&1 &", guestToolPath, mode, r.o.HostileSeconds)
		if _, err := execOut(ctx, c, victim, "sh", "-c", cmd); err != nil {
			r.logf("%s: starting it: %v", what, err)
		}
		// Execs in the victim while the guest misbehaves: each gets an
		// answer or the server's error, within the client's 4 minutes.
		end := start.Add(time.Duration(r.o.HostileSeconds) * time.Second)
		var oks, fails int
		var slowest time.Duration
		errs := map[string]int{}
		for probe := 0; probe == 0 || time.Now().Before(end); probe++ {
			pctx, cancel := context.WithTimeout(ctx, 4*time.Minute)
			t0 := time.Now()
			_, err := execOut(pctx, c, victim, "echo", "ok")
			cancel()
			slowest = max(slowest, time.Since(t0))
			switch {
			case err == nil:
				oks++
			case ctx.Err() == nil && errors.Is(pctx.Err(), context.DeadlineExceeded):
				r.violate("%s: exec in the hostile VM hung for 4 minutes", what)
			default:
				fails++
				errs[shortErr(err)]++
			}
			time.Sleep(500 * time.Millisecond)
		}
		r.logf("%s: %d execs answered, %d failed (slowest %.1fs); errors: %s", what, oks, fails, slowest.Seconds(), fmtCounts(errs))
		if bystander != "" {
			if _, err := execOut(ctx, c, bystander, "echo", "ok"); err != nil {
				r.violate("%s: the other VM %s does not answer exec: %v", what, bystander, err)
			}
		}
		if !r.srv.running() || r.srv.pid() != serverPid {
			r.violate("%s: noid-server %d exited", what, serverPid)
			return true
		}
		// Let the mode run out, then the victim must answer again.
		time.Sleep(time.Until(end.Add(time.Second)))
		t0 := time.Now()
		var lastErr error
		for time.Since(t0) < 3*time.Minute && ctx.Err() == nil {
			if _, lastErr = execOut(ctx, c, victim, "echo", "ok"); lastErr == nil {
				break
			}
			time.Sleep(time.Second)
		}
		if lastErr != nil {
			r.violate("%s: the VM does not answer exec 3 minutes after the hostile program ended: %v", what, lastErr)
			break
		}
		log, _ := execOut(ctx, c, victim, "cat", "/chaos-hostile.log")
		r.logf("%s: the VM answers again (%.1fs after the program ended); the program said: %s", what, time.Since(t0).Seconds(), strings.Join(strings.Fields(log), " "))
		execOut(ctx, c, victim, "rm", "-f", "/chaos-hostile.log")
	}
	a := acks[r.rng.Intn(len(acks))]
	rctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	_, err = c.Restore(rctx, a.vm, a.checkpoint)
	cancel()
	if err != nil {
		r.violate("fault %d: rewinding the hostile VM %s to %s: %v", n, victim, a.checkpoint, err)
		return true
	}
	r.checkAck(ctx, victim, a, fmt.Sprintf("fault %d, after rewinding the hostile VM", n))
	return true
}

// shortErr is the part of an exec error that says what the server
// answered, without the request's details.
func shortErr(err error) string {
	s := err.Error()
	if i := strings.Index(s, ": unavailable: "); i >= 0 {
		s = s[i+2:]
	} else if i := strings.Index(s, "] in "); i >= 0 {
		s = s[i+2:]
	}
	if len(s) > 160 {
		s = s[:160] + "..."
	}
	return s
}
