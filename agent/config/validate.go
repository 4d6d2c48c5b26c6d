package config

import (
	"fmt"
	"math"
	"net"
	"net/netip"
	"net/url"
	"slices"
	"strconv"
	"strings"
)

const (
	minConntrackSize = 1024
	// The conntrack map's max_entries is a u32.
	maxConntrackSize = math.MaxUint32
	minRingSize      = 257
	maxRingSize      = 1048573 // largest prime below 2^20
	maxWeight        = 1000
	maxPoolNameLen   = 63
	// IFNAMSIZ is 16 including the terminating NUL.
	maxIfNameLen = 15
	// The XDP data path counts new-flow credit in nanoseconds: above one
	// flow per microsecond its rounding would show. A burst beyond a
	// million flows from one source is no limit.
	maxNewFlowRate  = 1_000_000
	maxNewFlowBurst = 1_000_000
	minNewFlowTable = 1024
	maxNewFlowTable = 1 << 24
	minNATTableSize = 1024
	maxNATTableSize = 1 << 24
)

// SNATAddressCapacity is how many distinct SNAT addresses the data plane
// recognises (VF_NAT_MAX_ADDRS of bpf/include/vf_types.h).
const SNATAddressCapacity = 64

// Validate checks the semantic rules of the configuration (ranges,
// references between sections, address families, uniqueness). It does not
// modify c. All problems are returned together as a *ValidationError.
func (c *Config) Validate() error {
	if errs := c.validate(); len(errs) > 0 {
		return &ValidationError{Errors: errs}
	}
	return nil
}

type collector struct{ errs []FieldError }

func (v *collector) add(path, format string, args ...any) {
	v.errs = append(v.errs, FieldError{Path: path, Message: fmt.Sprintf(format, args...)})
}

func (c *Config) validate() []FieldError {
	v := &collector{}
	c.validateNode(v)
	c.validateDataplane(v)
	c.validateListeners(v)
	c.validateProxy(v)
	pools := c.validatePools(v)
	c.validateVIPs(v, pools)
	c.validateCapacity(v)
	c.validateRoutes(v, pools)
	c.validateSecurity(v)
	c.validateBGP(v)
	c.validateDecap(v)
	return v.errs
}

func (c *Config) validateNode(v *collector) {
	name := c.Node.Name
	switch {
	case name == "":
		v.add("node.name", "required (the host name could not be determined)")
	case len(name) > 253:
		v.add("node.name", "must be at most 253 characters, got %d", len(name))
	case strings.ContainsFunc(name, isSpaceOrControl):
		v.add("node.name", "must not contain spaces or control characters, got %q", name)
	}
}

