package chaos

import (
	"bytes"
	"context"
	"encoding/hex"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/noid-vm/noid/client"
)

// ack is an acknowledged write: a file written in a VM through exec and
// synced, then a checkpoint that returned success. A rewind to that
// checkpoint must show the file with this content.
type ack struct {
	vm, checkpoint, path, content string
}

// vmRec is what the run knows of one VM a worker created or cloned (the
// server acknowledged it).
type vmRec struct {
	worker int
	acks   []ack
	// destroying is set when a destroy was sent: the VM (and its
	// checkpoints) may then be gone even if the destroy never answered.
	destroying bool
}

// ledger is the run's record of acknowledged VMs and writes, shared by the
// workers (each touches only its own VMs) and the checker (while the
// workers are held).
type ledger struct {
	mu  sync.Mutex
	vms map[string]*vmRec
	// golden is the acknowledged write the golden snapshot holds, known
	// when the last promote answered; goldenAny once any was tried.
	golden                 ack
	goldenKnown, goldenAny bool
}

// setGolden records a promote of a's checkpoint that answered; a nil a
// records one whose answer was lost (the golden may be the old one).
func (l *ledger) setGolden(a *ack) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.goldenAny = true
	l.goldenKnown = a != nil
	if a != nil {
		l.golden = *a
	}
}

// goldenState returns what the golden holds (see setGolden).
func (l *ledger) goldenState() (a ack, known, any bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.golden, l.goldenKnown, l.goldenAny
}

func (l *ledger) add(name string, worker int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.vms[name] == nil {
		l.vms[name] = &vmRec{worker: worker}
	}
}

func (l *ledger) addAck(a ack) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if r := l.vms[a.vm]; r != nil {
		r.acks = append(r.acks, a)
	}
}

// takeOldestAck removes vm's oldest acknowledged write from the ledger
// (its checkpoint is about to be deleted) and returns it.
func (l *ledger) takeOldestAck(vm string) (ack, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	r := l.vms[vm]
	if r == nil || len(r.acks) == 0 {
		return ack{}, false
	}
	a := r.acks[0]
	r.acks = r.acks[1:]
	return a, true
}

func (l *ledger) markDestroying(name string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if r := l.vms[name]; r != nil {
		r.destroying = true
		r.acks = nil
	}
}

// owned lists worker w's VMs, sorted (so that a seed picks the same ones).
func (l *ledger) owned(w int) []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []string
	for n, r := range l.vms {
		if r.worker == w && !r.destroying {
			out = append(out, n)
		}
	}
	sort.Strings(out)
	return out
}

func (l *ledger) acksOf(name string) []ack {
	l.mu.Lock()
	defer l.mu.Unlock()
	if r := l.vms[name]; r != nil {
		return append([]ack(nil), r.acks...)
	}
	return nil
}

// worker is one client doing random operations on VMs of its own.
type worker struct {
	id    int
	rng   *rand.Rand
	c     *client.Client
	led   *ledger
	run   *runner
	seq   int
	stats map[string]int // op -> successes
	fails map[string]int // op -> errors (expected around faults)
}

// maxVMsPerWorker bounds the VMs one worker keeps (each is a TCG QEMU),
// maxAcksPerVM the acknowledged checkpoints it keeps of each.
const (
	maxVMsPerWorker = 2
	maxAcksPerVM    = 4
)

// loop runs operations until ctx ends. Each operation holds the run's gate
// shared, so the checker can wait for a quiet moment.
func (w *worker) loop(ctx context.Context) {
	for ctx.Err() == nil {
		w.run.waitHeld()
		w.run.gate.RLock()
		if ctx.Err() == nil {
			w.step(ctx)
		}
		w.run.gate.RUnlock()
	}
}

