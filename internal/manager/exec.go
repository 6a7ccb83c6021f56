package manager

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/noid-vm/noid/internal/agent/client"
	"github.com/noid-vm/noid/internal/agent/proto"
	"github.com/noid-vm/noid/internal/api"
	"github.com/noid-vm/noid/internal/errdefs"
	"github.com/noid-vm/noid/internal/store"
	"github.com/noid-vm/noid/internal/vmm"
)

// agentFor resolves the user's VM (see Owner) to a connected agent, failing
// fast when the VM is not running.
func (m *Manager) agentFor(ctx context.Context, u *store.User, name string) (*store.VM, *client.Client, error) {
	owner, bare, err := m.Owner(ctx, u, name)
	if err != nil {
		return nil, nil, err
	}
	v, err := m.store.GetVM(ctx, owner.ID, bare)
	if err != nil {
		return nil, nil, err
	}
	switch v.State {
	case store.StateRunning, store.StateCreating:
	default:
		return nil, nil, errdefs.WithHint(fmt.Errorf("vm %q is %s: %w", name, v.State, errdefs.ErrNotRunning), "noid info "+name)
	}
	rt := m.lookupRT(v.ID)
	if rt == nil { // destroyed since it was read
		return nil, nil, errdefs.WithHint(fmt.Errorf("vm %q: %w", name, errdefs.ErrNotFound), "noid list")
	}
	inst, err := rt.instance()
	if err != nil {
		return nil, nil, fmt.Errorf("vm %q: %w", name, err)
	}
	if err := waitingForSpace(inst, name); err != nil {
		return nil, nil, err
	}
	actx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	c, err := rt.agentClient(actx, v)
	if err != nil {
		if errors.Is(err, errdefs.ErrNotRunning) {
			return nil, nil, fmt.Errorf("vm %q: %w", name, errdefs.ErrNotRunning)
		}
		return nil, nil, err
	}
	return v, c, nil
}

// waitingForSpace is the error for a VM whose guest is paused until the
// filesystem holding its disk has space again, nil otherwise.
func waitingForSpace(inst vmm.Instance, name string) error {
	if sw, ok := inst.(vmm.SpaceWaiter); !ok || !sw.WaitingForSpace() {
		return nil
	}
	return errdefs.WithHint(fmt.Errorf("%w: vm %q is paused: a write of its disk found the filesystem of the data dir full; it resumes by itself once space is freed",
		errdefs.ErrResourceExhausted, name), "free space on the host, or delete checkpoints (`noid checkpoint rm`) or VMs")
}

// Guest is a running VM's connected agent, ready to start processes.
type Guest struct {
	c    *client.Client
	inst vmm.Instance
	name string
	m    *metrics
	// defaultUser is the guest user of requests that name none
	// ([exec] default_user); empty means root.
	defaultUser string
}

// Guest connects to the agent of the user's running VM name. It fails
// fast, with ErrNotFound or ErrNotRunning, before any process is asked
// for, so a caller can report that before it commits to a stream.
func (m *Manager) Guest(ctx context.Context, u *store.User, name string) (*Guest, error) {
	v, c, err := m.agentFor(ctx, u, name)
	if err != nil {
		return nil, err
	}
	g := &Guest{c: c, name: name, m: m.metrics, defaultUser: m.cfg.Exec.DefaultUser}
	if rt := m.lookupRT(v.ID); rt != nil {
		g.inst, _ = rt.instance()
	}
	return g, nil
}

// ExitMessage is the package's ExitMessage for a process of this guest:
// a process lost because the guest was paused for lack of disk space says
// so.
func (g *Guest) ExitMessage(ex proto.Exit, err error) (api.StreamMsg, error) {
	msg, err := ExitMessage(ex, err)
	if errors.Is(err, errdefs.ErrUnavailable) && g.inst != nil {
		if serr := waitingForSpace(g.inst, g.name); serr != nil {
			return msg, serr
		}
	}
	return msg, err
}

