package storage

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

// TestCopyInto copies into an existing sparse file that is mapped shared,
// as a warm spare's RAM file is by its waiting VMM, and checks that the
// mapping sees the new contents.
func TestCopyInto(t *testing.T) {
	dirs := map[string]string{"copy": t.TempDir(), "reflink": mountXFS(t, 512<<20)}
	for mode, dir := range dirs {
		t.Run(mode, func(t *testing.T) {
			src, dst := filepath.Join(dir, "src"), filepath.Join(dir, "dst")
			const size = 64 << 20
			f, _ := os.Create(src)
			f.Truncate(size)
			data := bytes.Repeat([]byte("noid"), 1<<18) // 1 MiB
			f.WriteAt(data, 8<<20)
			f.WriteAt(data, 40<<20)
			f.Close()
			g, _ := os.Create(dst)
			g.Truncate(size)
			m, err := syscall.Mmap(int(g.Fd()), 0, size, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_SHARED)
			if err != nil {
				t.Fatal(err)
			}
			defer syscall.Munmap(m)
			_ = m[9<<20] // fault a page in before the copy
			c := &Copier{}
			if err := c.CopyInto(context.Background(), src, dst); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(m[8<<20:9<<20], data) || !bytes.Equal(m[40<<20:41<<20], data) || m[0] != 0 || m[20<<20] != 0 {
				t.Fatal("the shared mapping does not see the copied contents")
			}
			if got := c.FlushFirst(); got != (mode == "reflink") {
				t.Errorf("FlushFirst = %v in %s mode", got, mode)
			}
			g.Close()
			// Sizes must match.
			os.WriteFile(filepath.Join(dir, "small"), []byte("x"), 0o600)
			if err := c.CopyInto(context.Background(), src, filepath.Join(dir, "small")); err == nil {
				t.Error("copy into a file of another size succeeded")
			}
		})
	}
}