func (c *Config) validateDataplane(v *collector) {
	dp := &c.Dataplane
	const p = "dataplane"

	seen := make(map[string]int, len(dp.Interfaces))
	for i, name := range dp.Interfaces {
		ip := fmt.Sprintf("%s.interfaces[%d]", p, i)
		if msg := checkIfName(name); msg != "" {
			v.add(ip, "%s", msg)
			continue
		}
		if j, dup := seen[name]; dup {
			v.add(ip, "duplicate interface %q (also interfaces[%d])", name, j)
			continue
		}
		seen[name] = i
	}
	if len(dp.Interfaces) == 0 && len(c.VIPs) > 0 {
		v.add(p+".interfaces", "required when vips are configured: list the interfaces to attach XDP to")
	}

	checkEnum(v, p+".xdp_mode", dp.XDPMode, XDPModeNative, XDPModeGeneric, XDPModeAuto)

	if dp.ConntrackSize < minConntrackSize || dp.ConntrackSize > maxConntrackSize {
		v.add(p+".conntrack_size", "must be between %d and %d, got %d", minConntrackSize, uint64(maxConntrackSize), dp.ConntrackSize)
	}

	if dp.RingSize < minRingSize || dp.RingSize > maxRingSize || !isPrime(dp.RingSize) {
		msg := fmt.Sprintf("must be a prime number between %d and %d, got %d", minRingSize, maxRingSize, dp.RingSize)
		if dp.RingSize >= minRingSize && dp.RingSize <= maxRingSize {
			lo, hi := nearestPrimes(dp.RingSize)
			msg += fmt.Sprintf(" (nearest primes: %d, %d)", lo, hi)
		}
		v.add(p+".ring_size", "%s", msg)
	}

	if dp.GUEPort < 1 || dp.GUEPort > 65535 {
		v.add(p+".gue_port", "must be a UDP port between 1 and 65535, got %d", dp.GUEPort)
	}

	if dp.GatewayMAC != "" {
		hw, err := net.ParseMAC(dp.GatewayMAC)
		switch {
		case err != nil || len(hw) != 6:
			v.add(p+".gateway_mac", "invalid MAC address %q (want e.g. \"aa:bb:cc:dd:ee:ff\")", dp.GatewayMAC)
		case hw[0]&1 != 0:
			v.add(p+".gateway_mac", "must be a unicast MAC address, got %q", dp.GatewayMAC)
		}
	}
	checkEnum(v, p+".nexthop", dp.Nexthop, NexthopFIB, NexthopGateway)
	if dp.Nexthop == NexthopGateway && dp.GatewayMAC == "" {
		v.add(p+".gateway_mac", "required when nexthop is %q", NexthopGateway)
	}

	if dp.EncapSourceV4 != "" {
		if a, msg := checkUnicastIP(dp.EncapSourceV4); msg != "" {
			v.add(p+".encap_source_v4", "%s", msg)
		} else if !a.Is4() {
			v.add(p+".encap_source_v4", "must be an IPv4 address, got %q", dp.EncapSourceV4)
		}
	}
	if dp.EncapSourceV6 != "" {
		if a, msg := checkUnicastIP(dp.EncapSourceV6); msg != "" {
			v.add(p+".encap_source_v6", "%s", msg)
		} else if !a.Is6() {
			v.add(p+".encap_source_v6", "must be an IPv6 address, got %q", dp.EncapSourceV6)
		}
	}

	if dp.TCPIdleTimeout <= 0 {
		v.add(p+".tcp_idle_timeout", "must be positive, got %s", dp.TCPIdleTimeout)
	}
	if dp.UDPIdleTimeout <= 0 {
		v.add(p+".udp_idle_timeout", "must be positive, got %s", dp.UDPIdleTimeout)
	}
	validateNewFlowLimit(v, p+".new_flow_limit", &dp.NewFlowLimit)
	validateNAT(v, p+".nat", &dp.NAT)
}

func validateNAT(v *collector, p string, n *NATConfig) {
	if n.PortMin < 1 || n.PortMin > 65535 {
		v.add(p+".port_min", "must be between 1 and 65535, got %d", n.PortMin)
	}
	if n.PortMax < 1 || n.PortMax > 65535 {
		v.add(p+".port_max", "must be between 1 and 65535, got %d", n.PortMax)
	} else if n.PortMax < n.PortMin {
		v.add(p+".port_max", "must not be below port_min (%d), got %d", n.PortMin, n.PortMax)
	}
	if n.ClosingTimeout <= 0 {
		v.add(p+".closing_timeout", "must be positive, got %s", n.ClosingTimeout)
	}
	if n.TableSize < minNATTableSize || n.TableSize > maxNATTableSize {
		v.add(p+".table_size", "must be between %d and %d, got %d", minNATTableSize, maxNATTableSize, n.TableSize)
	}
}

func validateNewFlowLimit(v *collector, p string, l *NewFlowLimit) {
	if l.RatePerSecond < 0 || l.RatePerSecond > maxNewFlowRate {
		v.add(p+".rate_per_second", "must be between 0 (off) and %d, got %d", maxNewFlowRate, l.RatePerSecond)
	}
	if l.RatePerSecond > 0 && (l.Burst < 1 || l.Burst > maxNewFlowBurst) {
		v.add(p+".burst", "must be between 1 and %d when a rate is set, got %d", maxNewFlowBurst, l.Burst)
	}
	if l.RatePerSecond == 0 && l.Burst < 0 {
		v.add(p+".burst", "must not be negative, got %d", l.Burst)
	}
	if l.TableSize < minNewFlowTable || l.TableSize > maxNewFlowTable {
		v.add(p+".table_size", "must be between %d and %d, got %d", minNewFlowTable, maxNewFlowTable, l.TableSize)
	}
}

