package api

import (
	"bytes"
	"encoding/json"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"
)

// The authentication scheme is case-insensitive (RFC 7235 section 2.1):
// "bearer", "BEARER" and "Bearer" all carry the token.
func TestBearerSchemeIsCaseInsensitive(t *testing.T) {
	ts := newTestServer(t, true, HubOptions{})
	for _, scheme := range []string{"Bearer", "bearer", "BEARER", "bEaReR"} {
		for _, sep := range []string{" ", "   "} {
			req, _ := http.NewRequest("GET", ts.URL+"/api/pools", nil)
			req.Header.Set("Authorization", scheme+sep+testToken)
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != 200 {
				t.Errorf("Authorization: %q: %d, want 200", scheme+sep+"<token>", resp.StatusCode)
			}
		}
	}
	for _, header := range []string{"Basic " + testToken, "Bearer", "Bearer" + testToken, testToken} {
		req, _ := http.NewRequest("GET", ts.URL+"/api/pools", nil)
		req.Header.Set("Authorization", header)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 401 {
			t.Errorf("Authorization: %q: %d, want 401", header, resp.StatusCode)
		}
	}
}

// lockedBuffer is a log sink the handler and the report timer may share.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

// A client hammering the API with a wrong token costs a bounded number of
// log records and security events, each with the number of failures it
// stands for, and no failure goes unaccounted for.
func TestAuthFailuresAreReportedAtABoundedRate(t *testing.T) {
	var logs lockedBuffer
	var mu sync.Mutex
	var events []SecurityEvent
	hub := NewHub(HubOptions{})
	t.Cleanup(hub.Close)
	srv := New(Options{Controller: newFake(t), Hub: hub, Token: testToken, ProtectReads: true,
		Logger: slog.New(slog.NewJSONHandler(&logs, nil)),
		SecurityEvents: func(e SecurityEvent) {
			mu.Lock()
			events = append(events, e)
			mu.Unlock()
		}})

	const attempts = 1000
	for i := range attempts {
		req := httptest.NewRequest("GET", "/api/pools", nil)
		req.RemoteAddr = "192.0.2.9:40000"
		if i%2 == 0 {
			req.Header.Set("Authorization", "Bearer wrong-token-wrong-token")
		}
		rec := httptest.NewRecorder()
		srv.Handler().ServeHTTP(rec, req)
		if rec.Code != 401 {
			t.Fatalf("attempt %d: %d, want 401", i, rec.Code)
		}
	}
	srv.Close() // as the agent does when it stops: report what is held back

	logs.mu.Lock()
	dec := json.NewDecoder(&logs.buf)
	logs.mu.Unlock()
	records, logged := 0, 0
	for dec.More() {
		var rec struct {
			Msg      string `json:"msg"`
			Failures int    `json:"failures"`
			Remote   string `json:"remote"`
		}
		if err := dec.Decode(&rec); err != nil {
			t.Fatal(err)
		}
		if rec.Msg != "API authentication failed" {
			continue
		}
		records++
		logged += rec.Failures
		if rec.Remote != "192.0.2.9" {
			t.Errorf("log record names remote %q, want 192.0.2.9", rec.Remote)
		}
	}
	if records == 0 || records > 3 || logged != attempts {
		t.Errorf("%d failures gave %d log records counting %d failures, want 1 to 3 records counting all %d",
			attempts, records, logged, attempts)
	}

	mu.Lock()
	defer mu.Unlock()
	reported := 0
	for _, e := range events {
		reported += e.Count
	}
	if len(events) == 0 || len(events) > 3 || reported != attempts {
		t.Errorf("%d failures gave %d security events counting %d, want 1 to 3 events counting all %d",
			attempts, len(events), reported, attempts)
	}
}

// Failures held back after a report go out on their own once the interval
// has passed, without waiting for another failure or a shutdown.
func TestAuthFailureReporterFlushesHeldBackFailures(t *testing.T) {
	reports := make(chan SecurityEvent, 4)
	r := newAuthFailureReporter(20*time.Millisecond, slog.New(slog.DiscardHandler), func(e SecurityEvent) { reports <- e })
	t.Cleanup(r.close)
	for _, path := range []string{"/a", "/b", "/c"} {
		r.failed(SecurityEvent{Kind: "auth_failure", Path: path})
	}
	for _, want := range []struct {
		count int
		path  string
	}{{1, "/a"}, {2, "/c"}} {
		select {
		case e := <-reports:
			if e.Count != want.count || e.Path != want.path {
				t.Errorf("report %+v, want %d failures, the latest on %s", e, want.count, want.path)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("no report of %d failures within 5s", want.count)
		}
	}
}
