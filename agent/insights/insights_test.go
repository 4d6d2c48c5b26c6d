package insights

import (
	"encoding/json"
	"fmt"
	"math"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"
)

const testVIP = "10.0.0.1:80/tcp"

var t0 = time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)

// sec is the time of the i-th one-second sample.
func sec(i int) time.Time { return t0.Add(time.Duration(i) * time.Second) }

// flat is a steady rate with a small deterministic ripple (±0.5%), standing
// in for the jitter of real traffic.
func flat(level float64, i int) float64 {
	return level * (1 + 0.005*math.Sin(0.7*float64(i)))
}

// feed sends samples i in [from, to) with pps = f(i), new flows = pps/10 and
// no drops, and returns every insight of the given kind.
func feed(a *Analyzer, from, to int, f func(i int) float64, kind Kind) []Insight {
	var out []Insight
	for i := from; i < to; i++ {
		x := f(i)
		for _, in := range a.ObserveVIP(sec(i), testVIP, x, flat(100, i), 0) {
			if in.Kind == kind {
				out = append(out, in)
			}
		}
	}
	return out
}

func TestDefaults(t *testing.T) {
	got := New(Config{}).Config()
	want := Config{
		Alpha: 0.1, ZThreshold: 3, Warmup: 30, Cooldown: 30 * time.Second,
		HoltAlpha: 0.3, HoltBeta: 0.1, Horizon: 5 * time.Minute, ForecastEvery: time.Minute,
		OutlierZ: 3.5, MinBackends: 3,
	}
	if got != want {
		t.Fatalf("defaults = %+v, want %+v", got, want)
	}
	bad := New(Config{Alpha: 1.5, HoltBeta: math.NaN(), ZThreshold: -1, MinBackends: 2}).Config()
	if bad.Alpha != 0.1 || bad.HoltBeta != 0.1 || bad.ZThreshold != 3 || bad.MinBackends != 3 {
		t.Fatalf("out-of-range fields not defaulted: %+v", bad)
	}
}

func TestFlatSeriesNoAnomaly(t *testing.T) {
	a := New(Config{})
	if got := feed(a, 0, 600, func(i int) float64 { return flat(1000, i) }, KindAnomaly); len(got) != 0 {
		t.Fatalf("flat series raised %d anomalies, first: %s", len(got), got[0].Explanation)
	}
	// An idle VIP (all zeros) must not divide by zero or alert.
	b := New(Config{})
	for i := range 100 {
		for _, in := range b.ObserveVIP(sec(i), testVIP, 0, 0, 0) {
			if in.Kind == KindAnomaly || math.IsNaN(in.Score) || math.IsInf(in.Score, 0) {
				t.Fatalf("idle series: %+v", in)
			}
		}
	}
}

func TestSpikeAnomalyAndCooldown(t *testing.T) {
	a := New(Config{})
	feed(a, 0, 100, func(i int) float64 { return flat(1000, i) }, KindAnomaly)

	// A 10× spike: exactly one anomaly, on pps only.
	got := feed(a, 100, 101, func(i int) float64 { return 10 * flat(1000, i) }, KindAnomaly)
	if len(got) != 1 {
		t.Fatalf("spike raised %d anomalies, want 1: %+v", len(got), got)
	}
	in := got[0]
	if in.Metric != MetricPPS || in.Subject != "vip "+testVIP || in.Score < 3 || in.Severity != SeverityCritical {
		t.Fatalf("spike insight = %+v", in)
	}
	if !strings.Contains(in.Explanation, testVIP) || !strings.Contains(in.Explanation, "above") {
		t.Fatalf("explanation %q should name the VIP and say above", in.Explanation)
	}
	if math.Abs(in.Baseline-1000) > 10 || in.Value != 10*flat(1000, 100) {
		t.Fatalf("baseline %.1f / value %.1f", in.Baseline, in.Value)
	}
	t.Log(in.Explanation)

	// The baseline absorbed the spike only partly: normal traffic right after
	// it is not an anomaly, and neither its baseline nor its z moved much.
	if got := feed(a, 101, 110, func(i int) float64 { return flat(1000, i) }, KindAnomaly); len(got) != 0 {
		t.Fatalf("normal samples after a spike raised %+v", got)
	}

	// A second spike 10s after the first is within the cooldown.
	if got := feed(a, 110, 111, func(i int) float64 { return 10 * flat(1000, i) }, KindAnomaly); len(got) != 0 {
		t.Fatalf("spike inside cooldown raised %+v", got)
	}
	// One 30s after the first is reported again.
	feed(a, 111, 130, func(i int) float64 { return flat(1000, i) }, KindAnomaly)
	if got := feed(a, 130, 131, func(i int) float64 { return 10 * flat(1000, i) }, KindAnomaly); len(got) != 1 {
		t.Fatalf("spike after cooldown raised %d anomalies, want 1", len(got))
	}
}

