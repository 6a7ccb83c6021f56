//go:build !e2e

package client_test

// startExampleServer does not start a server without the e2e build tag.
func startExampleServer() (stop func(), skip string, err error) {
	return func() {}, "built without the e2e tag", nil
}
