package network

import (
	"fmt"
	"regexp"
	"sort"
	"strings"

	"github.com/vishvananda/netlink"
)

// The original Rust noid (noid-cli 0.2) ran a helper, noid-netd, that gave
// every VM a TAP named noid<N> with a /30 of 172.16.0.0/16 on it, and added
// iptables rules (NAT of 172.16.0.0/16, FORWARD for "noid+", an MSS clamp).
// At its own start it deleted every interface whose name starts with
// "noid", which would take this noid's bridge and TAPs with it. This noid
// never changes those leftovers: it finds them, says what they are and how
// to remove them.

// legacyTapName matches the TAP names of the original noid-netd.
var legacyTapName = regexp.MustCompile(`^noid[0-9]+$`)

// LegacyTaps lists the TUN/TAP devices of the caller's network namespace
// that the original noid's noid-netd left: named noid<N>. noid's own bridge
// (a bridge, not a TAP, though named noid0 by default) is not one of them.
func LegacyTaps() ([]string, error) {
	links, err := netlink.LinkList()
	if err != nil {
		return nil, fmt.Errorf("listing network interfaces: %w", err)
	}
	var out []string
	for _, l := range links {
		if name := l.Attrs().Name; legacyTapName.MatchString(name) && l.Type() == "tuntap" {
			out = append(out, name)
		}
	}
	sort.Strings(out)
	return out, nil
}

// LegacyTapsRemoval is the shell command that deletes the given leftover
// TAPs of the original noid-netd.
func LegacyTapsRemoval(taps []string) string {
	cmds := make([]string, len(taps))
	for i, t := range taps {
		cmds[i] = "ip link delete " + t
	}
	return strings.Join(cmds, "; ")
}

// LegacyIptablesRemoval is the shell command that deletes the iptables
// rules the original noid-netd added (it named the host's default
// interface in them: replace DEV). noid itself uses nftables tables of
// its own and neither reads nor changes iptables rules.
const LegacyIptablesRemoval = `iptables -t nat -D POSTROUTING -s 172.16.0.0/16 -o DEV -j MASQUERADE; ` +
	`iptables -D FORWARD -i noid+ -o DEV -j ACCEPT; ` +
	`iptables -D FORWARD -i DEV -o noid+ -m state --state RELATED,ESTABLISHED -j ACCEPT; ` +
	`iptables -t mangle -D FORWARD -p tcp --tcp-flags SYN,RST SYN -j TCPMSS --clamp-mss-to-pmtu`

// LegacyHint explains leftovers of the original noid-netd for an error
// or a report: what they are and the commands that remove them.
func LegacyHint(taps []string) string {
	return fmt.Sprintf("the original noid's noid-netd left TAPs %s (they hold routes in 172.16.0.0/16 and the name noid0): "+
		"stop it for good (`systemctl disable --now noid-netd`: at its start it deletes every interface named noid*, this noid's too), "+
		"then remove them with `%s`, and its iptables rules with `%s` (DEV: the host's default interface)",
		strings.Join(taps, ", "), LegacyTapsRemoval(taps), LegacyIptablesRemoval)
}
