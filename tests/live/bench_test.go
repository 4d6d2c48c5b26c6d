package live

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"golang.org/x/sys/unix"

	"github.com/veloflux/veloflux/tests/lab"

	"github.com/veloflux/veloflux/tests/testenv"
)

// Benchmark settings; the run must stay well under two minutes.
const (
	wsClients     = 1000
	wsDialers     = 50               // concurrent handshakes while connecting
	wsIdleWindow  = 5 * time.Second  // agent CPU with no WebSocket client
	wsWindow      = 15 * time.Second // the measured window with every client
	scrapeVIPs    = 1000
	scrapeCount   = 20
	scrapeRing    = 4099 // Maglev ring per VIP; the scrape never reads rings
	benchLogLevel = "warn"
)

// windowFromEnv lets LIVE_BENCH_WINDOW (a Go duration, at least 15s) stretch
// the measured window.
func windowFromEnv() time.Duration {
	if d, err := time.ParseDuration(os.Getenv("LIVE_BENCH_WINDOW")); err == nil && d >= wsWindow {
		return d
	}
	return wsWindow
}

// raiseNoFile makes room for the clients' sockets (the agent, a Go program,
// raises its own soft limit to the hard one).
func raiseNoFile(tb testing.TB, need uint64) {
	var lim unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		tb.Fatal(err)
	}
	if lim.Cur >= need {
		return
	}
	if lim.Max < need {
		tb.Skipf("RLIMIT_NOFILE hard limit %d < %d sockets needed", lim.Max, need)
	}
	lim.Cur = need
	if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		tb.Fatal(err)
	}
}

// wsClient is one subscriber of the metrics channel.
type wsClient struct {
	conn      *websocket.Conn
	mu        sync.Mutex
	got       []delivery // metrics_update messages after the greeting
	closeCode int        // the server's close code, if it closed
	err       error
	done      chan struct{}
}

// delivery is one metrics_update: the sample time it carries (data.at) and
// when the client had read it.
type delivery struct {
	at, recv time.Time
}

func (c *wsClient) run() {
	defer close(c.done)
	for {
		_, data, err := c.conn.ReadMessage()
		recv := time.Now()
		if err != nil {
			c.mu.Lock()
			c.err = err
			var ce *websocket.CloseError
			if errors.As(err, &ce) {
				c.closeCode = ce.Code
			}
			c.mu.Unlock()
			return
		}
		var m struct {
			Type string `json:"type"`
			Data struct {
				At time.Time `json:"at"`
			} `json:"data"`
		}
		if json.Unmarshal(data, &m) != nil || m.Type != "metrics_update" {
			continue
		}
		c.mu.Lock()
		c.got = append(c.got, delivery{at: m.Data.At, recv: recv})
		c.mu.Unlock()
	}
}

// connectClient dials the metrics channel and reads the greeting
// (connected, then the current metrics_update) before handing the
// connection to its reader.
func connectClient(ctx context.Context, e *env) (*wsClient, error) {
	conn, err := e.dialWS(ctx, "metrics")
	if err != nil {
		return nil, err
	}
	conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	for i, want := range []string{"connected", "metrics_update"} {
		var m struct {
			Type string `json:"type"`
		}
		if err := conn.ReadJSON(&m); err != nil || m.Type != want {
			conn.Close()
			return nil, fmt.Errorf("greeting message %d: %q, %v; want %s", i+1, m.Type, err, want)
		}
	}
	conn.SetReadDeadline(time.Time{})
	c := &wsClient{conn: conn, done: make(chan struct{})}
	go c.run()
	return c, nil
}

func percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(p*float64(len(sorted))+0.5) - 1
	return sorted[max(0, min(i, len(sorted)-1))]
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
func mib(n int64) float64        { return float64(n) / (1 << 20) }

