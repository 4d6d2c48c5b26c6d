package api

import (
	"time"

	"github.com/veloflux/veloflux/agent/snapshot"
)

// StatusView is GET /api/status and the status channel's payload.
type StatusView struct {
	Status           string          `json:"status"` // ok | degraded | draining
	Version          string          `json:"version"`
	Node             string          `json:"node"`
	StartedAt        time.Time       `json:"started_at"`
	UptimeSeconds    float64         `json:"uptime_seconds"`
	Attached         bool            `json:"dataplane_attached"`
	Interfaces       []InterfaceView `json:"interfaces"`
	XDPMode          string          `json:"xdp_mode"`
	ProgramID        uint32          `json:"program_id"`
	ConfigGeneration uint64          `json:"config_generation"`
	Counts           Counts          `json:"counts"`
	LastReconcile    ReconcileView   `json:"last_reconcile"`
	Proxy            *ProxyView      `json:"proxy,omitempty"` // nil unless proxy.enabled
	// NodeDrained: the node withdraws every VIP over BGP (POST
	// /api/node/drain) while its data path keeps forwarding.
	NodeDrained bool     `json:"node_drained"`
	BGP         *BGPView `json:"bgp,omitempty"` // nil without a bgp section
}

// ProxyView is the L7 proxy's state: whether its listeners accept
// connections. A listener that could not be opened or failed stays closed
// until the agent restarts.
type ProxyView struct {
	Serving   bool           `json:"serving"` // every listener accepts connections
	Draining  bool           `json:"draining"`
	Listeners []ListenerView `json:"listeners"`
}

// ListenerView is one listener the proxy's configuration asks for.
type ListenerView struct {
	Role    string `json:"role"` // http | https
	Address string `json:"address"`
	Serving bool   `json:"serving"`
}

// InterfaceView is one configured interface and whether XDP is on it.
type InterfaceView struct {
	Name      string `json:"name"`
	Attached  bool   `json:"attached"`
	ProgramID uint32 `json:"program_id,omitempty"`
}

// Counts summarize the configuration and its health.
type Counts struct {
	Pools           int `json:"pools"`
	Backends        int `json:"backends"`
	HealthyBackends int `json:"healthy_backends"`
	VIPs            int `json:"vips"`
	Routes          int `json:"routes"`
	DenyPrefixes    int `json:"deny_prefixes"`
}

// ReconcileView describes the last reconcile.
type ReconcileView struct {
	At         time.Time `json:"at"`
	DurationMs float64   `json:"duration_ms"`
	Result     string    `json:"result"`
	Error      string    `json:"error,omitempty"`
}

// BackendView is one pool member with its health, state and counters.
type BackendView struct {
	ID      string `json:"id"` // pool:address:port
	Pool    string `json:"pool"`
	Address string `json:"address"`
	Port    int    `json:"port"`
	Weight  uint32 `json:"weight"`
	// EffectiveWeight is what new flows see: 0 while drained or down.
	EffectiveWeight uint32    `json:"effective_weight"`
	State           string    `json:"state"` // up | down | draining
	Healthy         bool      `json:"healthy"`
	Drained         bool      `json:"drained"`
	LastCheck       time.Time `json:"last_check"`
	CheckLatencyMs  float64   `json:"check_latency_ms"`
	LastError       string    `json:"last_error,omitempty"`
	RealID          uint32    `json:"real_id,omitempty"`
	Packets         uint64    `json:"packets"`
	Bytes           uint64    `json:"bytes"`
}

// FlowView is one conntrack entry.
type FlowView struct {
	Client   string `json:"client"`
	VIP      string `json:"vip"`
	Protocol string `json:"protocol"`
	RealID   uint32 `json:"real_id"`
	Real     string `json:"real"`
	IdleMs   int64  `json:"idle_ms"`
}

// Rates are per-second rates over the last sampling interval.
type Rates struct {
	PPS        float64 `json:"pps"`
	BPS        float64 `json:"bps"` // bits per second
	NewFlowsPS float64 `json:"new_flows_per_s"`
	DropsPS    float64 `json:"drops_per_s"`
}

// VIPMetrics are one VIP's totals and rates.
type VIPMetrics struct {
	snapshot.VIPCounters
	Rates Rates `json:"rates"`
}

// MetricsView is GET /api/metrics and the metrics channel's payload.
type MetricsView struct {
	At              time.Time                 `json:"at"`
	IntervalSeconds float64                   `json:"interval_seconds"`
	VIPs            []VIPMetrics              `json:"vips"`
	Total           Rates                     `json:"total"`
	Verdicts        map[string]uint64         `json:"xdp_verdicts"`       // totals by verdict
	VerdictRates    map[string]float64        `json:"xdp_verdicts_per_s"` // per second
	Drops           map[string]uint64         `json:"drops"`              // totals by drop reason
	DropRates       map[string]float64        `json:"drops_per_s"`
	Reasons         []snapshot.ReasonCounters `json:"reasons"`
	// L7 joins when the proxy runs; absent until then.
	L7 *L7Rates `json:"l7,omitempty"`
}

// BGPView is GET /api/bgp: the speaker's sessions and what it announces.
type BGPView struct {
	Enabled     bool              `json:"enabled"`
	ASN         uint32            `json:"asn,omitempty"`
	RouterID    string            `json:"router_id,omitempty"`
	NodeDrained bool              `json:"node_drained"`
	Peers       []BGPPeerView     `json:"peers"`
	VIPs        []BGPAnnounceView `json:"vips"`
}

// BGPPeerView is one session.
type BGPPeerView struct {
	Address string `json:"address"`
	ASN     uint32 `json:"asn"`
	State   string `json:"state"` // idle | connect | active | opensent | openconfirm | established
	Up      bool   `json:"up"`
	// UptimeSeconds is how long the session has been established, or
	// down when it is not.
	UptimeSeconds float64  `json:"uptime_seconds"`
	Transitions   uint64   `json:"transitions"`
	LastError     string   `json:"last_error,omitempty"`
	RoutesSent    []string `json:"routes_sent"`
}

// BGPAnnounceView is one VIP address and whether this node announces it.
type BGPAnnounceView struct {
	Address   string `json:"address"`
	Announced bool   `json:"announced"`
}

// RingView describes a VIP's installed Maglev ring. Nodes that build the
// same table for a VIP show the same fingerprint.
type RingView struct {
	Fingerprint  string `json:"fingerprint"` // 13 hex digits
	LiveBackends int    `json:"live_backends"`
}
