// Package config defines the VeloFlux agent's YAML configuration: the schema,
// its defaults, strict decoding and semantic validation, and atomic saving.
//
// The agent programs an XDP dataplane, runs health checks, proxies L7 traffic
// and serves an API from this one file, and the API can rewrite it at
// runtime. A typo that silently falls back to a default (a misspelt
// "adress", a weight that was meant to be 0) can blackhole production
// traffic, so decoding is deliberately strict: every unknown key, duplicate
// key, type mismatch and semantic problem is reported at once, each with the
// exact path of the offending value (for example
// "pools[1].backends[0].adress: unknown field"), so an operator or an API
// client can fix everything in one round trip.
//
// Typical use:
//
//	cfg, err := config.Load("/etc/veloflux/veloflux.yaml")
//	var verr *config.ValidationError
//	if errors.As(err, &verr) {
//		for _, fe := range verr.Errors { ... }
//	}
//
// Parse returns a configuration with defaults applied and addresses in
// canonical form (IP literals as printed by net/netip, CIDRs masked, MAC
// addresses lower case), so consumers can compare values textually.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"reflect"
	"strconv"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"
)

// Default values. They are documented in deploy/veloflux.yaml as well; keep
// the two in sync.
const (
	defaultXDPMode        = XDPModeAuto
	defaultConntrackSize  = 1 << 20
	defaultRingSize       = 65537
	defaultNexthop        = NexthopFIB
	defaultTCPIdleTimeout = 300 * time.Second
	defaultUDPIdleTimeout = 30 * time.Second
	defaultNewFlowTable   = 65536
	// The SNAT ports of mode nat: below Linux's default ephemeral range
	// (32768-60999), so that the node's own connections from an SNAT
	// address do not take the same ports.
	defaultNATPortMin        = 16384
	defaultNATPortMax        = 32767
	defaultNATClosingTimeout = 10 * time.Second
	defaultNATTableSize      = 262144
	defaultAPIListen         = ":9090"
	defaultTokenFile         = "/var/lib/veloflux/api.token"
	defaultMetricsListen     = ":8080"
	defaultHTTPListen        = ":80"
	defaultHTTPSListen       = ":443"
	defaultAlgorithm         = AlgorithmRoundRobin
	defaultWeight            = 1
	defaultCheckType         = HealthCheckTCP
	defaultCheckPath         = "/"
	defaultCheckStatus       = 200
	defaultCheckInterval     = 2 * time.Second
	defaultCheckTimeout      = 1 * time.Second
	defaultCheckRise         = 2
	defaultCheckFall         = 3
	defaultVIPMode           = VIPModeDSR
	defaultPathPrefix        = "/"
	defaultBGPHoldTime       = 3 * time.Second
	defaultBGPKeepalive      = 1 * time.Second
	defaultBGPRestartTime    = 120 * time.Second
)

// Config is the complete agent configuration.
type Config struct {
	Node      NodeConfig      `yaml:"node"`
	Dataplane DataplaneConfig `yaml:"dataplane"`
	API       APIConfig       `yaml:"api"`
	Metrics   MetricsConfig   `yaml:"metrics"`
	Proxy     ProxyConfig     `yaml:"proxy"`
	Pools     []Pool          `yaml:"pools,omitempty"`
	// VIPs has no omitempty: a saved file always says `vips: []` when it
	// has none, because a reload refuses a file that would withdraw every
	// VIP without saying so (one cut short while an editor wrote it).
	VIPs     []VIP          `yaml:"vips"`
	Routes   []Route        `yaml:"routes,omitempty"`
	Security SecurityConfig `yaml:"security"`
	// BGP announces the VIPs to upstream routers; nil announces nothing.
	BGP *BGPConfig `yaml:"bgp,omitempty"`
	// Decap is read by `veloflux decap` on a backend, not by the agent.
	Decap *DecapConfig `yaml:"decap,omitempty"`
}

// NodeConfig identifies this agent.
type NodeConfig struct {
	// Name defaults to os.Hostname().
	Name string `yaml:"name"`
}

// XDPMode selects how the XDP program is attached.
type XDPMode string

