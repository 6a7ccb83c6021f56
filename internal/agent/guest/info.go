package guest

import (
	"golang.org/x/sys/unix"

	"github.com/noid-vm/noid/internal/agent/proto"
)

// info collects the reply of an info stream.
func (s *session) info() proto.Info {
	a := s.a
	in := proto.Info{
		AgentVersion:    Version,
		ProtocolVersion: proto.Version,
		BootID:          bootID(),
		Init:            a.cfg.Init,
		RootSwitched:    a.cfg.RootSwitched,
		Sessions:        a.sessions.Load(),
	}
	var u unix.Utsname
	if unix.Uname(&u) == nil {
		in.Kernel = unix.ByteSliceToString(u.Release[:])
		in.Hostname = unix.ByteSliceToString(u.Nodename[:])
	}
	var ts unix.Timespec
	if unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts) == nil {
		in.UptimeNS = ts.Nano()
	}
	return in
}