// BenchmarkWebSocketMetrics1000Clients: 1,000 gorilla/websocket clients on
// the metrics channel (1 Hz), for 15 s. It reports the agent's CPU (as % of
// one core, from utime+stime) with no client and with all of them, its RSS,
// the time from the sample (data.at) to its delivery to each client (p50,
// p99 over every message to every client), how many clients got every
// message, and how many the agent cut off with 1013. The measurement runs
// once; use -benchtime 1x.
func BenchmarkWebSocketMetrics1000Clients(b *testing.B) {
	testenv.RequireRoot(b, "build network namespaces")
	raiseNoFile(b, 4*wsClients+1024)
	window := windowFromEnv()
	e := newEnv(b, vip)
	e.writeConfig(liveConfig(e))
	agent := e.startAgent(b, "--log-level", benchLogLevel)
	url := "http://" + netip.AddrPortFrom(vip, lab.HTTPPort).String() + "/"
	tr := startTraffic(b, e.lab.Client, url, 10, 2*time.Minute)
	pid := agent.Pid()

	// The agent alone.
	idle0, err := readProc(pid)
	if err != nil {
		b.Fatal(err)
	}
	time.Sleep(wsIdleWindow)
	idle1, err := readProc(pid)
	if err != nil {
		b.Fatal(err)
	}
	idleCPU := 100 * (idle1.cpu - idle0.cpu).Seconds() / idle1.at.Sub(idle0.at).Seconds()

	// Connect every client.
	connectStart := time.Now()
	clients := make([]*wsClient, wsClients)
	var next atomic.Int64
	var connectErr error
	var errOnce sync.Once
	var wg sync.WaitGroup
	ctx, cancel := context.WithTimeout(b.Context(), 60*time.Second)
	defer cancel()
	for range wsDialers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= wsClients || ctx.Err() != nil {
					return
				}
				c, err := connectClient(ctx, e)
				if err != nil {
					errOnce.Do(func() { connectErr = fmt.Errorf("client %d: %w", i, err); cancel() })
					return
				}
				clients[i] = c
			}
		}()
	}
	wg.Wait()
	defer func() {
		for _, c := range clients {
			if c != nil {
				c.conn.Close()
				<-c.done
			}
		}
	}()
	if connectErr != nil {
		b.Fatalf("connect %d clients: %v", wsClients, connectErr)
	}
	connectTime := time.Since(connectStart)

	time.Sleep(2 * time.Second) // every client past its greeting and a tick
	w0, err := readProc(pid)
	if err != nil {
		b.Fatal(err)
	}
	wStart := time.Now()
	time.Sleep(window)
	wEnd := time.Now()
	w1, err := readProc(pid)
	if err != nil {
		b.Fatal(err)
	}
	cpu := 100 * (w1.cpu - w0.cpu).Seconds() / w1.at.Sub(w0.at).Seconds()

	// Every sample the agent sent in the window, as seen by any client.
	// Messages still in flight at wEnd are counted if they arrive in the
	// next second.
	time.Sleep(time.Second)
	ticks := map[time.Time]bool{}
	var lat []time.Duration
	complete, cut1013, closedOther := 0, 0, 0
	perClient := make([]map[time.Time]bool, len(clients))
	for i, c := range clients {
		c.mu.Lock()
		perClient[i] = map[time.Time]bool{}
		for _, d := range c.got {
			if d.at.Before(wStart) || !d.at.Before(wEnd) {
				continue
			}
			ticks[d.at] = true
			perClient[i][d.at] = true
			lat = append(lat, d.recv.Sub(d.at))
		}
		switch {
		case c.closeCode == 1013:
			cut1013++
		case c.err != nil:
			closedOther++
		}
		c.mu.Unlock()
	}
	for _, seen := range perClient {
		if len(seen) == len(ticks) {
			complete++
		}
	}
	slices.Sort(lat)
	p50, p99, pmax := percentile(lat, 0.50), percentile(lat, 0.99), percentile(lat, 1)
	// Per tick: when the first and the last client had the message; the
	// medians over the ticks split the delay into "before the fan-out"
	// (sampling, encoding) and "the fan-out" (1,000 writes and reads).
	first, last := map[time.Time]time.Duration{}, map[time.Time]time.Duration{}
	for _, c := range clients {
		c.mu.Lock()
		for _, d := range c.got {
			if !ticks[d.at] {
				continue
			}
			l := d.recv.Sub(d.at)
			if f, ok := first[d.at]; !ok || l < f {
				first[d.at] = l
			}
			if l > last[d.at] {
				last[d.at] = l
			}
		}
		c.mu.Unlock()
	}
	var firsts, lasts []time.Duration
	for at := range ticks {
		firsts, lasts = append(firsts, first[at]), append(lasts, last[at])
	}
	slices.Sort(firsts)
	slices.Sort(lasts)

	b.Logf("setup: lab with 3 backends, agent with 2 dsr VIPs (tcp:80, udp:7001), 10 HTTP GET/s through the VIP; %s", tr)
	b.Logf("connected %d clients in %s (%d concurrent handshakes, dialing from the test process into the balancer namespace)",
		wsClients, connectTime.Round(time.Millisecond), wsDialers)
	b.Logf("agent CPU: %.1f%% of one core idle (%s, no client), %.1f%% with %d clients (%s window); RSS %.1f MiB idle, %.1f MiB with the clients (peak %.1f MiB), %d threads",
		idleCPU, wsIdleWindow, cpu, wsClients, window, mib(idle1.rss), mib(w1.rss), mib(w1.hwm), w1.threads)
	b.Logf("ticks in the window: %d; messages: %d (want %d); sample-to-delivery p50 %s, p99 %s, max %s",
		len(ticks), len(lat), len(ticks)*wsClients, p50.Round(10*time.Microsecond), p99.Round(10*time.Microsecond),
		pmax.Round(10*time.Microsecond))
	b.Logf("per tick (median over the ticks): first client served after %s, last client after %s",
		percentile(firsts, 0.5).Round(10*time.Microsecond), percentile(lasts, 0.5).Round(10*time.Microsecond))
	b.Logf("clients that got every message: %d/%d; closed with 1013 (too slow): %d; otherwise closed: %d",
		complete, wsClients, cut1013, closedOther)

	b.ReportMetric(0, "ns/op")
	b.ReportMetric(cpu, "agent-cpu-%")
	b.ReportMetric(idleCPU, "idle-cpu-%")
	b.ReportMetric(mib(w1.rss), "rss-MiB")
	b.ReportMetric(ms(p50), "p50-ms")
	b.ReportMetric(ms(p99), "p99-ms")
	b.ReportMetric(ms(percentile(firsts, 0.5)), "first-ms")
	b.ReportMetric(ms(percentile(lasts, 0.5)), "last-ms")
	b.ReportMetric(float64(complete), "complete-clients")
	b.ReportMetric(float64(cut1013), "closed-1013")
	if len(ticks) < int(window/time.Second)-1 {
		b.Errorf("only %d ticks in a %s window", len(ticks), window)
	}
}