// Exec checks req and starts its command in the guest; with console, an
// empty command opens a login shell on a terminal (noid console) and the
// process always gets a terminal and stdin.
func (g *Guest) Exec(ctx context.Context, req api.ExecRequest, console bool) (*client.Process, error) {
	if req.User == "" {
		req.User = g.defaultUser
	}
	preq, err := execParams(req, console)
	if err != nil {
		return nil, err
	}
	var proc *client.Process
	start := time.Now()
	if console && len(preq.Argv) == 0 {
		proc, err = g.c.Console(ctx, preq)
	} else {
		proc, err = g.c.Exec(ctx, preq)
	}
	if errors.Is(err, client.ErrUnsupported) {
		return nil, errdefs.WithHint(fmt.Errorf("%w: %v", errdefs.ErrNotImplemented, err),
			"the VM runs an agent from before noid exec --user (booted or restored from an older image); a VM created from the current image has it")
	}
	if err != nil {
		return nil, fmt.Errorf("%w: starting process: %v", errdefs.ErrUnavailable, err)
	}
	g.m.agentCall("exec", start)
	return proc, nil
}

// execParams checks an exec or console request and turns it into the
// agent's request.
func execParams(req api.ExecRequest, console bool) (proto.ExecRequest, error) {
	if console {
		req.TTY = true
		req.Stdin = true
	}
	if len(req.Argv) == 0 && !console {
		return proto.ExecRequest{}, errdefs.WithHint(fmt.Errorf("%w: no command given", errdefs.ErrInvalidArgument), "noid exec <vm> -- <command> [args...]")
	}
	if req.TimeoutMs < 0 {
		return proto.ExecRequest{}, fmt.Errorf("%w: timeout must not be negative", errdefs.ErrInvalidArgument)
	}
	env := make([]string, 0, len(req.Env))
	for k, v := range req.Env {
		if k == "" || strings.ContainsAny(k, "=\x00") || strings.ContainsRune(v, 0) {
			return proto.ExecRequest{}, fmt.Errorf("%w: invalid environment variable name %q", errdefs.ErrInvalidArgument, k)
		}
		env = append(env, k+"="+v)
	}
	sort.Strings(env)
	if req.Rows < 0 || req.Rows > 65535 || req.Cols < 0 || req.Cols > 65535 {
		return proto.ExecRequest{}, fmt.Errorf("%w: terminal size out of range", errdefs.ErrInvalidArgument)
	}
	if req.User != "" {
		if err := api.ValidateGuestUser(req.User); err != nil {
			return proto.ExecRequest{}, err
		}
	}
	return proto.ExecRequest{
		Argv: req.Argv, Env: env, Cwd: req.Cwd, TTY: req.TTY, Rows: uint16(req.Rows), Cols: uint16(req.Cols),
		TimeoutMS: req.TimeoutMs, Stdin: req.Stdin, User: req.User,
	}, nil
}

// ExitMessage turns what a process's Wait returned into the last message
// of its exec stream. A process that ran gives an exit with its status. A
// command that could not be run because it does not exist or cannot be
// executed also gives an exit, with the codes a shell uses (127 and 126),
// a reason and a one-line message: that is the command's failure, not
// noid's. Any other failure is an error: an unknown user or a bad working
// directory (ErrInvalidArgument), another start failure (ErrInternal), a
// lost agent connection (ErrUnavailable).
func ExitMessage(ex proto.Exit, err error) (api.StreamMsg, error) {
	if err == nil {
		return api.StreamMsg{Type: api.MsgExit, Code: ex.Code, ExitSig: ex.Signal, TimedOut: ex.TimedOut}, nil
	}
	var se *client.StartError
	if !errors.As(err, &se) {
		return api.StreamMsg{}, fmt.Errorf("%w: lost the process: %v", errdefs.ErrUnavailable, err)
	}
	switch se.Reason {
	case proto.ReasonNotFound:
		return api.StreamMsg{Type: api.MsgExit, Code: 127, Reason: api.ExitNotFound, Message: se.Message}, nil
	case proto.ReasonNotExecutable:
		return api.StreamMsg{Type: api.MsgExit, Code: 126, Reason: api.ExitNotExecutable, Message: se.Message}, nil
	case proto.ReasonUnknownUser:
		return api.StreamMsg{}, errdefs.WithHint(fmt.Errorf("%w: %s", errdefs.ErrInvalidArgument, se.Message),
			"the guest's users are in its /etc/passwd (noid exec <vm> -- cat /etc/passwd); the images have root and noid")
	case proto.ReasonBadCwd:
		return api.StreamMsg{}, fmt.Errorf("%w: %s", errdefs.ErrInvalidArgument, se.Message)
	}
	return api.StreamMsg{}, fmt.Errorf("%w: the guest could not start the process: %s", errdefs.ErrInternal, se.Message)
}
