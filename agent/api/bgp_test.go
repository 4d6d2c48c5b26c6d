package api

import (
	"net/http"
	"testing"
)

func TestNodeDrainNeedsTokenAndReachesController(t *testing.T) {
	ts := newTestServer(t, false, HubOptions{})
	if code, _, _ := ts.do(t, http.MethodPost, "/api/node/drain", "", false); code != http.StatusUnauthorized {
		t.Fatalf("POST /api/node/drain without a token = %d, want 401", code)
	}
	code, body, _ := ts.do(t, http.MethodPost, "/api/node/drain", "", true)
	if code != http.StatusOK || body["node_drained"] != true {
		t.Fatalf("POST /api/node/drain = %d %v, want 200 with node_drained", code, body)
	}
	if !ts.ctl.nodeDrained {
		t.Fatal("the controller was not told to drain the node")
	}
	code, body, _ = ts.do(t, http.MethodDelete, "/api/node/drain", "", true)
	if code != http.StatusOK || body["node_drained"] != false || ts.ctl.nodeDrained {
		t.Fatalf("DELETE /api/node/drain = %d %v, want the node undrained", code, body)
	}
	code, body, _ = ts.do(t, http.MethodGet, "/api/bgp", "", false)
	vips, _ := body["vips"].([]any)
	if code != http.StatusOK || body["enabled"] != true || len(vips) != 1 {
		t.Fatalf("GET /api/bgp = %d %v", code, body)
	}
}

func TestVIPListShowsRing(t *testing.T) {
	ts := newTestServer(t, false, HubOptions{})
	code, _, arr := ts.do(t, http.MethodGet, "/api/vips", "", false)
	if code != http.StatusOK || len(arr) != 1 {
		t.Fatalf("GET /api/vips = %d %v", code, arr)
	}
	ring, _ := arr[0].(map[string]any)["ring"].(map[string]any)
	if ring["fingerprint"] != "00000000000ab" || ring["live_backends"] != float64(2) {
		t.Errorf("vip ring = %v, want the controller's fingerprint and live backends", ring)
	}
}