// XDP attach modes.
const (
	XDPModeNative  XDPMode = "native"
	XDPModeGeneric XDPMode = "generic"
	// XDPModeAuto tries native first and falls back to generic.
	XDPModeAuto XDPMode = "auto"
)

// Nexthop selects how the dataplane finds the L2 destination of forwarded
// packets.
type Nexthop string

// Nexthop strategies.
const (
	// NexthopFIB uses the bpf_fib_lookup helper.
	NexthopFIB Nexthop = "fib"
	// NexthopGateway sends everything to DataplaneConfig.GatewayMAC.
	NexthopGateway Nexthop = "gateway"
)

// DataplaneConfig configures the XDP L4 load balancer.
type DataplaneConfig struct {
	// Interfaces the XDP program is attached to; required when VIPs exist.
	Interfaces []string `yaml:"interfaces,omitempty"`
	XDPMode    XDPMode  `yaml:"xdp_mode"`
	// ConntrackSize is the max_entries of the connection tracking map.
	ConntrackSize int `yaml:"conntrack_size"`
	// RingSize is the Maglev lookup table size per VIP; Maglev requires a
	// prime so that every backend's permutation covers the whole table.
	RingSize   int     `yaml:"ring_size"`
	GatewayMAC string  `yaml:"gateway_mac,omitempty"`
	Nexthop    Nexthop `yaml:"nexthop"`
	// EncapSourceV4/V6 are the outer source addresses of IPIP and GUE
	// packets.
	EncapSourceV4 string `yaml:"encap_source_v4,omitempty"`
	EncapSourceV6 string `yaml:"encap_source_v6,omitempty"`
	// GUEPort is the UDP destination port of the packets of gue VIPs, the
	// port the backends' decapsulators listen on (decap.gue_port there).
	// One port for all VIPs: a decapsulator accepts exactly one.
	GUEPort int `yaml:"gue_port"`
	// ICMPTooBig answers an ipip or gue packet that would exceed the
	// interface's MTU once encapsulated with ICMP "fragmentation needed"
	// (IPv4 with DF) or ICMPv6 "packet too big", in XDP. On by default;
	// off, such packets are forwarded and lost past the MTU, as before.
	ICMPTooBig     bool     `yaml:"icmp_too_big"`
	TCPIdleTimeout Duration `yaml:"tcp_idle_timeout"`
	UDPIdleTimeout Duration `yaml:"udp_idle_timeout"`
	// NewFlowLimit bounds how fast one source may open flows through the
	// XDP balancer; off while its rate is 0.
	NewFlowLimit NewFlowLimit `yaml:"new_flow_limit"`
	// NAT tunes mode nat, shared by every nat VIP.
	NAT NATConfig `yaml:"nat"`
}

// NATConfig tunes the source translation of nat VIPs. Their flows use the
// idle timeouts above; a TCP FIN or RST shortens them to ClosingTimeout.
type NATConfig struct {
	// PortMin and PortMax bound the SNAT source ports. Keep the range out
	// of the kernel's net.ipv4.ip_local_port_range: the node's own
	// connections from an SNAT address would otherwise compete for it.
	PortMin int `yaml:"port_min"`
	PortMax int `yaml:"port_max"`
	// ClosingTimeout is how long a nat flow lives after a FIN or RST.
	ClosingTimeout Duration `yaml:"closing_timeout"`
	// TableSize is how many nat flows each direction's table holds;
	// changing it needs `veloflux detach` and a restart.
	TableSize int `yaml:"table_size"`
}

// NewFlowLimit is a per-source token bucket for new flows in the XDP data
// path: an IPv4 address, or an IPv6 /64, may open RatePerSecond flows per
// second and Burst at once, on each CPU that receives its packets. Packets
// that would open more are dropped; the source's established flows go on.
// It keeps one source from filling the conntrack table and evicting the
// idle flows of everyone else.
type NewFlowLimit struct {
	// RatePerSecond is the refill rate; 0 turns the limit off.
	RatePerSecond int `yaml:"rate_per_second"`
	// Burst is the bucket depth in flows; required with a rate.
	Burst int `yaml:"burst"`
	// TableSize is how many (source, CPU) buckets are kept, the least
	// recently used giving way; changing it needs a restart.
	TableSize int `yaml:"table_size"`
}