type listener struct {
	path string
	addr string
	host string
	port int
}

func (c *Config) validateProxy(v *collector) {
	p := &c.Proxy
	for i, t := range p.TLS {
		path := fmt.Sprintf("proxy.tls[%d]", i)
		if t.CertFile == "" {
			v.add(path+".cert_file", "required")
		}
		if t.KeyFile == "" {
			v.add(path+".key_file", "required")
		}
	}
	if p.RedirectHTTPS && len(p.TLS) == 0 {
		v.add("proxy.redirect_https", "needs at least one certificate in proxy.tls")
	}
	for i, s := range p.TrustedProxies {
		if _, err := ParsePrefix(s); err != nil {
			v.add(fmt.Sprintf("proxy.trusted_proxies[%d]", i), "%v", err)
		}
	}
	for _, d := range []struct {
		path string
		val  Duration
	}{
		{"proxy.timeouts.dial", p.Timeouts.Dial}, {"proxy.timeouts.tls_handshake", p.Timeouts.TLSHandshake},
		{"proxy.timeouts.response_header", p.Timeouts.ResponseHeader}, {"proxy.timeouts.idle", p.Timeouts.Idle},
		{"proxy.timeouts.request", p.Timeouts.Request}, {"proxy.drain_timeout", p.DrainTimeout},
	} {
		if d.val <= 0 {
			v.add(d.path, "must be positive, got %s", d.val)
		}
	}
	if p.MaxBodyBytes <= 0 {
		v.add("proxy.max_body_bytes", "must be positive, got %d", p.MaxBodyBytes)
	}
	if p.MaxHeaderBytes < minProxyHeaderBytes || p.MaxHeaderBytes > maxProxyHeaderBytes {
		v.add("proxy.max_header_bytes", "must be between %d and %d, got %d", minProxyHeaderBytes, maxProxyHeaderBytes, p.MaxHeaderBytes)
	}
	if p.RateLimit.RequestsPerSecond < 0 {
		v.add("proxy.rate_limit.requests_per_second", "must be 0 (off) or positive, got %g", p.RateLimit.RequestsPerSecond)
	}
	if p.RateLimit.RequestsPerSecond > 0 && p.RateLimit.Burst < 1 {
		v.add("proxy.rate_limit.burst", "must be at least 1 when a rate is set, got %d", p.RateLimit.Burst)
	}
	if p.Retries < 0 || p.Retries > 5 {
		v.add("proxy.retries", "must be between 0 and 5, got %d", p.Retries)
	}
	if p.PassiveHealth.ConsecutiveFailures < 0 {
		v.add("proxy.passive_health.consecutive_failures", "must be 0 (off) or positive, got %d", p.PassiveHealth.ConsecutiveFailures)
	}
	if p.PassiveHealth.ConsecutiveFailures > 0 && p.PassiveHealth.Ejection <= 0 {
		v.add("proxy.passive_health.ejection", "must be positive, got %s", p.PassiveHealth.Ejection)
	}
	h2 := &p.HTTP2
	if h2.MaxConcurrentStreams < 1 || h2.MaxConcurrentStreams > maxHTTP2Streams {
		v.add("proxy.http2.max_concurrent_streams", "must be between 1 and %d, got %d", maxHTTP2Streams, h2.MaxConcurrentStreams)
	}
	switch {
	case h2.MaxClientResets < 1 || h2.MaxClientResets > maxHTTP2Resets:
		v.add("proxy.http2.max_client_resets", "must be between 1 and %d, got %d", maxHTTP2Resets, h2.MaxClientResets)
	case h2.MaxClientResets < h2.MaxConcurrentStreams:
		// A browser leaving a page cancels every stream it has open.
		v.add("proxy.http2.max_client_resets", "must be at least proxy.http2.max_concurrent_streams (%d), since a client may cancel all its open streams at once, got %d",
			h2.MaxConcurrentStreams, h2.MaxClientResets)
	}
	if h2.ResetWindow <= 0 {
		v.add("proxy.http2.reset_window", "must be positive, got %s", h2.ResetWindow)
	}
}

