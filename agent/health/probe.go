package health

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"net/url"
)

// userAgent identifies health checks in backend access logs, so operators
// can filter them out.
const userAgent = "veloflux-health-check/1"

// newHTTPClient returns the client shared by every http check. Each probe's
// context carries its Spec.Timeout, which bounds the whole exchange
// (connect, request, response headers) just as http.Client.Timeout would,
// but per target.
func newHTTPClient() *http.Client {
	return &http.Client{
		Transport: &http.Transport{
			// Never route checks through HTTP_PROXY from the agent's
			// environment: the verdict must be about the backend.
			Proxy:       nil,
			DialContext: (&net.Dialer{}).DialContext,
			// A pooled connection would let a check pass against a
			// backend that no longer accepts connections.
			DisableKeepAlives:      true,
			DisableCompression:     true,
			MaxResponseHeaderBytes: 64 << 10,
		},
		// A redirect is the backend's answer; following it would check
		// some other server. Its status is compared like any other.
		CheckRedirect: func(*http.Request, []*http.Request) error {
			return http.ErrUseLastResponse
		},
	}
}

// probe runs one check of spec against addr, bounded by spec.Timeout. The
// returned error is the human reason for a failure.
func (c *Checker) probe(ctx context.Context, spec Spec, addr netip.AddrPort) error {
	ctx, cancel := context.WithTimeout(ctx, spec.Timeout)
	defer cancel()
	switch spec.Type {
	case TypeTCP:
		return probeTCP(ctx, spec, addr)
	case TypeHTTP:
		return c.probeHTTP(ctx, spec, addr)
	default:
		// Unreachable: Set validates types and never starts a loop for
		// type none.
		return fmt.Errorf("unsupported check type %q", spec.Type)
	}
}

// probeTCP passes if a TCP connection to addr can be established.
func probeTCP(ctx context.Context, spec Spec, addr netip.AddrPort) error {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", addr.String())
	if err != nil {
		if isTimeout(ctx, err) {
			return fmt.Errorf("dial tcp %s: timeout after %s", addr, spec.Timeout)
		}
		return err // "dial tcp 10.0.0.11:80: connect: connection refused"
	}
	// Close with RST rather than FIN: a FIN close would leave a TIME_WAIT
	// socket on the agent for every check, and at thousands of backends
	// probed every few seconds those exhaust the ephemeral ports.
	if tc, ok := conn.(*net.TCPConn); ok {
		_ = tc.SetLinger(0)
	}
	_ = conn.Close()
	return nil
}

// probeHTTP passes if GET spec.Path on addr answers spec.ExpectedStatus.
func (c *Checker) probeHTTP(ctx context.Context, spec Spec, addr netip.AddrPort) error {
	// Assembled from parts rather than by concatenation so that an IPv6
	// zone ("fe80::1%eth0") is escaped in the URL instead of being taken
	// for a percent-encoding.
	u, err := url.ParseRequestURI(spec.Path)
	if err != nil {
		return fmt.Errorf("GET %s on %s: invalid path: %w", spec.Path, addr, err)
	}
	u.Scheme, u.Host = "http", addr.String()
	target := u.String()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, target, nil)
	if err != nil {
		return fmt.Errorf("GET %s: %w", target, err)
	}
	req.Header.Set("User-Agent", userAgent)
	resp, err := c.client.Do(req)
	if err != nil {
		if isTimeout(ctx, err) {
			return fmt.Errorf("GET %s: timeout after %s", target, spec.Timeout)
		}
		// *url.Error repeats the method and URL in its own format;
		// unwrap it so the reason reads like the TCP ones.
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err
		}
		return fmt.Errorf("GET %s: %w", target, err)
	}
	// The body is irrelevant, and without keep-alives there is no
	// connection to save by draining it.
	_ = resp.Body.Close()
	if resp.StatusCode != spec.ExpectedStatus {
		return fmt.Errorf("GET %s: status %d, want %d", target, resp.StatusCode, spec.ExpectedStatus)
	}
	return nil
}

// isTimeout reports whether err is the probe's own timeout firing, as
// opposed to, say, a refused connection.
func isTimeout(ctx context.Context, err error) bool {
	if errors.Is(ctx.Err(), context.DeadlineExceeded) || errors.Is(err, context.DeadlineExceeded) {
		return true
	}
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
