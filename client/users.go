package client

import (
	"context"
	"net/url"

	"github.com/noid-vm/noid/internal/api"
)

// User management types, re-exported like the other wire types.
type (
	// User is a user of the server as admins see it.
	User = api.User
	// Quota is a user's own limits; a nil field means the server's default.
	Quota = api.Quota
	// UserToken is a user with a token just issued to it.
	UserToken = api.UserToken
)

// ListUsers lists every user (admin only; others get ErrNotFound).
func (c *Client) ListUsers(ctx context.Context) ([]*User, error) {
	var us []*User
	return us, c.do(ctx, "GET", "/v1/users", nil, &us)
}

// CreateUser adds a token user and returns it with its token, which is
// shown only here (admin only).
func (c *Client) CreateUser(ctx context.Context, name string, admin bool) (*UserToken, error) {
	var ut UserToken
	return &ut, c.do(ctx, "POST", "/v1/users", api.CreateUserRequest{Name: name, Admin: admin}, &ut)
}

// AddLocalUser lets the local unix account unixUser use the server's unix
// socket (it joins the socket's group) and returns its user (admin only).
func (c *Client) AddLocalUser(ctx context.Context, unixUser string) (*User, error) {
	var u User
	return &u, c.do(ctx, "POST", "/v1/users/local", api.AddLocalUserRequest{UnixUser: unixUser}, &u)
}

// RotateToken replaces a user's token and returns the new one; the old one
// stops working at once (admin only).
func (c *Client) RotateToken(ctx context.Context, name string) (*UserToken, error) {
	var ut UserToken
	return &ut, c.do(ctx, "POST", "/v1/users/"+url.PathEscape(name)+"/token", nil, &ut)
}

// SetQuota replaces a user's own limits and returns the user (admin only).
func (c *Client) SetQuota(ctx context.Context, name string, q Quota) (*User, error) {
	var u User
	return &u, c.do(ctx, "PUT", "/v1/users/"+url.PathEscape(name)+"/quota", q, &u)
}
