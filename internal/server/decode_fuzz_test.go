package server

import (
	"testing"

	"github.com/noid-vm/noid/internal/api"
)

// The request bodies' decode and validation path is fuzzed in package
// manager (through api.Decode, which decodeJSON calls). Here: the
// messages a client sends during an exec stream.

// FuzzStreamMsg: the text messages a client sends during an exec, through
// clientMsg.
func FuzzStreamMsg(f *testing.F) {
	for _, s := range []string{`{"type":"stdin_eof"}`, `{"type":"signal","signal":2}`, `{"type":"signal","signal":65}`, `{"type":"signal","signal":-9}`,
		`{"type":"resize","rows":24,"cols":80}`, `{"type":"resize","rows":0,"cols":80}`, `{"type":"resize","rows":99999,"cols":1}`, `{"type":"exit","code":1}`, `x`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		m, ok := clientMsg(data)
		if !ok {
			return
		}
		switch m.Type {
		case api.MsgStdinEOF:
		case api.MsgSignal:
			if m.Signal < 1 || m.Signal > 64 {
				t.Fatalf("accepted signal %d", m.Signal)
			}
		case api.MsgResize:
			if m.Rows < 1 || m.Cols < 1 || m.Rows > 9999 || m.Cols > 9999 {
				t.Fatalf("accepted size %dx%d", m.Rows, m.Cols)
			}
		default:
			t.Fatalf("accepted type %q", m.Type)
		}
	})
}
