package manager

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/noid-vm/noid/internal/config"
	"github.com/noid-vm/noid/internal/errdefs"
	"github.com/noid-vm/noid/internal/image"
)

// syncTree fsyncs every file in dir and then dir itself.
func syncTree(dir string) error {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	for _, e := range ents {
		if !e.Type().IsRegular() {
			continue
		}
		f, err := os.Open(filepath.Join(dir, e.Name()))
		if err != nil {
			return err
		}
		err = f.Sync()
		f.Close()
		if err != nil {
			return fmt.Errorf("syncing %s: %w", e.Name(), err)
		}
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// loadImage finds the built guest image selected by the config.
func loadImage(cfg *config.Config) (*image.Image, error) {
	switch cfg.Image {
	case "tiny":
		return image.Load(cfg.DataDir, true)
	case "debian":
		return image.Load(cfg.DataDir, false)
	}
	if img, err := image.Load(cfg.DataDir, false); err == nil {
		return img, nil
	}
	img, err := image.Load(cfg.DataDir, true)
	if err != nil {
		return nil, errdefs.WithHint(fmt.Errorf("%w: no guest image is built in %s", errdefs.ErrUnavailable, cfg.DataDir),
			"run `noid-server image build` (or `noid-server image build --tiny`)")
	}
	return img, nil
}

// tempDir is a directory being filled under a temporary name, removed
// unless kept (renamed into place).
type tempDir struct {
	path string
	kept bool
}

// newTempDir makes a private directory .tmp-<id> in parent, creating
// parent if needed; what names it in errors.
func newTempDir(parent, what string) (*tempDir, error) {
	if err := os.MkdirAll(parent, 0o700); err != nil {
		return nil, classifyIOErr("creating "+what, err)
	}
	t := &tempDir{path: filepath.Join(parent, ".tmp-"+newID(4))}
	if err := os.Mkdir(t.path, 0o700); err != nil {
		return nil, classifyIOErr("creating "+what, err)
	}
	return t, nil
}

// keep marks the directory as moved into place: cleanup leaves it.
func (t *tempDir) keep() { t.kept = true }

// cleanup removes the directory unless it was kept.
func (t *tempDir) cleanup() {
	if !t.kept {
		os.RemoveAll(t.path)
	}
}
