package api

import (
	"net/http"
	"strings"
	"testing"
)

// corsRequest sends method to path with an Origin header (and the preflight
// headers for OPTIONS) and returns the response's status and headers.
func corsRequest(t *testing.T, ts *testServer, method, path, origin string) (int, http.Header) {
	t.Helper()
	req, err := http.NewRequest(method, ts.URL+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Origin", origin)
	if method == http.MethodOptions {
		req.Header.Set("Access-Control-Request-Method", http.MethodPost)
		req.Header.Set("Access-Control-Request-Headers", "authorization,content-type")
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode, resp.Header
}

// corsHeaders returns the Access-Control-Allow-* headers of a response.
func corsHeaders(h http.Header) map[string]string {
	out := map[string]string{}
	for k := range h {
		if strings.HasPrefix(k, "Access-Control-Allow-") {
			out[k] = h.Get(k)
		}
	}
	return out
}

// api.allowed_origins admits browser pages of the listed origins to the
// REST API (as it does to the WebSocket channels): simple requests get
// Access-Control-Allow-Origin, preflights get the methods of the path and
// the headers the API reads. Other origins get no CORS headers at all.
func TestCORS(t *testing.T) {
	const listed = "https://ops.example.com"
	ts := newTestServer(t, false, HubOptions{AllowedOrigins: []string{"https://OPS.example.com/"}})

	status, h := corsRequest(t, ts, http.MethodGet, "/api/status", listed)
	if status != 200 || h.Get("Access-Control-Allow-Origin") != listed {
		t.Errorf("GET from %s: %d, Access-Control-Allow-Origin %q", listed, status, h.Get("Access-Control-Allow-Origin"))
	}
	if !strings.Contains(strings.Join(h.Values("Vary"), ","), "Origin") {
		t.Errorf("GET from %s: Vary %q lacks Origin, so a cache could serve one origin's answer to another", listed, h.Values("Vary"))
	}

	status, h = corsRequest(t, ts, http.MethodOptions, "/api/pools", listed)
	if status != http.StatusNoContent || h.Get("Access-Control-Allow-Origin") != listed {
		t.Fatalf("preflight from %s: %d %v", listed, status, corsHeaders(h))
	}
	if m := h.Get("Access-Control-Allow-Methods"); !strings.Contains(m, "POST") || !strings.Contains(m, "GET") || strings.Contains(m, "PUT") {
		t.Errorf("preflight Access-Control-Allow-Methods %q, want the methods of /api/pools: GET and POST", m)
	}
	if got := strings.ToLower(h.Get("Access-Control-Allow-Headers")); !strings.Contains(got, "authorization") ||
		!strings.Contains(got, "content-type") {
		t.Errorf("preflight Access-Control-Allow-Headers %q, want Authorization and Content-Type", got)
	}

	for _, method := range []string{http.MethodGet, http.MethodOptions} {
		if _, h := corsRequest(t, ts, method, "/api/pools", "https://evil.example.net"); len(corsHeaders(h)) != 0 {
			t.Errorf("%s from an origin not listed got CORS headers %v", method, corsHeaders(h))
		}
	}

	// A reload's new list applies to the next request.
	ts.hub.SetAllowedOrigins([]string{"https://other.example.com"})
	if _, h := corsRequest(t, ts, http.MethodGet, "/api/status", listed); len(corsHeaders(h)) != 0 {
		t.Errorf("origin removed by a reload still got CORS headers %v", corsHeaders(h))
	}
	if _, h := corsRequest(t, ts, http.MethodGet, "/api/status", "https://other.example.com"); h.Get("Access-Control-Allow-Origin") == "" {
		t.Error("origin added by a reload got no Access-Control-Allow-Origin")
	}

	// Without allowed_origins no origin is admitted (echo's default would be "*").
	none := newTestServer(t, false, HubOptions{})
	if _, h := corsRequest(t, none, http.MethodOptions, "/api/pools", listed); len(corsHeaders(h)) != 0 {
		t.Errorf("no allowed_origins, yet a preflight got CORS headers %v", corsHeaders(h))
	}
	any := newTestServer(t, false, HubOptions{AllowedOrigins: []string{"*"}})
	if _, h := corsRequest(t, any, http.MethodGet, "/api/status", "https://anywhere.example.org"); h.Get("Access-Control-Allow-Origin") == "" {
		t.Error(`allowed_origins ["*"], yet a GET got no Access-Control-Allow-Origin`)
	}
}
