// Package snapshot holds the plain types that several agent packages exchange:
// counter snapshots read from the data plane and the health view of
// backends. It does no I/O, so any package may import it without pulling in
// BPF, HTTP or the file system.
package snapshot

import "time"

// VIPCounters are one VIP's cumulative counters since its id was assigned.
type VIPCounters struct {
	VIP      string `json:"vip"` // "10.0.0.1:80/tcp"; port 0 is every port
	Address  string `json:"address"`
	Port     uint16 `json:"port"`
	Protocol string `json:"protocol"`
	Mode     string `json:"mode"`
	Pool     string `json:"pool"`
	ID       uint32 `json:"id"`
	Packets  uint64 `json:"packets"`
	Bytes    uint64 `json:"bytes"`
	NewFlows uint64 `json:"new_flows"`
	Drops    uint64 `json:"drops"`
}

// BackendCounters are one pool member's data-plane counters. The data path
// counts per real (address), so a real listed in several pools reports the
// same counters in each.
type BackendCounters struct {
	Pool    string `json:"pool"`
	Backend string `json:"backend"` // "10.0.0.11:80"
	Address string `json:"address"`
	Port    uint16 `json:"port"`
	RealID  uint32 `json:"real_id"`
	State   string `json:"state"` // up | draining | down, as the data path has it
	Packets uint64 `json:"packets"`
	Bytes   uint64 `json:"bytes"`
}

// ReasonCounters count the packets that ended under one reason.
type ReasonCounters struct {
	Reason  string `json:"reason"`
	Verdict string `json:"verdict"` // pass | drop | tx
	// Drop: the reason's verdict drops the packet (the producer decides,
	// so consumers need not know the verdicts' names).
	Drop    bool   `json:"-"`
	Packets uint64 `json:"packets"`
	Bytes   uint64 `json:"bytes"`
}

// Counters is one read of every data-plane counter.
type Counters struct {
	At       time.Time         `json:"at"`
	VIPs     []VIPCounters     `json:"vips"`
	Backends []BackendCounters `json:"backends"`
	Reasons  []ReasonCounters  `json:"reasons"`
}

// CounterSource reads the counters; every call reads the maps afresh.
type CounterSource interface {
	Counters() (Counters, error)
}

// BackendHealth is a backend's active health-check view.
type BackendHealth struct {
	Pool      string        `json:"pool"`
	Backend   string        `json:"backend"`
	Healthy   bool          `json:"healthy"`
	Since     time.Time     `json:"since"`
	LastCheck time.Time     `json:"last_check"`
	Latency   time.Duration `json:"latency_ns"`
	LastError string        `json:"last_error,omitempty"`
}
