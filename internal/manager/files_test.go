package manager

import (
	"errors"
	"strings"
	"testing"

	"github.com/noid-vm/noid/internal/errdefs"
)

// TestAgentFileErrRefusals: an entry the agent refuses (as it words it now,
// and as older agents did) is the request's fault, with the hint about
// staying inside the destination.
func TestAgentFileErrRefusals(t *testing.T) {
	for _, msg := range []string{
		`refusing entry "../x": ".." is not allowed`,
		`refusing entry "esc/pwned": it is below "esc", a symlink from the archive`,
		`entry "a/b": openat a/b: path escapes from parent`,
		`entry "../x": ".." is refused`,
		`entry "h": bad hard link target "../t"`,
	} {
		err := agentFileErr(errors.New("agent put /root/d: "+msg), "vm", "/root/d")
		if !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), `vm "vm" refused the upload into /root/d: `+msg) ||
			!strings.Contains(errdefs.HintOf(err), "inside the destination") {
			t.Errorf("%q → %v (hint %q)", msg, err, errdefs.HintOf(err))
		}
	}
	if err := agentFileErr(errors.New("agent put /root/d: entry \"f\": write f: no space left on device"), "vm", "/root/d"); !errors.Is(err, errdefs.ErrResourceExhausted) {
		t.Errorf("a full disk: %v", err)
	}
}
