package config

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"time"
)

const (
	// RFC 4271: a hold time is 0 or at least 3 seconds, on 16 bits.
	minBGPHoldTime = 3 * time.Second
	maxBGPHoldTime = 65535 * time.Second
	// The restart time of RFC 4724 is a 12-bit count of seconds.
	maxBGPRestartTime = 4095 * time.Second
	// TCP_MD5SIG_MAXKEYLEN.
	maxBGPPasswordLen = 80
)

func (c *Config) validateBGP(v *collector) {
	b := c.BGP
	if b == nil {
		return
	}
	const p = "bgp"
	if b.ASN == 0 {
		v.add(p+".asn", "required: this node's AS number (1..4294967295)")
	}
	if b.RouterID != "" {
		if a, err := netip.ParseAddr(b.RouterID); err != nil || !a.Is4() || a.IsUnspecified() {
			v.add(p+".router_id", "must be an IPv4 address, got %q", b.RouterID)
		}
	}
	checkNextHop(v, p+".next_hop", b.NextHop, true)
	checkNextHop(v, p+".next_hop_v6", b.NextHopV6, false)
	if len(b.Peers) == 0 {
		v.add(p+".peers", "at least one peer is required (remove the bgp section to announce nothing)")
	}
	seen := map[string]int{}
	for i, peer := range b.Peers {
		pp := fmt.Sprintf("%s.peers[%d]", p, i)
		if _, msg := checkUnicastIP(peer.Address); msg != "" {
			v.add(pp+".address", "%s", msg)
		} else if j, dup := seen[peer.Address]; dup {
			v.add(pp+".address", "duplicate peer %s (also peers[%d])", peer.Address, j)
		} else {
			seen[peer.Address] = i
		}
		if peer.ASN == 0 {
			v.add(pp+".asn", "required: the peer's AS number (1..4294967295)")
		}
		if peer.Port < 0 || peer.Port > 65535 {
			v.add(pp+".port", "must be between 1 and 65535 (or omitted for 179), got %d", peer.Port)
		}
		hold, keep := peer.HoldTime.Std(), peer.Keepalive.Std()
		switch {
		case hold < minBGPHoldTime || hold > maxBGPHoldTime || hold%time.Second != 0:
			v.add(pp+".hold_time", "must be whole seconds between %s and %s, got %s", minBGPHoldTime, maxBGPHoldTime, peer.HoldTime)
		case keep < time.Second || keep%time.Second != 0 || keep > hold/3:
			v.add(pp+".keepalive", "must be whole seconds, at least 1s and at most a third of hold_time (%s), got %s",
				peer.HoldTime, peer.Keepalive)
		}
		if len(peer.Password) > maxBGPPasswordLen {
			v.add(pp+".password", "must be at most %d bytes (the TCP MD5 key limit), got %d", maxBGPPasswordLen, len(peer.Password))
		}
		if peer.Multihop < 0 || peer.Multihop > 255 {
			v.add(pp+".multihop", "must be a TTL between 1 and 255 (or 0 for a directly connected peer), got %d", peer.Multihop)
		}
	}
	checkCommunities(v, p+".communities", b.Communities)
	vipAddrs := map[string]bool{}
	for _, vip := range c.VIPs {
		vipAddrs[vip.Address] = true
	}
	seen = map[string]int{}
	for i, o := range b.VIPs {
		op := fmt.Sprintf("%s.vips[%d]", p, i)
		switch j, dup := seen[o.Address]; {
		case !vipAddrs[o.Address]:
			v.add(op+".address", "%q is not the address of any entry of vips", o.Address)
		case dup:
			v.add(op+".address", "duplicate address %s (also bgp.vips[%d])", o.Address, j)
		default:
			seen[o.Address] = i
		}
		checkCommunities(v, op+".communities", o.Communities)
	}
	gr := b.GracefulRestart
	if gr.Enabled && (gr.RestartTime.Std() < time.Second || gr.RestartTime.Std() > maxBGPRestartTime || gr.RestartTime.Std()%time.Second != 0) {
		v.add(p+".graceful_restart.restart_time", "must be whole seconds between 1s and %s, got %s", maxBGPRestartTime, gr.RestartTime)
	}
}

func checkNextHop(v *collector, path, s string, want4 bool) {
	if s == "" {
		return
	}
	a, msg := checkUnicastIP(s)
	switch {
	case msg != "":
		v.add(path, "%s", msg)
	case want4 && !a.Is4():
		v.add(path, "must be an IPv4 address, got %q", s)
	case !want4 && !a.Is6():
		v.add(path, "must be an IPv6 address, got %q", s)
	}
}

func checkCommunities(v *collector, path string, communities []string) {
	for i, s := range communities {
		if _, err := ParseCommunity(s); err != nil {
			v.add(fmt.Sprintf("%s[%d]", path, i), "%v", err)
		}
	}
}

// ParseCommunity parses an RFC 1997 community written "asn:value", each
// part 0..65535, into its 32-bit form.
func ParseCommunity(s string) (uint32, error) {
	hi, lo, ok := strings.Cut(s, ":")
	a, errA := strconv.ParseUint(hi, 10, 16)
	b, errB := strconv.ParseUint(lo, 10, 16)
	if !ok || errA != nil || errB != nil {
		return 0, fmt.Errorf("invalid community %q (want \"asn:value\", each 0..65535, e.g. \"65000:100\")", s)
	}
	return uint32(a)<<16 | uint32(b), nil
}
