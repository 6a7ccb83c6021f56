// Package proto implements the wire protocol between noid-server and the
// guest agent: framing, the sync marker used to resynchronise after a host
// reconnect or a snapshot restore, and the JSON message types.
//
// The protocol is described in docs/agent-protocol.md.
package proto