// step picks and runs one operation.
func (w *worker) step(ctx context.Context) {
	vms := w.led.owned(w.id)
	if len(vms) == 0 {
		w.do("create", func() error { return w.create(ctx) })
		return
	}
	vm := vms[w.rng.Intn(len(vms))]
	state := w.state(ctx, vm)
	if state == "dead" {
		if a := w.led.acksOf(vm); len(a) > 0 {
			w.do("rewind-dead", func() error { return w.rewind(ctx, a[w.rng.Intn(len(a))]) })
		} else {
			w.do("destroy", func() error { return w.destroy(ctx, vm) })
		}
		return
	}
	if state != "running" {
		return
	}
	// Checkpoints are real copies on ext4: keep each VM's few, so the
	// run's data disk does not fill up by itself.
	if len(w.led.acksOf(vm)) > maxAcksPerVM {
		w.do("checkpoint-rm", func() error { return w.removeOldest(ctx, vm) })
		return
	}
	switch p := w.rng.Intn(100); {
	case p < 35:
		w.do("ack-write", func() error { return w.ackWrite(ctx, vm) })
	case p < 45:
		w.do("cp-ack", func() error { return w.cpAck(ctx, vm) })
	case p < 48:
		if a := w.led.acksOf(vm); len(a) > 0 {
			w.do("golden-promote", func() error { return w.promote(ctx, a[w.rng.Intn(len(a))]) })
		}
	case p < 70:
		if a := w.led.acksOf(vm); len(a) > 0 {
			w.do("rewind", func() error { return w.rewind(ctx, a[w.rng.Intn(len(a))]) })
		}
	case p < 85:
		if a := w.led.acksOf(vm); len(a) > 0 && len(vms) < maxVMsPerWorker {
			w.do("clone", func() error { return w.clone(ctx, a[w.rng.Intn(len(a))]) })
		}
	case p < 92:
		if len(vms) < maxVMsPerWorker {
			w.do("create", func() error { return w.create(ctx) })
		}
	default:
		if len(vms) > 1 {
			w.do("destroy", func() error { return w.destroy(ctx, vm) })
		}
	}
}

// do runs op and counts its outcome. Errors are expected while a fault is
// in flight; the invariants, not the errors, decide whether a run passes.
func (w *worker) do(name string, op func() error) {
	if err := op(); err != nil {
		w.fails[name]++
		w.run.logf("worker %d: %s: %v", w.id, name, err)
		if ctxDone(err) {
			// The server may be down: do not spin.
			time.Sleep(200 * time.Millisecond)
		}
		return
	}
	w.stats[name]++
}

func ctxDone(err error) bool {
	return err != nil && (strings.Contains(err.Error(), "connection refused") || strings.Contains(err.Error(), "no such file"))
}

func (w *worker) name(prefix string) string {
	w.seq++
	return fmt.Sprintf("%s%d-%d", prefix, w.id, w.seq)
}

func (w *worker) state(ctx context.Context, vm string) string {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	v, err := w.c.GetVM(ctx, vm)
	if err != nil {
		return ""
	}
	return v.State
}

func (w *worker) create(ctx context.Context) error {
	name := w.name("w")
	ctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	if _, err := w.c.CreateVM(ctx, client.CreateVMRequest{Name: name}); err != nil {
		return fmt.Errorf("creating %s: %w", name, err)
	}
	w.led.add(name, w.id)
	return nil
}

// fresh returns random content and a new file name for it.
func (w *worker) fresh(prefix string) (content, name string) {
	b := make([]byte, 16)
	w.rng.Read(b)
	w.seq++
	return hex.EncodeToString(b), fmt.Sprintf("%s-%d-%d", prefix, w.id, w.seq)
}

// ackWrite writes a file with random content, syncs it, checkpoints the
// VM and records the write as acknowledged once the checkpoint returns.
func (w *worker) ackWrite(ctx context.Context, vm string) error {
	content, name := w.fresh("ack")
	path := "/" + name
	if _, err := execOut(ctx, w.c, vm, "sh", "-c", "echo "+content+" > "+path+" && sync"); err != nil {
		return err
	}
	cctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	cp, err := w.c.Checkpoint(cctx, vm, client.CheckpointRequest{})
	if err != nil {
		return fmt.Errorf("checkpointing %s: %w", vm, err)
	}
	w.led.addAck(ack{vm: vm, checkpoint: cp.ID, path: path, content: content})
	return nil
}

