package install

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/veloflux/veloflux/tests/lab"
)

// sendRequests makes n requests, each on a new connection (a new flow),
// from the client to the VIP; all must be answered, by both backends.
func sendRequests(t *testing.T, ctx context.Context, l *lab.Lab, n int) {
	t.Helper()
	client := &http.Client{
		Transport: &http.Transport{DialContext: l.Client.DialContext, DisableKeepAlives: true},
		Timeout:   5 * time.Second,
	}
	defer client.CloseIdleConnections()
	url := "http://" + net.JoinHostPort(vip.String(), strconv.Itoa(lab.HTTPPort)) + "/"
	by := map[string]int{}
	for i := range n {
		body, err := get(ctx, client, url)
		if err != nil {
			t.Fatalf("request %d/%d through the VIP: %v (so far: %v)", i+1, n, err, by)
		}
		by[body]++
	}
	if len(by) != len(l.Backends) {
		t.Errorf("%d requests went to %v, want all %d backends", n, by, len(l.Backends))
	}
	t.Logf("%d/%d requests through the VIP answered: %v", n, n, by)
}

func get(ctx context.Context, client *http.Client, url string) (string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return "", err
	}
	resp, err := client.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", fmt.Errorf("%s: read body: %w", url, err)
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("%s: %s", url, resp.Status)
	}
	return strings.TrimSpace(string(b)), nil
}

// stream is one client TCP connection to the VIP making a request every
// 100 ms until stopped; the first failure ends it.
type stream struct {
	cancel context.CancelFunc
	done   chan struct{}

	mu      sync.Mutex
	n       int
	backend string
	err     error
}

func startStream(ctx context.Context, l *lab.Lab) *stream {
	ctx, cancel := context.WithCancel(ctx)
	s := &stream{cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(s.done)
		err := s.loop(ctx, l)
		if ctx.Err() != nil {
			// Stopped: a request cut short by stop is no failure.
			err = nil
		}
		s.mu.Lock()
		s.err = err
		s.mu.Unlock()
	}()
	return s
}

func (s *stream) loop(ctx context.Context, l *lab.Lab) error {
	addr := net.JoinHostPort(vip.String(), strconv.Itoa(lab.HTTPPort))
	conn, err := l.Client.DialContext(ctx, "tcp", addr)
	if err != nil {
		return fmt.Errorf("connect to %s: %w", addr, err)
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Now()) })
	defer stop()
	br := bufio.NewReader(conn)
	for ctx.Err() == nil {
		next := s.count() + 1
		if err := conn.SetDeadline(time.Now().Add(5 * time.Second)); err != nil {
			return err
		}
		if _, err := fmt.Fprintf(conn, "GET / HTTP/1.1\r\nHost: %s\r\n\r\n", addr); err != nil {
			return fmt.Errorf("request %d: %w", next, err)
		}
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			return fmt.Errorf("response %d: %w", next, err)
		}
		body, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil {
			return fmt.Errorf("response %d: read body: %w", next, err)
		}
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("response %d: %s", next, resp.Status)
		}
		b := strings.TrimSpace(string(body))
		s.mu.Lock()
		if s.backend == "" {
			s.backend = b
		}
		first := s.backend
		s.n++
		s.mu.Unlock()
		if b != first {
			return fmt.Errorf("response %d came from %s, the flow's earlier ones from %s", next, b, first)
		}
		select {
		case <-ctx.Done():
		case <-time.After(100 * time.Millisecond):
		}
	}
	return nil
}

func (s *stream) count() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.n
}

// waitRequests waits until the stream has made n requests; it fails t if
// the stream ends first or takes more than a minute.
func (s *stream) waitRequests(t *testing.T, n int) {
	t.Helper()
	deadline := time.After(time.Minute)
	for s.count() < n {
		select {
		case <-s.done:
			t.Fatalf("stream ended after %d requests: %v", s.count(), s.err)
		case <-deadline:
			t.Fatalf("stream made %d requests in a minute, want %d", s.count(), n)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// stop ends the stream and returns what broke it, if anything did.
func (s *stream) stop() error {
	s.cancel()
	<-s.done
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}