// BenchmarkMetricsScrape1000VIPs starts the agent with 1,000 VIPs (one pool
// of the three lab backends, health check none; the VIP addresses need not
// be reachable) and
// times 20 scrapes of :8080/metrics as Prometheus makes them (gzip, one
// kept-alive connection). It reports the median and p90 and the body size.
func BenchmarkMetricsScrape1000VIPs(b *testing.B) {
	testenv.RequireRoot(b, "build network namespaces")
	e := newEnv(b)
	var cfg strings.Builder
	cfg.WriteString(e.configHead(fmt.Sprintf("ring_size: %d", scrapeRing)))
	cfg.WriteString("pools:\n  - name: web\n    backends:\n")
	for _, be := range e.lab.Backends {
		fmt.Fprintf(&cfg, "      - {address: %s, port: %d}\n", be.Addr4, lab.HTTPPort)
	}
	// No active checks: the backends count as up from the start, so the
	// agent builds the 1,000 rings once, at start, and no health-driven
	// rebuild of every ring runs under the scrapes.
	cfg.WriteString("    health_check: {type: none}\nvips:\n")
	for i := range scrapeVIPs {
		fmt.Fprintf(&cfg, "  - {address: 198.18.%d.%d, port: 80, protocol: tcp, mode: dsr, pool: web}\n", i/250, i%250+1)
	}
	e.writeConfig(cfg.String())
	start := time.Now()
	agent := e.startAgent(b, "--log-level", benchLogLevel)
	ready := time.Since(start)

	hc := &http.Client{Timeout: 20 * time.Second,
		Transport: &http.Transport{DialContext: e.lab.Balancer.DialContext, DisableCompression: true}}
	defer hc.CloseIdleConnections()
	type scrape struct {
		took        time.Duration
		wire, plain int
		vips        int
	}
	get := func() (scrape, error) {
		req, _ := http.NewRequest(http.MethodGet, metricsURL, nil)
		req.Header.Set("Accept", "text/plain;version=0.0.4;q=1,*/*;q=0.1")
		req.Header.Set("Accept-Encoding", "gzip")
		t0 := time.Now()
		resp, err := hc.Do(req)
		if err != nil {
			return scrape{}, err
		}
		wire, err := io.ReadAll(resp.Body)
		took := time.Since(t0)
		resp.Body.Close()
		if err != nil || resp.StatusCode != http.StatusOK {
			return scrape{}, fmt.Errorf("status %d, %v", resp.StatusCode, err)
		}
		plain := wire
		if resp.Header.Get("Content-Encoding") == "gzip" {
			zr, err := gzip.NewReader(bytes.NewReader(wire))
			if err != nil {
				return scrape{}, err
			}
			if plain, err = io.ReadAll(zr); err != nil {
				return scrape{}, err
			}
		}
		return scrape{took: took, wire: len(wire), plain: len(plain),
			vips: bytes.Count(plain, []byte("\nveloflux_vip_info{"))}, nil
	}

	// Every VIP installed before timing.
	var s scrape
	var err error
	for deadline := time.Now().Add(60 * time.Second); ; {
		if s, err = get(); err == nil && s.vips == scrapeVIPs {
			break
		}
		if time.Now().After(deadline) {
			b.Fatalf("the agent does not show %d VIPs within 60s: %d, %v", scrapeVIPs, s.vips, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	installed := time.Since(start)

	var times []time.Duration
	for range scrapeCount {
		s, err = get()
		if err != nil {
			b.Fatal(err)
		}
		if s.vips != scrapeVIPs {
			b.Fatalf("a scrape shows %d VIPs, want %d", s.vips, scrapeVIPs)
		}
		times = append(times, s.took)
	}
	slices.Sort(times)
	med, p90 := percentile(times, 0.5), percentile(times, 0.9)
	ps, _ := readProc(agent.Pid())
	b.Logf("setup: agent with %d dsr VIPs on one pool of 3 backends (health check none), ring_size %d; /health 200 after %s, all VIPs on /metrics after %s",
		scrapeVIPs, scrapeRing, ready.Round(time.Millisecond), installed.Round(time.Millisecond))
	b.Logf("%d scrapes (gzip, keep-alive, from the test process into the balancer namespace): median %s, p90 %s, min %s, max %s",
		scrapeCount, med.Round(10*time.Microsecond), p90.Round(10*time.Microsecond),
		times[0].Round(10*time.Microsecond), times[len(times)-1].Round(10*time.Microsecond))
	b.Logf("body: %d bytes (%s KiB), %d bytes gzipped on the wire; agent RSS %.1f MiB", s.plain,
		strconv.FormatFloat(float64(s.plain)/1024, 'f', 0, 64), s.wire, mib(ps.rss))

	b.ReportMetric(0, "ns/op")
	b.ReportMetric(ms(med), "median-ms")
	b.ReportMetric(ms(p90), "p90-ms")
	b.ReportMetric(float64(s.plain), "body-bytes")
	b.ReportMetric(float64(s.wire), "gzip-bytes")
}
