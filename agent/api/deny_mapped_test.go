package api

import (
	"net/url"
	"slices"
	"strings"
	"testing"
)

// POST /api/security/denylist stores an IPv4-mapped prefix as the IPv4
// prefix the data path matches IPv4 clients against, and refuses a mapped
// prefix shorter than /96 with the way to write it.
func TestDenyMappedPrefix(t *testing.T) {
	ts := newTestServer(t, false, HubOptions{})
	status, body, _ := ts.do(t, "POST", "/api/security/denylist", `{"prefix":"::ffff:10.77.0.2"}`, true)
	if status != 201 || body["prefix"] != "10.77.0.2/32" {
		t.Fatalf("deny ::ffff:10.77.0.2: %d %v, want 201 and 10.77.0.2/32", status, body)
	}
	if got := ts.ctl.Config().Security.Denylist; !slices.Equal(got, []string{"10.77.0.2/32"}) {
		t.Errorf("denylist %q, want [10.77.0.2/32]", got)
	}
	// The same client written plainly is already denied.
	if status, body, _ = ts.do(t, "POST", "/api/security/denylist", `{"prefix":"10.77.0.2"}`, true); status != 409 {
		t.Errorf("deny 10.77.0.2 again: %d %v, want 409", status, body)
	}

	status, body, _ = ts.do(t, "POST", "/api/security/denylist", `{"prefix":"::ffff:10.77.0.2/80"}`, true)
	if status != 400 {
		t.Fatalf("deny ::ffff:10.77.0.2/80: %d %v, want 400", status, body)
	}
	if _, msg, field := errorOf(t, body); field != "prefix" || !strings.Contains(msg, "10.77.0.2/32") {
		t.Errorf("error %q on %q does not say how to write the prefix", msg, field)
	}

	if status, _, _ = ts.do(t, "DELETE", "/api/security/denylist?prefix="+url.QueryEscape("::ffff:10.77.0.2"), "", true); status != 204 {
		t.Errorf("lift ::ffff:10.77.0.2: %d, want 204", status)
	}
	if got := ts.ctl.Config().Security.Denylist; len(got) != 0 {
		t.Errorf("denylist %q after lifting, want empty", got)
	}
}