// APIConfig configures the REST/WebSocket API server.
type APIConfig struct {
	Listen    string `yaml:"listen"`
	TokenFile string `yaml:"token_file"`
	// ProtectReads requires the token for GET requests too.
	ProtectReads bool `yaml:"protect_reads"`
	// AllowedOrigins lists the CORS/WebSocket origins ("*" or
	// "scheme://host[:port]") allowed to use the API from a browser.
	AllowedOrigins []string `yaml:"allowed_origins,omitempty"`
}

// MetricsConfig configures the Prometheus endpoint.
type MetricsConfig struct {
	Listen string `yaml:"listen"`
}

// ProxyConfig configures the L7 HTTP(S) proxy.
type ProxyConfig struct {
	HTTPListen  string `yaml:"http_listen"`
	HTTPSListen string `yaml:"https_listen"`
	Enabled     bool   `yaml:"enabled"`
	// TLS holds the certificates served on https_listen, chosen by SNI;
	// without any, the HTTPS listener is not opened.
	TLS []TLSCert `yaml:"tls,omitempty"`
	// RedirectHTTPS answers plain HTTP with a redirect to HTTPS.
	RedirectHTTPS bool `yaml:"redirect_https"`
	// H2C accepts HTTP/2 without TLS (prior knowledge or Upgrade).
	H2C bool `yaml:"h2c"`
	// TrustedProxies are the CIDRs whose X-Forwarded-* headers are kept;
	// from anyone else they are replaced by what the connection shows.
	TrustedProxies []string     `yaml:"trusted_proxies,omitempty"`
	Timeouts       ProxyTimeout `yaml:"timeouts"`
	// MaxBodyBytes bounds a request body; larger ones get 413.
	MaxBodyBytes int64 `yaml:"max_body_bytes"`
	// MaxHeaderBytes bounds a request's header block (request line and
	// header fields); larger ones get 431. On HTTP/1.1 it is also the
	// read buffer every keep-alive connection keeps while idle: a
	// smaller bound serves many idle clients with less memory.
	MaxHeaderBytes int       `yaml:"max_header_bytes"`
	RateLimit      RateLimit `yaml:"rate_limit"`
	// Retries is how many other backends an idempotent request may try
	// when its connection failed before anything was sent.
	Retries int `yaml:"retries"`
	// PassiveHealth ejects a backend after consecutive failures.
	PassiveHealth PassiveHealth `yaml:"passive_health"`
	// DrainTimeout bounds how long in-flight requests may take to finish
	// when the proxy drains (SIGTERM or POST /api/system/drain).
	DrainTimeout Duration `yaml:"drain_timeout"`
	// HTTP2 bounds what one HTTP/2 client connection may ask for.
	HTTP2 HTTP2Limits `yaml:"http2"`
}

// HTTP2Limits bound one HTTP/2 client connection (HTTPS with ALPN h2, and
// h2c).
type HTTP2Limits struct {
	// MaxConcurrentStreams is advertised to clients as
	// SETTINGS_MAX_CONCURRENT_STREAMS; streams past it are refused.
	MaxConcurrentStreams int `yaml:"max_concurrent_streams"`
	// MaxClientResets is how many streams a client may cancel
	// (RST_STREAM) per ResetWindow on one connection, in bursts of up to
	// MaxClientResets; past that the connection is ended with GOAWAY
	// (ENHANCE_YOUR_CALM), against HTTP/2 rapid reset floods.
	MaxClientResets int      `yaml:"max_client_resets"`
	ResetWindow     Duration `yaml:"reset_window"`
}

// TLSCert is a certificate and its key, as PEM files.
type TLSCert struct {
	CertFile string `yaml:"cert_file"`
	KeyFile  string `yaml:"key_file"`
}

// ProxyTimeout bounds each phase of a proxied request.
type ProxyTimeout struct {
	Dial           Duration `yaml:"dial"`
	TLSHandshake   Duration `yaml:"tls_handshake"`
	ResponseHeader Duration `yaml:"response_header"`
	Idle           Duration `yaml:"idle"`
	Request        Duration `yaml:"request"`
}

// RateLimit is a per-client-IP token bucket; 0 requests per second is off.
type RateLimit struct {
	RequestsPerSecond float64 `yaml:"requests_per_second"`
	Burst             int     `yaml:"burst"`
}

