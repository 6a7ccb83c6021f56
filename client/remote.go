package client

import (
	"context"
	"fmt"
	"net/url"

	"github.com/noid-vm/noid/internal/api"
)

type (
	// RemoteSnapshot describes a checkpoint or golden snapshot in the
	// server's remote object store.
	RemoteSnapshot = api.RemoteSnapshot
	// RemoteTransfer says what one push or pull moved.
	RemoteTransfer = api.RemoteTransfer
)

// PushCheckpoint uploads vm's checkpoint to the server's remote store
// under key (empty: "<vm>/<checkpoint>") in the caller's space, where
// every host sharing the store can clone it (CloneRemote).
func (c *Client) PushCheckpoint(ctx context.Context, vm, checkpoint, key string) (*RemoteSnapshot, error) {
	var out RemoteSnapshot
	return &out, c.do(ctx, "POST", vmPath(vm, "/checkpoints/"+url.PathEscape(checkpoint)+"/push", nil), api.RemotePushRequest{Key: key}, &out)
}

// CloneRemote starts a new VM named as from the checkpoint the caller
// pushed under key (from any host sharing the store). The VM's Pulled says
// what was fetched; a second clone of the same push fetches no data.
func (c *Client) CloneRemote(ctx context.Context, key, as string) (*VM, error) {
	if as == "" {
		return nil, fmt.Errorf("%w: clone needs a new VM name", ErrInvalidArgument)
	}
	var v VM
	return &v, c.do(ctx, "POST", "/v1/remote/clone", api.RemoteCloneRequest{Key: key, As: as}, &v)
}

// ListRemote lists the caller's pushed checkpoints and goldens and the
// system goldens in the remote store.
func (c *Client) ListRemote(ctx context.Context) ([]*RemoteSnapshot, error) {
	var out []*RemoteSnapshot
	return out, c.do(ctx, "GET", "/v1/remote", nil, &out)
}

// PushGolden uploads the caller's golden snapshot for a spec (zero values:
// the server's default spec); an admin's is published for every user.
func (c *Client) PushGolden(ctx context.Context, vcpus, memoryMiB int) (*RemoteSnapshot, error) {
	var out RemoteSnapshot
	return &out, c.do(ctx, "POST", "/v1/golden/push", api.GoldenRemoteRequest{VCPUs: vcpus, MemoryMiB: memoryMiB}, &out)
}

// PullGolden makes the remote golden snapshot for a spec (the caller's
// own, else the system one) the server's local one.
func (c *Client) PullGolden(ctx context.Context, vcpus, memoryMiB int) (*Golden, error) {
	var out Golden
	return &out, c.do(ctx, "POST", "/v1/golden/pull", api.GoldenRemoteRequest{VCPUs: vcpus, MemoryMiB: memoryMiB}, &out)
}
