package dataplane

import "testing"

// The reason names are read from the program's BTF; they are metric labels
// and counter names, so each reason must get one, distinct from the others,
// and the spelling operators already see.
func TestReasonNamesFromBTF(t *testing.T) {
	seen := map[string]Reason{}
	for _, r := range Reasons() {
		name := r.String()
		if name == "" || name == reasonFallbackName(r) {
			t.Errorf("reason %d has no name", uint32(r))
			continue
		}
		if other, dup := seen[name]; dup {
			t.Errorf("reasons %d and %d are both %q", uint32(other), uint32(r), name)
		}
		seen[name] = r
	}
	for r, want := range map[Reason]string{
		ReasonPassNotIP:              "pass_not_ip",
		ReasonPassIPv6ExtLimit:       "pass_ipv6_ext_limit",
		ReasonDropMartianUnspec:      "drop_martian_unspecified",
		ReasonDropNewFlowRateLimited: "drop_new_flow_rate_limited",
		ReasonTxIPIP:                 "tx_ipip",
		ReasonTxGUE:                  "tx_gue",
	} {
		if got := r.String(); got != want {
			t.Errorf("reason %d is %q, want %q", uint32(r), got, want)
		}
	}
	if got, want := Reason(numReasons).String(), reasonFallbackName(Reason(numReasons)); got != want {
		t.Errorf("reason past the last is %q, want %q", got, want)
	}
}

// Each verdict group of enum vf_reason, as its markers bound it.
func TestReasonVerdictGroups(t *testing.T) {
	for _, c := range []struct {
		r    Reason
		want Verdict
	}{
		{ReasonPassNotIP, VerdictPass}, {ReasonPassIfaceUnknown, VerdictPass},
		{ReasonDropMalformedL2, VerdictDrop}, {ReasonDropNewFlowRateLimited, VerdictDrop},
		{ReasonTxDSR, VerdictTx}, {ReasonTxIPIP, VerdictTx}, {ReasonTxGUE, VerdictTx}, {Reason(numReasons), VerdictPass},
	} {
		if got := c.r.Verdict(); got != c.want {
			t.Errorf("%v: verdict %v, want %v", c.r, got, c.want)
		}
	}
}
