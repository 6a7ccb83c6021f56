package network

import (
	"context"
	"fmt"
	"sync"
	"testing"
)

// TestParallelAddAndRemove: AddVMs and RemoveVMs of different VMs running
// at once end with exactly the added VMs' TAPs and set elements, and a
// removed VM can be added again.
func TestParallelAddAndRemove(t *testing.T) {
	ns, h, m := setupHost(t, testConfig())
	ctx := context.Background()
	cfg := m.Config()
	for i := 0; i < 10; i++ {
		if err := m.AddVM(ctx, vmNet(t, cfg, fmt.Sprintf("old%d", i), "alice", i, i%2 == 0)); err != nil {
			t.Fatal(err)
		}
	}
	var wg sync.WaitGroup
	errs := make(chan error, 20)
	for i := 0; i < 10; i++ {
		wg.Add(2)
		go func() { defer wg.Done(); errs <- m.RemoveVM(ctx, fmt.Sprintf("old%d", i)) }()
		go func() {
			defer wg.Done()
			errs <- m.AddVM(ctx, vmNet(t, cfg, fmt.Sprintf("new%d", i), "alice", 10+i, i%2 == 0))
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	for i := 0; i < 10; i++ {
		linkGone(t, h, TapName(fmt.Sprintf("old%d", i)))
		if _, err := h.LinkByName(TapName(fmt.Sprintf("new%d", i))); err != nil {
			t.Errorf("new%d: %v", i, err)
		}
	}
	st := dumpNFT(t, ns)
	if n := st.noidElements(); n != 10*2+5*4 {
		t.Errorf("%d set elements, want %d", n, 10*2+5*4)
	}
	for i := 0; i < 10; i++ {
		if n := st.elementsMentioning(keyIfname(TapName(fmt.Sprintf("old%d", i)))); n != 0 {
			t.Errorf("old%d: %d elements left", i, n)
		}
	}
	v := vmNet(t, cfg, "old0", "alice", 0, false)
	if err := m.AddVM(ctx, v); err != nil {
		t.Errorf("re-adding a removed VM: %v", err)
	}
}