// PassiveHealth configures passive outlier ejection in the proxy.
type PassiveHealth struct {
	// ConsecutiveFailures (connect errors or 5xx) that eject a backend; 0 is off.
	ConsecutiveFailures int      `yaml:"consecutive_failures"`
	Ejection            Duration `yaml:"ejection"`
}

// Algorithm is a backend selection algorithm.
type Algorithm string

// Load-balancing algorithms.
const (
	AlgorithmRoundRobin         Algorithm = "round_robin"
	AlgorithmWeightedRoundRobin Algorithm = "weighted_round_robin"
	AlgorithmLeastConn          Algorithm = "least_conn"
	AlgorithmIPHash             Algorithm = "ip_hash"
	AlgorithmP2CEWMA            Algorithm = "p2c_ewma"
)

// Pool is a named group of backends shared by VIPs and routes.
type Pool struct {
	Name        string      `yaml:"name"`
	Algorithm   Algorithm   `yaml:"algorithm"`
	Backends    []Backend   `yaml:"backends,omitempty"`
	HealthCheck HealthCheck `yaml:"health_check"`
	// StickyCookie, when set, names the cookie that pins an L7 client to a
	// backend (an HMAC-signed backend id).
	StickyCookie string `yaml:"sticky_cookie,omitempty"`
}

// Backend is one real server.
type Backend struct {
	Address string `yaml:"address"`
	Port    int    `yaml:"port"`
	// Weight is a pointer so that an explicit "weight: 0" (drain the
	// backend) can be told apart from an omitted weight, which means 1.
	// Use EffectiveWeight rather than dereferencing it.
	Weight *uint32 `yaml:"weight,omitempty"`
}

// Endpoint is the backend's "address:port" ("[v6]:port"). It is the
// backend's Maglev key, which leaves the pool name out so that the same
// backend set gives the same table whatever the pool is called.
func (b Backend) Endpoint() string {
	return net.JoinHostPort(b.Address, strconv.Itoa(b.Port))
}

// Key is the backend's identity within pool, "pool/address:port": health
// verdicts, the drain set and the L7 proxy's members are keyed by it, so
// they must all spell it this one way.
func (b Backend) Key(pool string) string {
	return pool + "/" + b.Endpoint()
}

// EffectiveWeight returns the backend's weight, treating an unset weight as
// the default of 1.
func (b Backend) EffectiveWeight() uint32 {
	if b.Weight == nil {
		return defaultWeight
	}
	return *b.Weight
}

// HealthCheckType is the kind of active health check.
type HealthCheckType string

// Health check types.
const (
	HealthCheckTCP  HealthCheckType = "tcp"
	HealthCheckHTTP HealthCheckType = "http"
	// HealthCheckNone treats every backend as healthy.
	HealthCheckNone HealthCheckType = "none"
)

// HealthCheck configures active health checking of a pool's backends.
type HealthCheck struct {
	Type HealthCheckType `yaml:"type"`
	// Path and ExpectedStatus apply to http checks only.
	Path           string   `yaml:"path,omitempty"`
	ExpectedStatus int      `yaml:"expected_status,omitempty"`
	Interval       Duration `yaml:"interval"`
	Timeout        Duration `yaml:"timeout"`
	// Rise is the number of consecutive successes that mark a backend up,
	// Fall the number of consecutive failures that mark it down.
	Rise int `yaml:"rise"`
	Fall int `yaml:"fall"`
	// Port overrides the backend's port for checks; 0 means the backend's.
	Port int `yaml:"port,omitempty"`
}

// Protocol is an L4 protocol.
type Protocol string

// L4 protocols.
const (
	ProtocolTCP Protocol = "tcp"
	ProtocolUDP Protocol = "udp"
)

// VIPMode is how packets reach a backend.
type VIPMode string