// Bounds of the HTTP/2 limits: far above any sane setting, low enough that
// a typo (an extra zero or three) is caught.
const (
	maxHTTP2Streams = 10000
	maxHTTP2Resets  = 1000000
)

// Bounds of proxy.max_header_bytes: below 4 KiB ordinary browser requests
// with a few cookies no longer fit; above 1 MiB one idle keep-alive client
// would hold a megabyte.
const (
	minProxyHeaderBytes = 4 << 10
	maxProxyHeaderBytes = 1 << 20
)

func (c *Config) validateListeners(v *collector) {
	if c.API.TokenFile == "" {
		v.add("api.token_file", "required")
	}
	for i, o := range c.API.AllowedOrigins {
		if msg := checkOrigin(o); msg != "" {
			v.add(fmt.Sprintf("api.allowed_origins[%d]", i), "%s", msg)
		}
	}

	all := []listener{
		{path: "api.listen", addr: c.API.Listen},
		{path: "metrics.listen", addr: c.Metrics.Listen},
		{path: "proxy.http_listen", addr: c.Proxy.HTTPListen},
		{path: "proxy.https_listen", addr: c.Proxy.HTTPSListen},
	}
	var active []listener
	for _, l := range all {
		host, port, msg := parseListen(l.addr)
		if msg != "" {
			v.add(l.path, "%s", msg)
			continue
		}
		// The proxy's sockets are only opened when it is enabled, so its
		// addresses may overlap others while it is off.
		if strings.HasPrefix(l.path, "proxy.") && !c.Proxy.Enabled {
			continue
		}
		l.host, l.port = host, port
		for _, prev := range active {
			if listenersConflict(prev, l) {
				v.add(l.path, "%q conflicts with %s (%q)", l.addr, prev.path, prev.addr)
			}
		}
		active = append(active, l)
	}
}

// parseListen checks a "host:port" listen address.
func parseListen(addr string) (host string, port int, msg string) {
	bad := fmt.Sprintf("invalid listen address %q (want host:port, e.g. \":9090\" or \"127.0.0.1:9090\")", addr)
	if addr == "" {
		return "", 0, "required"
	}
	host, ps, err := net.SplitHostPort(addr)
	if err != nil {
		return "", 0, bad
	}
	port, err = strconv.Atoi(ps)
	if err != nil || port < 1 || port > 65535 {
		return "", 0, fmt.Sprintf("invalid port %q in listen address %q (want 1..65535)", ps, addr)
	}
	if host != "" {
		if _, err := netip.ParseAddr(host); err != nil && !isHostname(host) {
			return "", 0, bad
		}
	}
	return host, port, ""
}

// listenersConflict reports whether binding both would fail with
// EADDRINUSE. A wildcard host overlaps every host on the same port.
func listenersConflict(a, b listener) bool {
	if a.port != b.port {
		return false
	}
	return isWildcardHost(a.host) || isWildcardHost(b.host) || a.host == b.host
}

func isWildcardHost(h string) bool {
	if h == "" {
		return true
	}
	a, err := netip.ParseAddr(h)
	return err == nil && a.IsUnspecified()
}