func TestSustainedShiftReportedOnceAndAbsorbed(t *testing.T) {
	a := New(Config{})
	feed(a, 0, 100, func(i int) float64 { return flat(1000, i) }, KindAnomaly)
	// A lasting 10× level shift: reported once, then it becomes the new
	// normal before the cooldown ends, so it is not reported again.
	got := feed(a, 100, 400, func(i int) float64 { return flat(10000, i) }, KindAnomaly)
	if len(got) != 1 {
		t.Fatalf("level shift raised %d anomalies, want 1", len(got))
	}
	s := a.vips[testVIP].series[vipPPS]
	if math.Abs(s.ew.mean-10000) > 50 {
		t.Fatalf("baseline %.1f did not adapt to the new level", s.ew.mean)
	}
}

func TestDropToZeroIsBelow(t *testing.T) {
	a := New(Config{})
	feed(a, 0, 60, func(i int) float64 { return flat(1000, i) }, KindAnomaly)
	got := feed(a, 60, 61, func(int) float64 { return 0 }, KindAnomaly)
	if len(got) != 1 {
		t.Fatalf("drop to 0 raised %d anomalies, want 1", len(got))
	}
	in := got[0]
	if in.Score > -3 || !strings.Contains(in.Explanation, "below") || strings.Contains(in.Explanation, "above") {
		t.Fatalf("drop insight = %+v", in)
	}
	t.Log(in.Explanation)
}

func TestWarmup(t *testing.T) {
	spikeAt := func(at int) func(int) float64 {
		return func(i int) float64 {
			if i == at {
				return 10000
			}
			return flat(1000, i)
		}
	}
	// Samples 0..29 build the baseline: a spike among them is not judged.
	a := New(Config{Warmup: 30})
	if got := feed(a, 0, 30, spikeAt(20), KindAnomaly); len(got) != 0 {
		t.Fatalf("spike during warm-up raised %+v", got)
	}
	// The 31st sample is the first one judged.
	b := New(Config{Warmup: 30})
	if got := feed(b, 0, 31, spikeAt(30), KindAnomaly); len(got) != 1 {
		t.Fatalf("spike right after warm-up raised %d anomalies, want 1", len(got))
	}
	// No forecast before the warm-up either.
	c := New(Config{Warmup: 30})
	if got := feed(c, 0, 30, func(i int) float64 { return flat(1000, i) }, KindForecast); len(got) != 0 {
		t.Fatalf("forecast during warm-up: %+v", got)
	}
}

// lastForecast feeds n samples of f at the given times and returns the last
// pps forecast.
func lastForecast(t *testing.T, a *Analyzer, n int, at func(i int) time.Time, f func(i int) float64) Insight {
	t.Helper()
	var last *Insight
	for i := range n {
		for _, in := range a.ObserveVIP(at(i), testVIP, f(i), 0, 0) {
			if in.Kind == KindForecast && in.Metric == MetricPPS {
				last = &in
			}
		}
	}
	if last == nil {
		t.Fatal("no forecast")
	}
	return *last
}

