package api

import (
	"time"

	"github.com/veloflux/veloflux/agent/billing"
	"github.com/veloflux/veloflux/agent/insights"
	"github.com/veloflux/veloflux/agent/snapshot"
)

// The WebSocket contract: the data of every message type of the seven
// channels, one named type each, so that the contract reads in one file and
// the compiler checks its producers. docs/ARCHITECTURE.md lists the same
// fields; TestMessageFieldsMatchTheDocument holds the two together.

// Message types, by channel. Every channel starts with MsgConnected, then
// the channel's current state.
const (
	MsgConnected = "connected" // ConnectedData, on every channel
	MsgPong      = "pong"      // PongData, the answer to {"type":"ping"}
	MsgError     = "error"     // ErrorData, the answer to any other client frame

	MsgMetricsUpdate   = "metrics_update"   // MetricsView (metrics)
	MsgBackendUpdate   = "backend_update"   // BackendUpdate (backends)
	MsgStatusUpdate    = "status_update"    // StatusView (status)
	MsgHealthStatus    = "health_status"    // HealthStatus (health)
	MsgHealthEvent     = "health_event"     // HealthEvent (health)
	MsgSecurityEvent   = "security_event"   // SecurityEventData (security)
	MsgSecuritySummary = "security_summary" // SecuritySummary (security)
	MsgUsageUpdate     = billing.UpdateType // UsageUpdate (billing)
	MsgAIStatus        = "ai_status"        // AIStatus (ai)
	MsgInsight         = "insight"          // Insight (ai)
)

// ConnectedData greets a new client.
type ConnectedData struct {
	ClientID string `json:"client_id"` // YYYYMMDDhhmmss-xxxxxx
	Status   string `json:"status"`    // "connected"
	Channel  string `json:"channel"`
}

// PongData answers a ping.
type PongData struct {
	ClientID string `json:"client_id"`
}

// ErrorData answers a client frame that is not a ping.
type ErrorData struct {
	Message string `json:"message"`
}

// BackendUpdate is every backend, each second.
type BackendUpdate struct {
	Backends []BackendView `json:"backends"`
}

// HealthStatus is every backend's health, on connect.
type HealthStatus struct {
	Backends []snapshot.BackendHealth `json:"backends"`
}

// HealthEvent is one verdict transition.
type HealthEvent struct {
	Key     string    `json:"key"` // pool/address:port
	Pool    string    `json:"pool"`
	Backend string    `json:"backend"` // address:port
	Healthy bool      `json:"healthy"`
	Reason  string    `json:"reason"`
	At      time.Time `json:"at"`
}

// Security event kinds.
const (
	SecurityDenylistDrop       = "denylist_drop"         // the data path dropped a denied source
	SecurityMalformed          = "malformed_packet"      // the data path dropped a malformed packet
	SecurityMartianSource      = "martian_source"        // the data path dropped a VIP packet from a martian source
	SecurityNewFlowRateLimited = "new_flow_rate_limited" // the data path dropped a new flow over its source's budget
	SecurityAuthFailure        = "auth_failure"          // API authentication failed
	// The L7 proxy's kinds ("rate_limited", and its client violations) are
	// passed through as it names them.
)

// SecurityEventData is one security event. Which fields are set depends on
// the kind: the data path's sampled drops carry the packet, API
// authentication failures the request, the L7 proxy's events the client.
type SecurityEventData struct {
	Kind     string `json:"kind"`
	Severity string `json:"severity"` // "warning"

	// Data path drops.
	Reason      string `json:"reason,omitempty"` // the drop reason, or why authentication failed
	PacketLen   uint32 `json:"packet_len,omitempty"`
	Protocol    *uint8 `json:"protocol,omitempty"` // IP protocol number
	Source      string `json:"source,omitempty"`   // address:port
	Destination string `json:"destination,omitempty"`

	// API authentication failures.
	Remote string     `json:"remote,omitempty"`
	Method string     `json:"method,omitempty"`
	Path   string     `json:"path,omitempty"`
	At     *time.Time `json:"at,omitempty"`
	Count  int        `json:"count,omitempty"` // failures this event stands for

	// L7 proxy events.
	ClientIP   string `json:"client_ip,omitempty"`
	Host       string `json:"host,omitempty"`
	Suppressed uint64 `json:"suppressed,omitempty"` // rejections of the same client not reported
	// Detail is what else the proxy said about a client violation, e.g.
	// the resets and the budget of an HTTP/2 reset flood.
	Detail map[string]string `json:"detail,omitempty"`
}

// SecuritySummary sums the security events since start and over the last
// window (every 10 s).
type SecuritySummary struct {
	Since              time.Time         `json:"since"`
	WindowSeconds      float64           `json:"window_seconds"`
	SampledDrops       map[string]uint64 `json:"sampled_drops"` // by reason or kind
	WindowSampledDrops map[string]uint64 `json:"window_sampled_drops"`
	AuthFailures       uint64            `json:"auth_failures"`
	WindowAuthFailures uint64            `json:"window_auth_failures"`
}

// UsageUpdate is this interval's and this month's usage per VIP and pool.
type UsageUpdate = billing.Snapshot

// Insight is one anomaly, forecast or latency outlier.
type Insight = insights.Insight

// AIStatus is the analysis's settings and its recent insights, on connect.
type AIStatus struct {
	Recent           []Insight `json:"recent"` // newest first
	WarmupSamples    int       `json:"warmup_samples"`
	ZThreshold       float64   `json:"z_threshold"`
	ForecastHorizonS float64   `json:"forecast_horizon_s"`
	OutlierZ         float64   `json:"outlier_z"`
}

// L7Rates is the L7 proxy's part of MetricsView.
type L7Rates struct {
	Requests           uint64             `json:"requests"`
	RequestsPerS       float64            `json:"requests_per_s"`
	StatusPerS         map[string]float64 `json:"status_per_s"` // by status class, "2xx"
	UpstreamErrorsPerS float64            `json:"upstream_errors_per_s"`
	BytesInPerS        float64            `json:"bytes_in_per_s"`
	BytesOutPerS       float64            `json:"bytes_out_per_s"`
	InFlight           int64              `json:"in_flight"`
	LatencyP50Seconds  float64            `json:"latency_p50_seconds"`
	LatencyP99Seconds  float64            `json:"latency_p99_seconds"`
	RateLimited        uint64             `json:"rate_limited"`
	Draining           bool               `json:"draining"`
}