func checkOrigin(o string) string {
	if o == "*" {
		return ""
	}
	bad := fmt.Sprintf("invalid origin %q (want \"*\" or scheme://host[:port], e.g. \"https://admin.example.com\")", o)
	u, err := url.Parse(o)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" ||
		u.User != nil || (u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.Fragment != "" {
		return bad
	}
	return ""
}

// poolIndex maps valid, unique pool names to their index.
type poolIndex map[string]int

func (c *Config) validatePools(v *collector) poolIndex {
	pools := make(poolIndex, len(c.Pools))
	for i := range c.Pools {
		pool := &c.Pools[i]
		pp := fmt.Sprintf("pools[%d]", i)
		switch {
		case pool.Name == "":
			v.add(pp+".name", "required")
		case !isPoolName(pool.Name):
			v.add(pp+".name", "invalid pool name %q (want 1 to %d characters from a-z, 0-9, '-' and '_')", pool.Name, maxPoolNameLen)
		default:
			if j, dup := pools[pool.Name]; dup {
				v.add(pp+".name", "duplicate pool name %q (also pools[%d])", pool.Name, j)
			} else {
				pools[pool.Name] = i
			}
		}
		checkEnum(v, pp+".algorithm", pool.Algorithm,
			AlgorithmRoundRobin, AlgorithmWeightedRoundRobin, AlgorithmLeastConn, AlgorithmIPHash, AlgorithmP2CEWMA)
		if pool.StickyCookie != "" && !isCookieName(pool.StickyCookie) {
			v.add(pp+".sticky_cookie", "invalid cookie name %q (want letters, digits and !#$%%&'*+-.^_`|~)", pool.StickyCookie)
		}

		seen := make(map[netip.AddrPort]int, len(pool.Backends))
		for j, b := range pool.Backends {
			bp := fmt.Sprintf("%s.backends[%d]", pp, j)
			var addr netip.Addr
			if b.Address == "" {
				v.add(bp+".address", "required")
			} else if a, msg := checkUnicastIP(b.Address); msg != "" {
				v.add(bp+".address", "%s", msg)
			} else {
				addr = a
			}
			portOK := true
			if b.Port < 1 || b.Port > 65535 {
				portOK = false
				if b.Port == 0 {
					v.add(bp+".port", "required (1..65535)")
				} else {
					v.add(bp+".port", "must be between 1 and 65535, got %d", b.Port)
				}
			}
			if w := b.EffectiveWeight(); w > maxWeight {
				v.add(bp+".weight", "must be between 0 and %d, got %d", maxWeight, w)
			}
			if addr.IsValid() && portOK {
				ap := netip.AddrPortFrom(addr, uint16(b.Port))
				if k, dup := seen[ap]; dup {
					v.add(bp, "duplicate backend %s (also backends[%d])", ap, k)
				} else {
					seen[ap] = j
				}
			}
		}
		validateHealthCheck(v, pp+".health_check", &pool.HealthCheck)
	}
	return pools
}

func validateHealthCheck(v *collector, p string, hc *HealthCheck) {
	checkEnum(v, p+".type", hc.Type, HealthCheckTCP, HealthCheckHTTP, HealthCheckNone)
	if hc.Type == HealthCheckHTTP {
		if hc.Path == "" {
			v.add(p+".path", "required for http checks")
		} else if !strings.HasPrefix(hc.Path, "/") || strings.ContainsFunc(hc.Path, isSpaceOrControl) {
			v.add(p+".path", "must start with \"/\" and contain no spaces, got %q", hc.Path)
		}
		if hc.ExpectedStatus < 100 || hc.ExpectedStatus > 599 {
			v.add(p+".expected_status", "must be an HTTP status between 100 and 599, got %d", hc.ExpectedStatus)
		}
	} else {
		// Catches a check switched from http to tcp with leftovers that
		// the operator may believe still apply.
		if hc.Path != "" {
			v.add(p+".path", "only valid for http checks (type is %q)", hc.Type)
		}
		if hc.ExpectedStatus != 0 {
			v.add(p+".expected_status", "only valid for http checks (type is %q)", hc.Type)
		}
	}
	if hc.Interval <= 0 {
		v.add(p+".interval", "must be positive, got %s", hc.Interval)
	}
	if hc.Timeout <= 0 {
		v.add(p+".timeout", "must be positive, got %s", hc.Timeout)
	} else if hc.Interval > 0 && hc.Timeout >= hc.Interval {
		// Otherwise a slow backend would have overlapping checks in flight.
		v.add(p+".timeout", "must be less than interval (%s), got %s", hc.Interval, hc.Timeout)
	}
	if hc.Rise < 1 {
		v.add(p+".rise", "must be at least 1, got %d", hc.Rise)
	}
	if hc.Fall < 1 {
		v.add(p+".fall", "must be at least 1, got %d", hc.Fall)
	}
	if hc.Port < 0 || hc.Port > 65535 {
		v.add(p+".port", "must be between 1 and 65535 (or 0 for the backend's port), got %d", hc.Port)
	}
}

func (c *Config) validateVIPs(v *collector, pools poolIndex) {
	type vipKey struct {
		addr  netip.Addr
		port  int
		proto Protocol
	}
	seen := make(map[vipKey]int, len(c.VIPs))
	// First VIP of each family that needs an encapsulation source (ipip or gue).
	needV4, needV6 := -1, -1

	for i, vip := range c.VIPs {
		vp := fmt.Sprintf("vips[%d]", i)
		var addr netip.Addr
		if vip.Address == "" {
			v.add(vp+".address", "required")
		} else if a, msg := checkUnicastIP(vip.Address); msg != "" {
			v.add(vp+".address", "%s", msg)
		} else {
			addr = a
		}
		portOK := vip.Port >= 0 && vip.Port <= 65535
		if !portOK {
			v.add(vp+".port", "must be between 0 (all ports) and 65535, got %d", vip.Port)
		}
		if vip.Protocol == "" {
			v.add(vp+".protocol", "required (tcp or udp)")
		} else {
			checkEnum(v, vp+".protocol", vip.Protocol, ProtocolTCP, ProtocolUDP)
		}
		checkEnum(v, vp+".mode", vip.Mode, VIPModeDSR, VIPModeIPIP, VIPModeNAT, VIPModeGUE)
		if vip.SNATAddress != "" && vip.Mode != VIPModeNAT {
			v.add(vp+".snat_address", "only valid for mode nat (mode is %q)", vip.Mode)
		}

		if addr.IsValid() && portOK && vip.Protocol != "" {
			k := vipKey{addr, vip.Port, vip.Protocol}
			if j, dup := seen[k]; dup {
				v.add(vp, "duplicate VIP %s port %d/%s (also vips[%d])", addr, vip.Port, vip.Protocol, j)
			} else {
				seen[k] = i
			}
		}

		pi, poolOK := pools[vip.Pool]
		switch {
		case vip.Pool == "":
			v.add(vp+".pool", "required")
		case !poolOK:
			v.add(vp+".pool", "unknown pool %q", vip.Pool)
		}

		if vip.Mode == VIPModeNAT && addr.IsValid() {
			var pool *Pool
			if poolOK {
				pool = &c.Pools[pi]
			}
			validateNATVIP(v, vp, addr, vip, pool, pi)
			continue
		}
		if (vip.Mode != VIPModeIPIP && vip.Mode != VIPModeGUE) || !addr.IsValid() {
			continue
		}
		if addr.Is4() && needV4 < 0 {
			needV4 = i
		}
		if addr.Is6() && needV6 < 0 {
			needV6 = i
		}
		if !poolOK {
			continue
		}
		// The dataplane encapsulates in the VIP's family, so a backend of
		// the other family would be unreachable.
		for j, b := range c.Pools[pi].Backends {
			ba, err := netip.ParseAddr(b.Address)
			if err != nil || ba.Is4() == addr.Is4() {
				continue
			}
			v.add(vp+".pool", "%s VIP %s is %s but pools[%d].backends[%d] (%s) is %s; all backends of an %s VIP must share its address family",
				vip.Mode, addr, family(addr), pi, j, b.Address, family(ba), vip.Mode)
		}
	}

	dp := &c.Dataplane
	if needV4 >= 0 && dp.EncapSourceV4 == "" {
		v.add("dataplane.encap_source_v4", "required because vips[%d] uses %s mode with an IPv4 address", needV4, c.VIPs[needV4].Mode)
	}
	if needV6 >= 0 && dp.EncapSourceV6 == "" {
		v.add("dataplane.encap_source_v6", "required because vips[%d] uses %s mode with an IPv6 address", needV6, c.VIPs[needV6].Mode)
	}
}

// validateNATVIP checks what the data path needs to translate a nat VIP:
// a port of its own, an SNAT address of its family, and backends of its
// family, each address once: the data path keeps one port per real and
// VIP, and names reals by address, so an address on two ports of one pool
// would be one real with two ports.
func validateNATVIP(v *collector, vp string, addr netip.Addr, vip VIP, pool *Pool, pi int) {
	if vip.Port == 0 {
		v.add(vp+".port", "mode nat needs a port: it rewrites the destination to the backends' port")
	}
	if vip.SNATAddress != "" {
		if a, msg := checkUnicastIP(vip.SNATAddress); msg != "" {
			v.add(vp+".snat_address", "%s", msg)
		} else if a.Is4() != addr.Is4() {
			v.add(vp+".snat_address", "VIP %s is %s but snat_address %s is %s (no NAT46/64)", addr, family(addr), a, family(a))
		}
	}
	if pool == nil {
		return
	}
	first := make(map[netip.Addr]int, len(pool.Backends))
	for j, b := range pool.Backends {
		ba, err := netip.ParseAddr(b.Address)
		if err != nil {
			continue
		}
		ba = ba.Unmap()
		if ba.Is4() != addr.Is4() {
			v.add(vp+".pool", "nat VIP %s is %s but pools[%d].backends[%d] (%s) is %s; all backends of a nat VIP must share its address family",
				addr, family(addr), pi, j, b.Address, family(ba))
		}
		if i, dup := first[ba]; dup {
			v.add(vp+".pool", "nat VIP %s: address %s is in pools[%d] twice (backends[%d] and backends[%d]); a nat VIP reaches each backend address on one port",
				addr, ba, pi, i, j)
			continue
		}
		first[ba] = j
	}
}

func (c *Config) validateRoutes(v *collector, pools poolIndex) {
	type routeKey struct{ host, prefix string }
	seen := make(map[routeKey]int, len(c.Routes))
	for i, r := range c.Routes {
		rp := fmt.Sprintf("routes[%d]", i)
		hostOK := true
		if r.Host != "" {
			h := strings.TrimPrefix(r.Host, "*.")
			if strings.Contains(h, "*") || !isHostname(h) {
				hostOK = false
				v.add(rp+".host", "invalid host %q (want a host name like \"www.example.com\" or a wildcard like \"*.example.com\")", r.Host)
			}
		}
		prefixOK := true
		if !strings.HasPrefix(r.PathPrefix, "/") || strings.ContainsAny(r.PathPrefix, "?#") ||
			strings.ContainsFunc(r.PathPrefix, isSpaceOrControl) {
			prefixOK = false
			v.add(rp+".path_prefix", "must start with \"/\" and contain no spaces, '?' or '#', got %q", r.PathPrefix)
		}
		switch _, ok := pools[r.Pool]; {
		case r.Pool == "":
			v.add(rp+".pool", "required")
		case !ok:
			v.add(rp+".pool", "unknown pool %q", r.Pool)
		}
		if hostOK && prefixOK {
			k := routeKey{strings.ToLower(r.Host), r.PathPrefix}
			if j, dup := seen[k]; dup {
				v.add(rp, "duplicate route for host %q and path_prefix %q (also routes[%d])", r.Host, r.PathPrefix, j)
			} else {
				seen[k] = i
			}
		}
	}
}

func (c *Config) validateSecurity(v *collector) {
	for i, s := range c.Security.Denylist {
		if _, err := ParseDenyPrefix(s); err != nil {
			v.add(fmt.Sprintf("security.denylist[%d]", i), "%s", err)
		}
	}
}

// checkEnum reports val unless it is one of allowed.
func checkEnum[T ~string](v *collector, path string, val T, allowed ...T) {
	if slices.Contains(allowed, val) {
		return
	}
	names := make([]string, len(allowed))
	for i, a := range allowed {
		names[i] = string(a)
	}
	v.add(path, "must be one of %s, got %q", strings.Join(names, ", "), string(val))
}

// checkUnicastIP parses an address that packets will be sent to or from.
func checkUnicastIP(s string) (netip.Addr, string) {
	a, err := netip.ParseAddr(s)
	switch {
	case err != nil:
		return a, fmt.Sprintf("invalid IP address %q", s)
	case a.Zone() != "":
		return a, fmt.Sprintf("IP address %q must not have a zone", s)
	case a.Is4In6():
		// Mixing mapped and plain forms would defeat family checks and
		// duplicate detection.
		return a, fmt.Sprintf("IPv4-mapped address %q: write it as %s", s, a.Unmap())
	case a.IsUnspecified():
		return a, fmt.Sprintf("IP address %q must not be unspecified", s)
	case a.IsMulticast():
		return a, fmt.Sprintf("IP address %q must not be multicast", s)
	}
	return a, ""
}

func family(a netip.Addr) string {
	if a.Is4() {
		return "IPv4"
	}
	return "IPv6"
}

func isPrime(n int) bool {
	if n < 2 {
		return false
	}
	if n%2 == 0 {
		return n == 2
	}
	for d := 3; d*d <= n; d += 2 {
		if n%d == 0 {
			return false
		}
	}
	return true
}

// nearestPrimes returns the closest primes below and above n within the
// allowed ring size range, so the error message can suggest a fix.
func nearestPrimes(n int) (lo, hi int) {
	lo, hi = minRingSize, maxRingSize
	for i := n - 1; i >= minRingSize; i-- {
		if isPrime(i) {
			lo = i
			break
		}
	}
	for i := n + 1; i <= maxRingSize; i++ {
		if isPrime(i) {
			hi = i
			break
		}
	}
	return lo, hi
}

// isCookieName checks an RFC 6265 cookie name (an RFC 7230 token).
func isCookieName(s string) bool {
	if len(s) > 64 {
		return false
	}
	for _, r := range s {
		if r > 0x7e || r <= 0x20 || strings.ContainsRune("()<>@,;:\\\"/[]?={}", r) {
			return false
		}
	}
	return true
}

func isPoolName(s string) bool {
	if len(s) == 0 || len(s) > maxPoolNameLen {
		return false
	}
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '-' || r == '_') {
			return false
		}
	}
	return true
}

