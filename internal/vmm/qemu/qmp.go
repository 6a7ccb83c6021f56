package qemu

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"sync"
	"syscall"
	"time"
)

// QMP is a minimal client for the QEMU Machine Protocol on a unix socket. It
// runs commands concurrently (matched by id) and delivers asynchronous events
// to waiters. It is safe for concurrent use.
type QMP struct {
	conn net.Conn

	wmu sync.Mutex // serialises writes

	mu      sync.Mutex
	nextID  uint64
	pending map[string]chan qmpResponse
	waiters []*eventWaiter
	// onEvent, when set, sees every event (after the waiters); it runs on
	// the read loop and must not block nor call Execute.
	onEvent func(Event)
	err     error
	done    chan struct{}
}

// QMPError is an error returned by QEMU for a command.
type QMPError struct {
	Class string `json:"class"`
	Desc  string `json:"desc"`
}

func (e *QMPError) Error() string { return fmt.Sprintf("qmp: %s: %s", e.Class, e.Desc) }

// Event is an asynchronous QMP event.
type Event struct {
	Name string          `json:"event"`
	Data json.RawMessage `json:"data"`
}

type qmpResponse struct {
	Return json.RawMessage `json:"return"`
	Error  *QMPError       `json:"error"`
}

type eventWaiter struct {
	match func(Event) bool
	ch    chan Event
}

// DialQMP connects to the QMP socket at path and negotiates capabilities.
func DialQMP(ctx context.Context, path string) (*QMP, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, fmt.Errorf("connecting to qmp %s: %w", path, err)
	}
	q := &QMP{conn: conn, pending: map[string]chan qmpResponse{}, done: make(chan struct{})}
	br := bufio.NewReaderSize(conn, 64<<10)
	// Greeting.
	if dl, ok := ctx.Deadline(); ok {
		conn.SetReadDeadline(dl)
	}
	line, err := br.ReadBytes('\n')
	conn.SetReadDeadline(time.Time{})
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("reading qmp greeting from %s: %w", path, err)
	}
	var greet struct {
		QMP json.RawMessage `json:"QMP"`
	}
	if json.Unmarshal(line, &greet) != nil || greet.QMP == nil {
		conn.Close()
		return nil, fmt.Errorf("unexpected qmp greeting from %s: %.100q", path, line)
	}
	go q.readLoop(br)
	if err := q.Execute(ctx, "qmp_capabilities", nil, nil); err != nil {
		q.Close()
		return nil, fmt.Errorf("negotiating qmp capabilities: %w", err)
	}
	return q, nil
}

func (q *QMP) readLoop(br *bufio.Reader) {
	var err error
	for {
		var line []byte
		line, err = br.ReadBytes('\n')
		if err != nil {
			break
		}
		var msg struct {
			ID     string          `json:"id"`
			Event  string          `json:"event"`
			Data   json.RawMessage `json:"data"`
			Return json.RawMessage `json:"return"`
			Error  *QMPError       `json:"error"`
		}
		if json.Unmarshal(line, &msg) != nil {
			continue
		}
		if msg.Event != "" {
			q.dispatchEvent(Event{Name: msg.Event, Data: msg.Data})
			continue
		}
		q.mu.Lock()
		ch := q.pending[msg.ID]
		delete(q.pending, msg.ID)
		q.mu.Unlock()
		if ch != nil {
			ch <- qmpResponse{Return: msg.Return, Error: msg.Error}
		}
	}
	q.mu.Lock()
	if q.err == nil {
		q.err = fmt.Errorf("qmp connection closed: %w", err)
	}
	for id, ch := range q.pending {
		close(ch)
		delete(q.pending, id)
	}
	q.mu.Unlock()
	close(q.done)
}

func (q *QMP) dispatchEvent(ev Event) {
	q.mu.Lock()
	defer q.mu.Unlock()
	kept := q.waiters[:0]
	for _, w := range q.waiters {
		if w.match(ev) {
			w.ch <- ev
			continue
		}
		kept = append(kept, w)
	}
	q.waiters = kept
	if q.onEvent != nil {
		q.onEvent(ev)
	}
}

// OnEvent makes f see every later event. f runs on the connection's read
// loop: it must return promptly and must not call Execute.
func (q *QMP) OnEvent(f func(Event)) {
	q.mu.Lock()
	q.onEvent = f
	q.mu.Unlock()
}