// Forwarding modes.
const (
	// VIPModeDSR rewrites the destination MAC only; backends must hold the
	// VIP on a local interface and sit on the same L2 segment.
	VIPModeDSR VIPMode = "dsr"
	// VIPModeIPIP encapsulates the packet in an outer IP header addressed
	// to the backend.
	VIPModeIPIP VIPMode = "ipip"
	// VIPModeNAT rewrites destination (to the backend's address and port)
	// and source (to an SNAT address of this node) and translates the
	// replies back: backends need no change at all.
	VIPModeNAT VIPMode = "nat"
	// VIPModeGUE encapsulates the packet in an outer IP and UDP header
	// addressed to the backend's dataplane.gue_port (GUE variant 1, as
	// Katran sends it).
	VIPModeGUE VIPMode = "gue"
)

// VIP is a virtual service handled by the XDP dataplane.
type VIP struct {
	Address string `yaml:"address"`
	// Port 0 matches all ports.
	Port           int      `yaml:"port"`
	Protocol       Protocol `yaml:"protocol"`
	Mode           VIPMode  `yaml:"mode"`
	Pool           string   `yaml:"pool"`
	SourceAffinity bool     `yaml:"source_affinity"`
	// SNATAddress is the source address of a nat VIP's packets toward its
	// backends, one this node owns (each node of a cluster its own). Empty
	// means the primary address of the VIP's family on the first
	// dataplane interface.
	SNATAddress string `yaml:"snat_address,omitempty"`
}

// Route maps HTTP requests to a pool in the L7 proxy.
type Route struct {
	// Host is an exact host name or "*.suffix"; empty matches any host.
	Host       string `yaml:"host,omitempty"`
	PathPrefix string `yaml:"path_prefix"`
	Pool       string `yaml:"pool"`
}

// SecurityConfig holds source filtering applied in the dataplane.
type SecurityConfig struct {
	// Denylist holds IPv4/IPv6 CIDRs (a bare IP means a single host). After
	// Parse they are masked to their network address, IPv4-mapped ones are
	// IPv4 (see ParseDenyPrefix), and duplicates are gone.
	Denylist []string `yaml:"denylist,omitempty"`
}

// BGPConfig makes the node announce its VIPs to upstream routers, so that
// several nodes can sit behind one ECMP router. A VIP is announced while
// XDP is attached, its pool has a live backend and the node is not drained.
type BGPConfig struct {
	// ASN is this node's AS number.
	ASN uint32 `yaml:"asn"`
	// RouterID is an IPv4 address; it defaults to the first IPv4 address
	// of the first data path interface.
	RouterID string `yaml:"router_id,omitempty"`
	// NextHop and NextHopV6 are the next hops of IPv4 and IPv6 VIPs; they
	// default to the first address of that family on the first data path
	// interface.
	NextHop   string    `yaml:"next_hop,omitempty"`
	NextHopV6 string    `yaml:"next_hop_v6,omitempty"`
	Peers     []BGPPeer `yaml:"peers"`
	// Communities ("asn:value"), LocalPreference and MED go with every
	// VIP, unless an entry of VIPs overrides them for an address.
	Communities     []string `yaml:"communities,omitempty"`
	LocalPreference *uint32  `yaml:"local_preference,omitempty"`
	MED             *uint32  `yaml:"med,omitempty"`
	VIPs            []BGPVIP `yaml:"vips,omitempty"`
	// GracefulRestart keeps the routes at the routers while the agent
	// restarts (the data path keeps forwarding meanwhile).
	GracefulRestart BGPGracefulRestart `yaml:"graceful_restart"`
}

// BGPPeer is one upstream router.
type BGPPeer struct {
	Address string `yaml:"address"`
	ASN     uint32 `yaml:"asn"`
	// Port 0 means 179.
	Port      int      `yaml:"port,omitempty"`
	HoldTime  Duration `yaml:"hold_time"`
	Keepalive Duration `yaml:"keepalive"`
	// Password turns on TCP MD5 signatures (RFC 2385).
	Password string `yaml:"password,omitempty"`
	// Multihop is the TTL toward a peer that is not directly connected;
	// 0 means directly connected.
	Multihop int `yaml:"multihop,omitempty"`
}

// BGPVIP overrides the route attributes of one VIP address (every port
// and protocol on it is one route).
type BGPVIP struct {
	Address         string   `yaml:"address"`
	Communities     []string `yaml:"communities,omitempty"`
	LocalPreference *uint32  `yaml:"local_preference,omitempty"`
	MED             *uint32  `yaml:"med,omitempty"`
}