// checkIfName mirrors the kernel's dev_valid_name.
func checkIfName(s string) string {
	switch {
	case s == "":
		return "interface name must not be empty"
	case len(s) > maxIfNameLen:
		return fmt.Sprintf("interface name %q is longer than %d characters", s, maxIfNameLen)
	case s == "." || s == ".." || strings.ContainsAny(s, "/:") || strings.ContainsFunc(s, isSpaceOrControl):
		return fmt.Sprintf("invalid interface name %q", s)
	}
	return ""
}

// isHostname reports whether s is a DNS name (letters, digits, '-' and '_'
// in dot-separated labels of 1 to 63 characters). Underscores are accepted
// because they are common in internal names.
func isHostname(s string) bool {
	s = strings.TrimSuffix(s, ".")
	if s == "" || len(s) > 253 {
		return false
	}
	for label := range strings.SplitSeq(s, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		for _, r := range label {
			if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_') {
				return false
			}
		}
	}
	return true
}

func isSpaceOrControl(r rune) bool {
	return r <= ' ' || r == 0x7f
}

// The data plane's capacity. Its VIP and real maps hold 4,096 and 16,384
// ids (bpf/include/vf_types.h), and id 0 is reserved in both: it means "no
// real" in a ring and is never given to a VIP. A configuration beyond these
// would validate, be accepted, and then fail every reconcile, so it is
// refused here, where the operator sees it first. A test in
// agent/reconcile checks these against the data plane's own sizes.
const (
	VIPCapacity  = 4095
	RealCapacity = 16383
)