// Execute runs a QMP command. args is marshalled as "arguments" when non-nil,
// and the "return" value is unmarshalled into result when non-nil.
func (q *QMP) Execute(ctx context.Context, cmd string, args any, result any) error {
	return q.execute(ctx, cmd, args, nil, result)
}

// execute runs a QMP command, passing f along with it (SCM_RIGHTS) when
// it is not nil.
func (q *QMP) execute(ctx context.Context, cmd string, args any, f *os.File, result any) error {
	q.mu.Lock()
	if q.err != nil {
		err := q.err
		q.mu.Unlock()
		return err
	}
	q.nextID++
	id := strconv.FormatUint(q.nextID, 10)
	ch := make(chan qmpResponse, 1)
	q.pending[id] = ch
	q.mu.Unlock()

	req := map[string]any{"execute": cmd, "id": id}
	if args != nil {
		req["arguments"] = args
	}
	b, err := json.Marshal(req)
	if err != nil {
		return err
	}
	b = append(b, '\n')
	q.wmu.Lock()
	if dl, ok := ctx.Deadline(); ok {
		q.conn.SetWriteDeadline(dl)
	}
	if f != nil {
		uc, ok := q.conn.(*net.UnixConn)
		if !ok {
			err = errors.New("not a unix connection, so no file can be passed")
		} else {
			_, _, err = uc.WriteMsgUnix(b, syscall.UnixRights(int(f.Fd())), nil)
		}
	} else {
		_, err = q.conn.Write(b)
	}
	q.conn.SetWriteDeadline(time.Time{})
	q.wmu.Unlock()
	if err != nil {
		q.forget(id)
		return fmt.Errorf("qmp %s: %w", cmd, err)
	}
	select {
	case resp, ok := <-ch:
		if !ok {
			q.mu.Lock()
			err := q.err
			q.mu.Unlock()
			return fmt.Errorf("qmp %s: %w", cmd, err)
		}
		if resp.Error != nil {
			return fmt.Errorf("qmp %s: %w", cmd, resp.Error)
		}
		if result != nil && len(resp.Return) > 0 {
			if err := json.Unmarshal(resp.Return, result); err != nil {
				return fmt.Errorf("qmp %s: decoding reply: %w", cmd, err)
			}
		}
		return nil
	case <-ctx.Done():
		q.forget(id)
		return fmt.Errorf("qmp %s: %w", cmd, ctx.Err())
	}
}

func (q *QMP) forget(id string) {
	q.mu.Lock()
	delete(q.pending, id)
	q.mu.Unlock()
}

// WaitEvent registers interest in an event before an action that triggers it;
// the returned function blocks until a matching event arrives or ctx ends.
func (q *QMP) WaitEvent(match func(Event) bool) func(ctx context.Context) (Event, error) {
	w := &eventWaiter{match: match, ch: make(chan Event, 1)}
	q.mu.Lock()
	q.waiters = append(q.waiters, w)
	q.mu.Unlock()
	return func(ctx context.Context) (Event, error) {
		select {
		case ev := <-w.ch:
			return ev, nil
		case <-q.done:
			return Event{}, errors.New("qmp connection closed while waiting for event")
		case <-ctx.Done():
			return Event{}, ctx.Err()
		}
	}
}

// SendFD passes a file descriptor to QEMU under name (getfd), for use by
// commands such as migrate "fd:name".
func (q *QMP) SendFD(ctx context.Context, name string, f *os.File) error {
	return q.execute(ctx, "getfd", map[string]string{"fdname": name}, f, nil)
}

// AddFD passes a file descriptor to QEMU into the fd set set (-1: a new
// one) and returns the set's id. QEMU's block layer opens "/dev/fdset/ID"
// by duplicating an fd of the set whose access mode fits, so a QEMU that
// cannot open the file by name (a sandboxed one) can still use it; a set
// holds a read-write and a read-only fd of an image that QEMU may reopen
// read-only later.
func (q *QMP) AddFD(ctx context.Context, f *os.File, set int, opaque string) (int, error) {
	args := map[string]any{"opaque": opaque}
	if set >= 0 {
		args["fdset-id"] = set
	}
	var res struct {
		FDSetID int `json:"fdset-id"`
	}
	if err := q.execute(ctx, "add-fd", args, f, &res); err != nil {
		return 0, err
	}
	return res.FDSetID, nil
}

// Done is closed when the QMP connection has ended.
func (q *QMP) Done() <-chan struct{} { return q.done }

// Close closes the QMP connection; QEMU keeps running.
func (q *QMP) Close() error { return q.conn.Close() }