func TestForecastRamp(t *testing.T) {
	const n = 211 // the last sample, 210, falls on a forecast (30, 90, 150, 210)
	cases := []struct {
		name string
		at   func(i int) time.Time
		f    func(i int) float64
	}{
		{"exact", sec, func(i int) float64 { return 200 + 3*float64(i) }},
		// A ripple of ±1/s on top of the ramp. Holt's trend picks up part of
		// any ripple and the 300s horizon magnifies it (a ±1% ripple here
		// moves the forecast by about 7%), so this ripple is kept small next
		// to the slope.
		{"noisy", sec, func(i int) float64 { return 200 + 3*float64(i) + math.Sin(0.7*float64(i)) }},
		// Ticks 0.8s to 1.2s apart: the trend is per second of real time.
		{"irregular", func(i int) time.Time {
			return t0.Add(time.Duration(i)*time.Second + time.Duration(i%5-2)*100*time.Millisecond)
		}, nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			f := tc.f
			if f == nil {
				// The rate ramps with real time: 3/s.
				f = func(i int) float64 { return 200 + 3*tc.at(i).Sub(t0).Seconds() }
			}
			in := lastForecast(t, New(Config{}), n, tc.at, f)
			want := 200 + 3*(tc.at(n-1).Sub(t0)+5*time.Minute).Seconds()
			if rel := math.Abs(in.Value-want) / want; rel > 0.02 {
				t.Fatalf("forecast %.1f, want %.1f (off by %.2f%%)", in.Value, want, 100*rel)
			}
			if in.Score != in.Value {
				t.Fatalf("forecast insight = %+v", in)
			}
			if !strings.Contains(in.Explanation, "in 5m") || !strings.Contains(in.Explanation, "trend +3.0/s") {
				t.Fatalf("explanation %q", in.Explanation)
			}
			t.Log(in.Explanation)
		})
	}
}

func TestForecastFlat(t *testing.T) {
	in := lastForecast(t, New(Config{}), 211, sec, func(int) float64 { return 1000 })
	if in.Value != 1000 || in.Baseline != 1000 || in.Severity != SeverityInfo {
		t.Fatalf("flat series forecast %+v", in)
	}
	// With a ±0.5% ripple every forecast stays near the level. Holt's trend
	// picks up part of the ripple and the 300s horizon magnifies it, so the
	// tolerance is 10%, not 0.5%.
	a := New(Config{})
	forecasts := feed(a, 0, 600, func(i int) float64 { return flat(1000, i) }, KindForecast)
	for _, in := range forecasts {
		if in.Metric == MetricPPS && (math.Abs(in.Value-1000) > 100 || in.Severity != SeverityInfo) {
			t.Fatalf("rippled flat series: %s", in.Explanation)
		}
	}
	// A falling series is clamped at zero.
	in = lastForecast(t, New(Config{}), 211, sec, func(i int) float64 { return max(1000-4*float64(i), 0) })
	if in.Value != 0 {
		t.Fatalf("falling series forecast %.1f, want 0", in.Value)
	}
}

func TestForecastWarning(t *testing.T) {
	// A steep ramp doubles within the horizon: warning.
	in := lastForecast(t, New(Config{}), 91, sec, func(i int) float64 { return 100 + 5*float64(i) })
	if in.Severity != SeverityWarning {
		t.Fatalf("steep ramp forecast severity %q: %s", in.Severity, in.Explanation)
	}
}

func TestForecastCadence(t *testing.T) {
	a := New(Config{})
	got := feed(a, 0, 200, func(i int) float64 { return flat(1000, i) }, KindForecast)
	// Warm after sample 29; forecasts at samples 30, 90, 150 for each of the
	// three metrics.
	if len(got) != 9 {
		t.Fatalf("%d forecasts in 200s, want 9", len(got))
	}
	for i, in := range got {
		want := sec(30 + 60*(i/3))
		if !in.At.Equal(want) {
			t.Fatalf("forecast %d at %v, want %v", i, in.At, want)
		}
		if wantMetric := []string{MetricPPS, MetricNewFlows, MetricDropRate}[i%3]; in.Metric != wantMetric {
			t.Fatalf("forecast %d metric %q, want %q", i, in.Metric, wantMetric)
		}
	}
}