// validateCapacity refuses more VIPs, or more distinct backend addresses,
// than the data plane holds. Reals are counted over every pool, as the data
// plane keeps one real per address that any pool lists.
func (c *Config) validateCapacity(v *collector) {
	if n := len(c.VIPs); n > VIPCapacity {
		v.add("vips", "%d VIPs configured; the data plane holds at most %d", n, VIPCapacity)
	}
	addrs := map[netip.Addr]bool{}
	for _, p := range c.Pools {
		for _, b := range p.Backends {
			if a, err := netip.ParseAddr(b.Address); err == nil {
				addrs[a.Unmap()] = true
			}
		}
	}
	if n := len(addrs); n > RealCapacity {
		v.add("pools", "%d distinct backend addresses configured; the data plane holds at most %d reals", n, RealCapacity)
	}
	snat := map[string]bool{}
	for _, vip := range c.VIPs {
		if vip.Mode == VIPModeNAT && vip.SNATAddress != "" {
			snat[vip.SNATAddress] = true
		}
	}
	// Plus at most one interface address per family for the VIPs that name none.
	if n := len(snat); n > SNATAddressCapacity-2 {
		v.add("vips", "%d distinct snat_address values configured; the data plane holds at most %d (two kept for the interface's own)",
			n, SNATAddressCapacity-2)
	}
}