// cpAck copies a file with random content into vm (noid cp), reads it
// back, checkpoints the VM and records the file as an acknowledged write.
// A copy that succeeded and reads back otherwise is a violation.
func (w *worker) cpAck(ctx context.Context, vm string) error {
	content, name := w.fresh("cp")
	local := filepath.Join(w.run.tmp, name)
	if err := os.WriteFile(local, []byte(content+"\n"), 0o644); err != nil {
		return err
	}
	defer os.Remove(local)
	cctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	if _, err := w.c.CopyToVM(cctx, vm, local, "/"+name, nil); err != nil {
		return fmt.Errorf("copying %s into %s: %w", name, vm, err)
	}
	back := local + ".back"
	defer os.Remove(back)
	if _, err := w.c.CopyFromVM(cctx, vm, "/"+name, back, nil); err != nil {
		return fmt.Errorf("copying %s back from %s: %w", name, vm, err)
	}
	if got, err := os.ReadFile(back); err != nil || strings.TrimSpace(string(got)) != content {
		w.run.violate("noid cp into %s and back: /%s reads %q (%v), want %q", vm, name, got, err, content)
		return errLost
	}
	if _, err := execOut(ctx, w.c, vm, "sync"); err != nil {
		return err
	}
	cp, err := w.c.Checkpoint(cctx, vm, client.CheckpointRequest{})
	if err != nil {
		return fmt.Errorf("checkpointing %s: %w", vm, err)
	}
	w.led.addAck(ack{vm: vm, checkpoint: cp.ID, path: "/" + name, content: content})
	return nil
}

// removeOldest deletes the checkpoint of vm's oldest acknowledged write
// (noid checkpoint rm). The write leaves the ledger first: a delete whose
// answer is lost may or may not have happened.
func (w *worker) removeOldest(ctx context.Context, vm string) error {
	a, ok := w.led.takeOldestAck(vm)
	if !ok {
		return nil
	}
	dctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	if err := w.c.DeleteCheckpoint(dctx, vm, a.checkpoint); err != nil && !client.IsNotFound(err) {
		return fmt.Errorf("deleting checkpoint %s of %s: %w", a.checkpoint, vm, err)
	}
	return nil
}

// promote makes a's checkpoint the golden snapshot of its shape, which the
// next creates start from.
func (w *worker) promote(ctx context.Context, a ack) error {
	pctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	if _, err := w.c.PromoteGolden(pctx, a.vm, a.checkpoint); err != nil {
		w.led.setGolden(nil)
		return fmt.Errorf("promoting %s/%s: %w", a.vm, a.checkpoint, err)
	}
	w.led.setGolden(&a)
	return nil
}

// rewind restores a's VM to a's checkpoint and checks a's file. A restore
// that succeeded and then shows other content is a violation.
func (w *worker) rewind(ctx context.Context, a ack) error {
	rctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	if _, err := w.c.Restore(rctx, a.vm, a.checkpoint); err != nil {
		return fmt.Errorf("rewinding %s to %s: %w", a.vm, a.checkpoint, err)
	}
	return w.run.verifyAck(ctx, a.vm, a, "after a rewind by worker")
}

// clone clones a's checkpoint into a new VM of this worker and checks a's
// file there.
func (w *worker) clone(ctx context.Context, a ack) error {
	name := w.name("c")
	rctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	if _, err := w.c.Clone(rctx, a.vm, a.checkpoint, name); err != nil {
		return fmt.Errorf("cloning %s/%s as %s: %w", a.vm, a.checkpoint, name, err)
	}
	w.led.add(name, w.id)
	return w.run.verifyAck(ctx, name, a, "in a clone made by worker")
}

func (w *worker) destroy(ctx context.Context, vm string) error {
	w.led.markDestroying(vm)
	dctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	if _, err := w.c.DestroyVM(dctx, vm); err != nil && !client.IsNotFound(err) {
		return fmt.Errorf("destroying %s: %w", vm, err)
	}
	return nil
}

// execOut runs argv in vm (a minute at most, unless ctx has a deadline of
// its own) and returns its stdout; a non-zero exit is an error carrying
// stderr.
func execOut(ctx context.Context, c *client.Client, vm string, argv ...string) (string, error) {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, time.Minute)
		defer cancel()
	}
	var out, errb bytes.Buffer
	st, err := c.Exec(ctx, vm, client.ExecRequest{Argv: argv}, client.ExecIO{Stdout: &out, Stderr: &errb})
	if err != nil {
		return "", fmt.Errorf("exec %v in %s: %w", argv, vm, err)
	}
	if st.Code != 0 {
		return out.String(), &exitError{code: st.Code, stderr: strings.TrimSpace(errb.String()), vm: vm, argv: argv}
	}
	return out.String(), nil
}

// exitError is a command that ran in the guest and failed: unlike a
// transport error, it is an answer from the VM.
type exitError struct {
	code   int
	stderr string
	vm     string
	argv   []string
}

func (e *exitError) Error() string {
	return fmt.Sprintf("exec %v in %s: exit %d: %s", e.argv, e.vm, e.code, e.stderr)
}