func TestLatencyOutliers(t *testing.T) {
	ms := func(v float64) time.Duration { return time.Duration(v * float64(time.Millisecond)) }
	a := New(Config{})
	got := a.ObserveLatencies(t0, map[string]map[string]time.Duration{
		"web": {
			"10.0.0.11:80": ms(2), "10.0.0.12:80": ms(2.1), "10.0.0.13:80": ms(80),
			"10.0.0.14:80": ms(1.9), "10.0.0.15:80": ms(2),
		},
		"pair":  {"10.0.1.1:80": ms(2), "10.0.1.2:80": ms(80)},
		"equal": {"10.0.2.1:80": ms(5), "10.0.2.2:80": ms(5), "10.0.2.3:80": ms(5)},
	})
	if len(got) != 1 {
		t.Fatalf("%d outliers, want 1: %+v", len(got), got)
	}
	in := got[0]
	if in.Kind != KindLatencyOutlier || in.Subject != "backend web/10.0.0.13:80" || in.Metric != MetricCheckLatency ||
		in.Value != 80 || in.Baseline != 2 || in.Score < 3.5 || in.Severity != SeverityCritical {
		t.Fatalf("outlier = %+v", in)
	}
	want := "backend web/10.0.0.13:80 check latency 80ms is 52.6 robust σ above the pool median of 2ms"
	if in.Explanation != want {
		t.Fatalf("explanation\n got %q\nwant %q", in.Explanation, want)
	}

	// A fast backend is not an outlier.
	if got := a.ObserveLatencies(t0, map[string]map[string]time.Duration{
		"fast": {"a": ms(20), "b": ms(21), "c": ms(19), "d": ms(1)},
	}); len(got) != 0 {
		t.Fatalf("fast backend reported: %+v", got)
	}

	// Still slow 10s later: within the cooldown. 30s later: reported again.
	pool := map[string]map[string]time.Duration{"web": {"a": ms(2), "b": ms(2), "c": ms(2), "d": ms(40)}}
	a = New(Config{})
	for i, want := range []int{1, 0, 0, 1} {
		at := t0.Add(time.Duration(i) * 10 * time.Second)
		if i == 3 {
			at = t0.Add(30 * time.Second)
		}
		if got := a.ObserveLatencies(at, pool); len(got) != want {
			t.Fatalf("call %d: %d outliers, want %d", i, len(got), want)
		}
	}
}

// run feeds a fixed scenario and returns everything it produced.
func run(a *Analyzer) []Insight {
	var out []Insight
	for i := range 400 {
		x := flat(1000, i)
		switch {
		case i == 120:
			x *= 10
		case i >= 250:
			x += 4 * float64(i-250)
		}
		drops := 0.0
		if i == 200 {
			drops = 50
		}
		out = append(out, a.ObserveVIP(sec(i), testVIP, x, flat(100, i), drops)...)
		out = append(out, a.ObserveVIP(sec(i), "10.0.0.2:443/tcp", flat(300, i+3), 0, 0)...)
		if i%10 == 0 {
			out = append(out, a.ObserveLatencies(sec(i), map[string]map[string]time.Duration{
				"web": {"a": 2 * time.Millisecond, "b": 2 * time.Millisecond, "c": time.Duration(i) * time.Millisecond / 4},
				"api": {"x": 7 * time.Millisecond, "y": 8 * time.Millisecond, "z": 9 * time.Millisecond, "w": 200 * time.Millisecond},
			})...)
		}
	}
	return out
}

func TestDeterministic(t *testing.T) {
	first, second := run(New(Config{})), run(New(Config{}))
	if len(first) == 0 {
		t.Fatal("scenario produced nothing")
	}
	if !reflect.DeepEqual(first, second) {
		t.Fatal("two analyzers given the same inputs disagree")
	}
	kinds := map[Kind]int{}
	for _, in := range first {
		kinds[in.Kind]++
	}
	if kinds[KindAnomaly] == 0 || kinds[KindForecast] == 0 || kinds[KindLatencyOutlier] == 0 {
		t.Fatalf("scenario should exercise every kind, got %v", kinds)
	}
	a, _ := json.Marshal(first)
	b, _ := json.Marshal(second)
	if string(a) != string(b) {
		t.Fatal("JSON differs")
	}
}