// BGPGracefulRestart configures RFC 4724 graceful restart.
type BGPGracefulRestart struct {
	Enabled     bool     `yaml:"enabled"`
	RestartTime Duration `yaml:"restart_time"`
}

func (b *BGPConfig) setDefaults() {
	b.GracefulRestart = BGPGracefulRestart{Enabled: true, RestartTime: Duration(defaultBGPRestartTime)}
}

func (p *BGPPeer) setDefaults() {
	p.HoldTime = Duration(defaultBGPHoldTime)
	p.Keepalive = Duration(defaultBGPKeepalive)
}

// defaulter is implemented by types whose fresh values must start from
// their defaults before YAML is decoded on top of them. Decoding into
// pre-filled values (rather than filling zero values afterwards) is what lets
// an explicit zero, e.g. "ring_size: 0", be reported as invalid instead of
// being silently replaced by the default.
type defaulter interface {
	setDefaults()
}

func (p *Pool) setDefaults() {
	p.Algorithm = defaultAlgorithm
	p.HealthCheck.setDefaults()
}

func (b *Backend) setDefaults() {
	w := uint32(defaultWeight)
	b.Weight = &w
}

func (h *HealthCheck) setDefaults() {
	h.Type = defaultCheckType
	h.Interval = Duration(defaultCheckInterval)
	h.Timeout = Duration(defaultCheckTimeout)
	h.Rise = defaultCheckRise
	h.Fall = defaultCheckFall
}

func (v *VIP) setDefaults() {
	v.Mode = defaultVIPMode
}

func (r *Route) setDefaults() {
	r.PathPrefix = defaultPathPrefix
}

// Default returns a configuration with every default applied (node.name is
// the host name) and no pools, VIPs or routes.
func Default() *Config {
	c := staticDefaults()
	c.applyDependentDefaults()
	return c
}

// staticDefaults returns the defaults that do not depend on other values or
// on the environment; Parse decodes on top of them.
func staticDefaults() *Config {
	return &Config{
		Dataplane: DataplaneConfig{
			XDPMode:        defaultXDPMode,
			ConntrackSize:  defaultConntrackSize,
			RingSize:       defaultRingSize,
			Nexthop:        defaultNexthop,
			GUEPort:        DefaultGUEPort,
			ICMPTooBig:     true,
			TCPIdleTimeout: Duration(defaultTCPIdleTimeout),
			UDPIdleTimeout: Duration(defaultUDPIdleTimeout),
			NewFlowLimit:   NewFlowLimit{TableSize: defaultNewFlowTable},
			NAT: NATConfig{
				PortMin: defaultNATPortMin, PortMax: defaultNATPortMax,
				ClosingTimeout: Duration(defaultNATClosingTimeout), TableSize: defaultNATTableSize,
			},
		},
		API: APIConfig{
			Listen:    defaultAPIListen,
			TokenFile: defaultTokenFile,
		},
		Metrics: MetricsConfig{Listen: defaultMetricsListen},
		Proxy: ProxyConfig{
			HTTPListen:  defaultHTTPListen,
			HTTPSListen: defaultHTTPSListen,
			Timeouts: ProxyTimeout{
				Dial:           Duration(2 * time.Second),
				TLSHandshake:   Duration(5 * time.Second),
				ResponseHeader: Duration(15 * time.Second),
				Idle:           Duration(90 * time.Second),
				Request:        Duration(60 * time.Second),
			},
			MaxBodyBytes:   10 << 20,
			MaxHeaderBytes: 64 << 10,
			Retries:        1,
			PassiveHealth:  PassiveHealth{ConsecutiveFailures: 5, Ejection: Duration(30 * time.Second)},
			DrainTimeout:   Duration(15 * time.Second),
			HTTP2:          HTTP2Limits{MaxConcurrentStreams: 100, MaxClientResets: 200, ResetWindow: Duration(10 * time.Second)},
		},
	}
}

