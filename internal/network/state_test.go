package network

import (
	"encoding/hex"
	"fmt"
	"net"
	"reflect"
	"sort"
	"strings"
	"testing"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

func nftConn(t testing.TB, ns netns.NsHandle) *nftables.Conn {
	t.Helper()
	c, err := nftables.New(nftables.WithNetNSFd(int(ns)))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// fmtExpr renders an expression with its fields (pointers followed).
func fmtExpr(e expr.Any) string {
	v := reflect.ValueOf(e)
	for v.Kind() == reflect.Pointer {
		v = v.Elem()
	}
	var b strings.Builder
	b.WriteString(v.Type().Name())
	b.WriteString("{")
	for i := 0; i < v.NumField(); i++ {
		f := v.Field(i)
		if !v.Type().Field(i).IsExported() || f.IsZero() {
			continue
		}
		for f.Kind() == reflect.Pointer {
			f = f.Elem()
		}
		if f.Kind() == reflect.Slice && f.Type().Elem().Kind() == reflect.Uint8 {
			fmt.Fprintf(&b, "%s:%x ", v.Type().Field(i).Name, f.Bytes())
		} else {
			fmt.Fprintf(&b, "%s:%v ", v.Type().Field(i).Name, f.Interface())
		}
	}
	b.WriteString("}")
	return b.String()
}

// nftState lists every table of the namespace and, for tables in only,
// their sets (with elements), chains and rules, as stable text.
type nftState struct {
	Tables []string            // "family name" of every table in the namespace
	Sets   map[string][]string // "family table set" → sorted elements
	Chains map[string]string   // "family table chain" → hook/prio/type/policy
	Rules  map[string][]string // "family table chain" → rules in order
}

func familyName(f nftables.TableFamily) string {
	switch f {
	case nftables.TableFamilyINet:
		return "inet"
	case nftables.TableFamilyBridge:
		return "bridge"
	case nftables.TableFamilyIPv4:
		return "ip"
	case nftables.TableFamilyIPv6:
		return "ip6"
	}
	return fmt.Sprint(f)
}

func dumpNFT(t testing.TB, ns netns.NsHandle) nftState {
	t.Helper()
	c := nftConn(t, ns)
	st := nftState{Sets: map[string][]string{}, Chains: map[string]string{}, Rules: map[string][]string{}}
	tables, err := c.ListTables()
	if err != nil {
		t.Fatal(err)
	}
	for _, tb := range tables {
		st.Tables = append(st.Tables, familyName(tb.Family)+" "+tb.Name)
		sets, err := c.GetSets(tb)
		if err != nil {
			t.Fatal(err)
		}
		for _, s := range sets {
			els, err := c.GetSetElements(s)
			if err != nil {
				t.Fatal(err)
			}
			key := fmt.Sprintf("%s %s %s", familyName(tb.Family), tb.Name, s.Name)
			var out []string
			for _, e := range els {
				out = append(out, hex.EncodeToString(e.Key)+"="+hex.EncodeToString(e.Val))
			}
			sort.Strings(out)
			st.Sets[key] = out
		}
	}
	sort.Strings(st.Tables)
	chains, err := c.ListChains()
	if err != nil {
		t.Fatal(err)
	}
	for _, ch := range chains {
		key := fmt.Sprintf("%s %s %s", familyName(ch.Table.Family), ch.Table.Name, ch.Name)
		desc := string(ch.Type)
		if ch.Hooknum != nil {
			desc += fmt.Sprintf(" hook %d", *ch.Hooknum)
		}
		if ch.Priority != nil {
			desc += fmt.Sprintf(" prio %d", *ch.Priority)
		}
		if ch.Policy != nil {
			desc += fmt.Sprintf(" policy %d", *ch.Policy)
		}
		st.Chains[key] = desc
		rules, err := c.GetRules(ch.Table, ch)
		if err != nil {
			t.Fatal(err)
		}
		var rs []string
		for _, r := range rules {
			var parts []string
			for _, e := range r.Exprs {
				parts = append(parts, fmtExpr(e))
			}
			rs = append(rs, strings.Join(parts, " "))
		}
		st.Rules[key] = rs
	}
	return st
}

func (s nftState) has(table string) bool {
	for _, t := range s.Tables {
		if t == table {
			return true
		}
	}
	return false
}

// ours returns the number of set elements in noid's tables.
func (s nftState) noidElements() int {
	n := 0
	for k, v := range s.Sets {
		if strings.Contains(k, " "+TableName+" ") {
			n += len(v)
		}
	}
	return n
}

// elementsMentioning counts noid set elements whose key contains b.
func (s nftState) elementsMentioning(b []byte) int {
	h := hex.EncodeToString(b)
	n := 0
	for k, v := range s.Sets {
		if !strings.Contains(k, " "+TableName+" ") {
			continue
		}
		for _, e := range v {
			if strings.Contains(strings.SplitN(e, "=", 2)[0], h) {
				n++
			}
		}
	}
	return n
}

// linkState describes the links of a namespace as stable text.
func linkState(t testing.TB, h *netlink.Handle) map[string]string {
	t.Helper()
	links, err := h.LinkList()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for _, l := range links {
		a := l.Attrs()
		addrs, err := h.AddrList(l, netlink.FAMILY_V4)
		if err != nil {
			t.Fatal(err)
		}
		var as []string
		for _, ad := range addrs {
			as = append(as, ad.IPNet.String())
		}
		sort.Strings(as)
		out[a.Name] = fmt.Sprintf("%s mac=%s up=%v master=%d addrs=%v", l.Type(), a.HardwareAddr, a.Flags&net.FlagUp != 0, a.MasterIndex, as)
	}
	return out
}
