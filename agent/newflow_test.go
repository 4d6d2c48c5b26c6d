package agent

import (
	"testing"

	"github.com/veloflux/veloflux/agent/config"
	"github.com/veloflux/veloflux/agent/dataplane"
)

func TestSettingsFromNewFlowLimit(t *testing.T) {
	cfg := config.Default()
	if got := settingsFrom(cfg).NewFlowLimit; got != (dataplane.NewFlowLimit{}) {
		t.Fatalf("default new-flow limit %+v, want off", got)
	}
	cfg.Dataplane.NewFlowLimit = config.NewFlowLimit{RatePerSecond: 200, Burst: 400, TableSize: 4096}
	if got, want := settingsFrom(cfg).NewFlowLimit, (dataplane.NewFlowLimit{RatePerSecond: 200, Burst: 400}); got != want {
		t.Fatalf("new-flow limit %+v, want %+v", got, want)
	}
	// A burst left behind when the rate is set to 0 does not turn it on.
	cfg.Dataplane.NewFlowLimit.RatePerSecond = 0
	if got := settingsFrom(cfg).NewFlowLimit; got != (dataplane.NewFlowLimit{}) {
		t.Fatalf("new-flow limit %+v with rate 0, want off", got)
	}
}

func TestDropEventKinds(t *testing.T) {
	want := map[dataplane.Reason]string{
		dataplane.ReasonDropDenylist:           "denylist_drop",
		dataplane.ReasonDropMalformedL3:        "malformed_packet",
		dataplane.ReasonDropNewFlowRateLimited: "new_flow_rate_limited",
		dataplane.ReasonDropMartianVIP:         "martian_source",
		dataplane.ReasonDropMartianUnspec:      "martian_source",
		dataplane.ReasonDropMartianBroadcast:   "martian_source",
		dataplane.ReasonDropMartianMulticast:   "martian_source",
		dataplane.ReasonDropMartianLoopback:    "martian_source",
	}
	for r, kind := range want {
		if got := dropEventKind(r); got != kind {
			t.Errorf("%v: kind %q, want %q", r, got, kind)
		}
	}
}