// applyDependentDefaults fills defaults that depend on other values or on
// the environment, so they can only be decided after decoding.
func (c *Config) applyDependentDefaults() {
	if c.Node.Name == "" {
		// On failure the name stays empty and Validate reports it, which
		// tells the operator to set node.name explicitly.
		if h, err := os.Hostname(); err == nil {
			c.Node.Name = h
		}
	}
	for i := range c.Pools {
		hc := &c.Pools[i].HealthCheck
		if hc.Type == HealthCheckHTTP {
			if hc.Path == "" {
				hc.Path = defaultCheckPath
			}
			if hc.ExpectedStatus == 0 {
				hc.ExpectedStatus = defaultCheckStatus
			}
		}
	}
}

// normalize rewrites valid values into canonical form so that consumers and
// the duplicate checks in Validate can compare them as strings. Invalid
// values are left untouched so that errors quote what the user wrote.
func (c *Config) normalize() {
	canonIP := func(s *string) {
		if a, err := netip.ParseAddr(*s); err == nil && a.Zone() == "" {
			*s = a.String()
		}
	}
	dp := &c.Dataplane
	canonIP(&dp.EncapSourceV4)
	canonIP(&dp.EncapSourceV6)
	if hw, err := net.ParseMAC(dp.GatewayMAC); err == nil && len(hw) == 6 {
		dp.GatewayMAC = hw.String()
	}
	for i := range c.Pools {
		for j := range c.Pools[i].Backends {
			canonIP(&c.Pools[i].Backends[j].Address)
		}
	}
	for i := range c.VIPs {
		canonIP(&c.VIPs[i].Address)
	}
	if b := c.BGP; b != nil {
		canonIP(&b.RouterID)
		canonIP(&b.NextHop)
		canonIP(&b.NextHopV6)
		for i := range b.Peers {
			canonIP(&b.Peers[i].Address)
		}
		for i := range b.VIPs {
			canonIP(&b.VIPs[i].Address)
		}
	}
	if c.Decap != nil {
		c.Decap.Normalize()
	}
	for i := range c.Routes {
		// Host names are case-insensitive (RFC 4343).
		c.Routes[i].Host = strings.ToLower(c.Routes[i].Host)
	}

	// Deduplicating shifts indexes, which would make error paths point at
	// the wrong entry, so only do it when every entry is valid.
	canon := make([]string, 0, len(c.Security.Denylist))
	seen := make(map[string]bool, len(c.Security.Denylist))
	for _, s := range c.Security.Denylist {
		p, err := ParseDenyPrefix(s)
		if err != nil {
			return
		}
		if !seen[p.String()] {
			seen[p.String()] = true
			canon = append(canon, p.String())
		}
	}
	if c.Security.Denylist != nil {
		c.Security.Denylist = canon
	}
}

// ParseAddr parses an address as the data plane stores it: no zone, and an
// IPv4-mapped IPv6 address is the IPv4 address (the data plane unmaps it
// and reads it back unmapped). Validation refuses mapped forms in the file;
// this is for consumers of a validated configuration.
func ParseAddr(s string) (netip.Addr, error) {
	a, err := netip.ParseAddr(s)
	if err != nil || a.Zone() != "" {
		return netip.Addr{}, fmt.Errorf("invalid IP address %q", s)
	}
	return a.Unmap(), nil
}

// ParsePrefix parses a CIDR, or a bare IP meaning one host, masked: the
// form of denylist entries and trusted proxies.
// The result is masked, so "10.1.2.3/8" becomes "10.0.0.0/8".
func ParsePrefix(s string) (netip.Prefix, error) {
	if !strings.Contains(s, "/") {
		a, err := netip.ParseAddr(s)
		if err != nil || a.Zone() != "" {
			return netip.Prefix{}, fmt.Errorf("invalid CIDR %q (want e.g. \"192.0.2.0/24\" or \"2001:db8::/32\")", s)
		}
		return netip.PrefixFrom(a, a.BitLen()), nil
	}
	p, err := netip.ParsePrefix(s)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("invalid CIDR %q (want e.g. \"192.0.2.0/24\" or \"2001:db8::/32\")", s)
	}
	return p.Masked(), nil
}