func TestForget(t *testing.T) {
	a := New(Config{})
	feed(a, 0, 100, func(i int) float64 { return flat(1000, i) }, KindAnomaly)
	a.Forget(testVIP)
	if _, ok := a.vips[testVIP]; ok {
		t.Fatal("state kept after Forget")
	}
	// A re-created VIP warms up afresh: a spike right away is not judged,
	// and the new baseline knows nothing of the old level.
	if got := feed(a, 100, 101, func(int) float64 { return 10000 }, KindAnomaly); len(got) != 0 {
		t.Fatalf("spike right after Forget raised %+v", got)
	}
	if m := a.vips[testVIP].series[vipPPS].ew.mean; m != 10000 {
		t.Fatalf("baseline after Forget = %.1f, want the first new sample", m)
	}
	// Forgetting an unknown VIP is harmless.
	a.Forget("192.0.2.1:53/udp")
}

func TestBadSamplesSkipped(t *testing.T) {
	a := New(Config{})
	feed(a, 0, 50, func(i int) float64 { return flat(1000, i) }, KindAnomaly)
	before := a.vips[testVIP].series
	for _, x := range []float64{math.NaN(), math.Inf(1), -5} {
		for _, in := range a.ObserveVIP(sec(50), testVIP, x, x, x) {
			t.Fatalf("bad sample %v produced %+v", x, in)
		}
		t.Run(fmt.Sprint(x), func(t *testing.T) {
			if a.vips[testVIP].series != before {
				t.Fatal("bad sample changed the state")
			}
		})
	}
	// A sample not after the previous one is ignored.
	st := a.vips[testVIP]
	snapshot := *st
	if got := a.ObserveVIP(sec(10), testVIP, 10000, 10000, 10000); got != nil || *st != snapshot {
		t.Fatalf("out-of-order sample was used: %+v", got)
	}
}

func TestJSON(t *testing.T) {
	b, err := json.Marshal(Insight{Kind: KindForecast, Subject: "vip x", Metric: MetricDropRate, Severity: SeverityInfo, At: t0})
	if err != nil {
		t.Fatal(err)
	}
	const want = `{"kind":"forecast","subject":"vip x","metric":"drop_rate","score":0,"severity":"info","value":0,"at":"2025-01-02T03:04:05Z","explanation":""}`
	if string(b) != want {
		t.Fatalf("JSON\n got %s\nwant %s", b, want)
	}
}

func TestConcurrentUse(t *testing.T) {
	a := New(Config{})
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Go(func() {
			vip := fmt.Sprintf("10.0.0.%d:80/tcp", g)
			for i := range 200 {
				a.ObserveVIP(sec(i), vip, flat(1000, i), 1, 0)
				a.ObserveLatencies(sec(i), map[string]map[string]time.Duration{"p": {"a": 1, "b": 1, "c": time.Second}})
				if i == 100 {
					a.Forget(vip)
				}
			}
		})
	}
	wg.Wait()
}

func TestFormatting(t *testing.T) {
	for d, want := range map[time.Duration]string{
		5 * time.Minute: "5m", time.Hour: "1h", 90 * time.Minute: "1h30m", 30 * time.Second: "30s", 90 * time.Second: "1m30s",
	} {
		if got := formatHorizon(d); got != want {
			t.Errorf("formatHorizon(%v) = %q, want %q", d, got, want)
		}
	}
	for d, want := range map[time.Duration]string{
		84 * time.Millisecond: "84ms", 2500 * time.Microsecond: "2.5ms", 250 * time.Microsecond: "250µs", 1500 * time.Millisecond: "1500ms",
	} {
		if got := formatLatency(d); got != want {
			t.Errorf("formatLatency(%v) = %q, want %q", d, got, want)
		}
	}
}