// ParseDenyPrefix parses a denylist entry as the data path matches it: a
// CIDR or a bare IP (one host), masked. An IPv4-mapped IPv6 entry becomes
// the IPv4 prefix it means ("::ffff:10.1.2.3" is 10.1.2.3/32,
// "::ffff:10.1.0.0/112" is 10.1.0.0/16), because IPv4 clients are matched
// against the IPv4 table only: left mapped, the entry would deny nobody. A
// mapped prefix shorter than /96 reaches past the IPv4 range and is refused.
func ParseDenyPrefix(s string) (netip.Prefix, error) {
	p, err := ParsePrefix(s)
	if err != nil {
		return netip.Prefix{}, err
	}
	// Masking zeroes the ::ffff: marker of a prefix shorter than /96, so
	// look at the address as written.
	raw, _, _ := strings.Cut(s, "/")
	a, err := netip.ParseAddr(raw)
	if err != nil || !a.Is4In6() {
		return p, nil
	}
	if p.Bits() < 96 {
		return netip.Prefix{}, fmt.Errorf("%q is an IPv4-mapped prefix shorter than /96, which also covers IPv6 "+
			"addresses: write IPv4 clients as IPv4 (e.g. %s) and IPv6 ones without the ::ffff: prefix", s,
			netip.PrefixFrom(a.Unmap(), 32))
	}
	return netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96).Masked(), nil
}

// Load reads the configuration file at path and parses it with Parse.
func Load(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("config: read %s: %w", path, err)
	}
	c, err := Parse(data)
	if err != nil {
		return nil, fmt.Errorf("config: load %s: %w", path, err)
	}
	return c, nil
}

// Parse strictly decodes a single YAML document, applies defaults and
// validates the result. Any problem, syntactic or semantic, is returned as a
// *ValidationError listing every problem found, each with its path.
func Parse(data []byte) (*Config, error) {
	root, ferr := parseDocument(data)
	if ferr != nil {
		return nil, &ValidationError{Errors: []FieldError{*ferr}}
	}

	c := staticDefaults()
	d := newDecoder()
	d.decode("", root, reflect.ValueOf(c).Elem())
	c.applyDependentDefaults()
	c.normalize()

	errs := d.errs
	for _, fe := range c.validate() {
		// A value that failed to decode keeps its default or zero value;
		// validating it would only repeat the decode error in a more
		// confusing form.
		if !d.failedAt(fe.Path) {
			errs = append(errs, fe)
		}
	}
	if len(errs) > 0 {
		return nil, &ValidationError{Errors: errs}
	}
	return c, nil
}

// parseDocument returns the root node of the single YAML document in data.
func parseDocument(data []byte) (*yaml.Node, *FieldError) {
	empty := &FieldError{Message: "config is empty: expected a YAML mapping"}
	if len(bytes.TrimSpace(data)) == 0 {
		return nil, empty
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var doc yaml.Node
	if err := dec.Decode(&doc); err != nil {
		if errors.Is(err, io.EOF) { // only comments
			return nil, empty
		}
		return nil, &FieldError{Message: "invalid YAML: " + strings.TrimPrefix(err.Error(), "yaml: ")}
	}
	var extra yaml.Node
	switch err := dec.Decode(&extra); {
	case err == nil:
		return nil, &FieldError{Message: fmt.Sprintf("multiple YAML documents (another starts on line %d): expected exactly one", extra.Line)}
	case !errors.Is(err, io.EOF):
		return nil, &FieldError{Message: "invalid YAML: " + strings.TrimPrefix(err.Error(), "yaml: ")}
	}

	root := &doc
	if root.Kind == yaml.DocumentNode {
		if len(root.Content) == 0 {
			return nil, empty
		}
		root = root.Content[0]
	}
	if isNull(root) {
		return nil, empty
	}
	if root.Kind != yaml.MappingNode {
		return nil, &FieldError{Message: fmt.Sprintf("top level must be a YAML mapping, got %s", describe(root))}
	}
	return root, nil
}

// Marshal encodes the configuration as YAML that Parse accepts.
func (c *Config) Marshal() ([]byte, error) {
	var buf bytes.Buffer
	enc := yaml.NewEncoder(&buf)
	enc.SetIndent(2)
	if err := enc.Encode(c); err != nil {
		return nil, fmt.Errorf("config: marshal: %w", err)
	}
	if err := enc.Close(); err != nil {
		return nil, fmt.Errorf("config: marshal: %w", err)
	}
	return buf.Bytes(), nil
}
