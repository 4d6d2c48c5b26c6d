// Package insights computes the agent's "ai" channel: short, explained
// findings about live traffic, derived only from the data-plane counters and
// the health checks. Nothing here is random, learned offline or invented:
// every Insight is a pure function of the samples fed in, so the same inputs
// always give the same outputs, in the same order.
//
// The agent feeds two kinds of input:
//
//   - ObserveVIP, once per sampling tick, with one VIP's per-second rates:
//     packets/s ("pps"), new flows/s ("new_flows_per_s") and drops/s
//     ("drop_rate").
//   - ObserveLatencies with every backend's last health-check latency,
//     grouped by pool.
//
// Three analyses turn those into insights.
//
// # Anomalies (Kind "anomaly")
//
// Each (VIP, metric) series keeps an exponentially weighted moving average
// (EWMA) of its mean and variance, with smoothing Config.Alpha (default 0.1,
// a memory of roughly 1/Alpha = 10 samples). The variance uses the standard
// incremental EW recurrence (Finch, "Incremental calculation of weighted mean
// and variance", 2009):
//
//	diff = x − mean
//	mean = mean + α·diff
//	var  = (1 − α)·(var + α·diff²)
//
// For the first 1/Alpha samples the weight is 1/n instead of Alpha, which
// makes the same recurrence compute the exact running mean and population
// variance; otherwise the baseline would be dominated by whatever the very
// first sample happened to be.
//
// A sample x is judged against the baseline built from the samples before it:
// z = (x − mean)/σ, where σ is the EW standard deviation floored at the
// largest of
//
//   - √|mean|: the rates are counts of discrete events per second, and even
//     perfectly steady traffic jitters by about √λ per second (Poisson); a
//     smaller σ only means the recent window was unusually quiet;
//   - 1% of |mean|: a relative floor for very large rates;
//   - 1 event/s: the resolution of a per-second counter, so an idle series
//     (all zeros) does not divide by zero.
//
// The sample is an anomaly when |z| ≥ Config.ZThreshold (default 3), in
// either direction (spikes and collapses), but only once the series has
// Config.Warmup samples (default 30) and at most once per Config.Cooldown
// (default 30s) per VIP and metric, so a sustained event is reported, not
// repeated every second.
//
// After judging, the sample is folded into the baseline. A sample beyond the
// threshold is first winsorized to mean ± ZThreshold·σ: a one-second spike
// then moves the baseline no more than a borderline sample would, so it
// cannot mask an anomaly right after it, while a genuine level shift still
// wins within tens of seconds because every clamped sample widens the
// variance and the clamp with it.
//
// # Forecasts (Kind "forecast")
//
// Each (VIP, metric) series also runs Holt's linear trend method (double
// exponential smoothing) with Config.HoltAlpha (level, default 0.3) and
// Config.HoltBeta (trend, default 0.1). The level is initialised from the
// first sample and the trend from the slope between the first two. The
// smoothing weights apply per sample, but the trend is kept per second using
// the actual time between observations, so a late or missed tick does not
// distort the slope:
//
//	Δt     = seconds since the previous sample
//	level' = α·x + (1 − α)·(level + trend·Δt)
//	trend' = β·(level' − level)/Δt + (1 − β)·trend
//
// The forecast is level + trend·Horizon (Config.Horizon, default 5m),
// clamped at zero because rates cannot be negative. Holt sees the same
// winsorized samples as the EWMA, so a single spike does not become a five
// minute trend. Once warm, a forecast insight is emitted for every series
// every Config.ForecastEvery (default 60s): its Value and Score are the
// forecast and its Baseline the current level. The severity is "warning"
// when the forecast is more than twice the EWMA mean and also at least
// ZThreshold·σ above it (so that 0 → 2 drops/s is not a warning), "info"
// otherwise. Holt's trend follows noise as well as drift, and the horizon
// magnifies it (with the defaults, a ±0.5% ripple on a flat rate moves the
// 5-minute forecast by up to about 8%), which is why a forecast is an
// indication and never more than a warning.
//
// # Latency outliers (Kind "latency_outlier")
//
// Within each pool of at least Config.MinBackends backends (default 3; a
// median and its deviation mean nothing for fewer), every backend's check
// latency gets a robust z-score from the median and the median absolute
// deviation (MAD), which a single slow backend cannot drag along the way it
// drags a mean and standard deviation:
//
//	z = 0.6745·(x − median)/MAD
//
// (0.6745 makes the MAD of a normal distribution equal to its σ). MAD is
// floored at the larger of 1ms and 10% of the median: in a healthy pool the
// latencies are often identical (MAD = 0), and sub-millisecond jitter is not
// worth reporting. Only the slow side is judged: a backend answering faster
// than its peers is not a problem. A backend is an outlier when
// z ≥ Config.OutlierZ (default 3.5, the usual Iglewicz–Hoaglin cut-off),
// reported at most once per Cooldown per backend.
//
// # Severity
//
// For anomalies and outliers, the severity follows |Score|: "critical" from
// 6, "warning" from 3, "info" below (only reachable with a threshold under 3).
//
// An Analyzer is safe for concurrent use.
package insights

import (
	"fmt"
	"math"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Kind says which analysis produced an Insight.
type Kind string

// The kinds of insight.
const (
	KindAnomaly        Kind = "anomaly"
	KindForecast       Kind = "forecast"
	KindLatencyOutlier Kind = "latency_outlier"
)

// Severity grades an Insight for display and filtering.
type Severity string

// The severities, mildest first.
const (
	SeverityInfo     Severity = "info"
	SeverityWarning  Severity = "warning"
	SeverityCritical Severity = "critical"
)

// The metrics an Insight can be about.
const (
	MetricPPS          = "pps"             // packets per second on a VIP
	MetricNewFlows     = "new_flows_per_s" // new flows per second on a VIP
	MetricDropRate     = "drop_rate"       // dropped packets per second on a VIP
	MetricCheckLatency = "check_latency"   // a backend's last health-check latency
)

// Insight is one finding, ready to be sent as an "insight" message.
type Insight struct {
	Kind    Kind   `json:"kind"`
	Subject string `json:"subject"` // "vip 10.0.0.1:80/tcp" or "backend web/10.0.0.11:80"
	Metric  string `json:"metric"`  // one of the Metric constants
	// Score is the z-score for anomalies (signed: negative below the
	// baseline), the forecast value for forecasts and the robust z-score for
	// latency outliers.
	Score    float64  `json:"score"`
	Severity Severity `json:"severity"`
	// Value is the observed rate (anomaly), the forecast rate (forecast) or
	// the latency in milliseconds (latency outlier).
	Value float64 `json:"value"`
	// Baseline is the EWMA mean (anomaly), the current Holt level (forecast)
	// or the pool's median latency in milliseconds (latency outlier).
	Baseline    float64   `json:"baseline,omitempty"`
	At          time.Time `json:"at"`
	Explanation string    `json:"explanation"` // one human sentence
}

// Config holds the analyses' parameters. A zero or out-of-range field takes
// its default (see DefaultConfig), so Config{} is a working configuration.
type Config struct {
	Alpha      float64       // EWMA smoothing in (0, 1]; default 0.1
	ZThreshold float64       // |z| at which a sample is an anomaly; default 3
	Warmup     int           // samples a series needs before it may alert or forecast; default 30
	Cooldown   time.Duration // minimum time between two alerts of one subject and metric; default 30s

	HoltAlpha     float64       // Holt level smoothing in (0, 1]; default 0.3
	HoltBeta      float64       // Holt trend smoothing in (0, 1]; default 0.1
	Horizon       time.Duration // how far ahead to forecast; default 5m
	ForecastEvery time.Duration // time between two forecasts of one series; default 60s

	OutlierZ    float64 // robust z at which a backend's latency is an outlier; default 3.5
	MinBackends int     // smallest pool judged for outliers, at least 3; default 3
}

// DefaultConfig returns the defaults that New applies to zero fields.
func DefaultConfig() Config {
	return Config{
		Alpha:         0.1,
		ZThreshold:    3,
		Warmup:        30,
		Cooldown:      30 * time.Second,
		HoltAlpha:     0.3,
		HoltBeta:      0.1,
		Horizon:       5 * time.Minute,
		ForecastEvery: 60 * time.Second,
		OutlierZ:      3.5,
		MinBackends:   3,
	}
}

// withDefaults replaces every zero or out-of-range field by its default.
func (c Config) withDefaults() Config {
	d := DefaultConfig()
	unit := func(v *float64, def float64) {
		if !(*v > 0 && *v <= 1) { // also catches NaN
			*v = def
		}
	}
	positive := func(v *float64, def float64) {
		if !(*v > 0) || math.IsInf(*v, 0) {
			*v = def
		}
	}
	unit(&c.Alpha, d.Alpha)
	unit(&c.HoltAlpha, d.HoltAlpha)
	unit(&c.HoltBeta, d.HoltBeta)
	positive(&c.ZThreshold, d.ZThreshold)
	positive(&c.OutlierZ, d.OutlierZ)
	if c.Warmup <= 0 {
		c.Warmup = d.Warmup
	}
	if c.Cooldown <= 0 {
		c.Cooldown = d.Cooldown
	}
	if c.Horizon <= 0 {
		c.Horizon = d.Horizon
	}
	if c.ForecastEvery <= 0 {
		c.ForecastEvery = d.ForecastEvery
	}
	// With two backends both sit exactly one MAD from the median, so no
	// robust z can ever exceed 0.6745: three is the smallest meaningful pool.
	if c.MinBackends < 3 {
		c.MinBackends = d.MinBackends
	}
	return c
}

// Severity thresholds on |score| for anomalies and outliers.
const (
	warningScore  = 3
	criticalScore = 6
)

// minRateStd floors σ of every VIP metric: all three are events per second,
// so one event per second is the counters' resolution.
const minRateStd = 1.0

// relStdFloor floors σ at this fraction of |mean|.
const relStdFloor = 0.01

// madScale turns a MAD into an estimate of σ for normally distributed data.
const madScale = 0.6745

// MAD floors for latency outliers.
const (
	minMAD       = time.Millisecond
	relMADFloor  = 0.1 // of the median
	forecastMult = 2   // a forecast above forecastMult × the EWMA mean is a warning
)

// vipMetric indexes the per-VIP series, in the order insights are reported.
type vipMetric int

const (
	vipPPS vipMetric = iota
	vipNewFlows
	vipDrops
	numVIPMetrics
)

func (m vipMetric) name() string {
	switch m {
	case vipPPS:
		return MetricPPS
	case vipNewFlows:
		return MetricNewFlows
	default:
		return MetricDropRate
	}
}

// Analyzer holds the per-VIP baselines and the alert cooldowns. Create it
// with New; the zero value is not usable.
type Analyzer struct {
	cfg Config

	mu   sync.Mutex
	vips map[string]*vipState
	// outlierAlerted is when each backend ("pool/backend") was last reported
	// as a latency outlier.
	outlierAlerted map[string]time.Time
}

type vipState struct {
	last   time.Time // time of the last accepted sample of any metric
	series [numVIPMetrics]series
}

// series is the state of one (VIP, metric).
type series struct {
	ew   ewma
	holt holt

	alerted      bool // an anomaly was reported, at lastAlert
	lastAlert    time.Time
	forecasted   bool // a forecast was reported, at lastForecast
	lastForecast time.Time
}

// New returns an Analyzer with cfg, zero fields taking their defaults.
func New(cfg Config) *Analyzer {
	return &Analyzer{
		cfg:            cfg.withDefaults(),
		vips:           make(map[string]*vipState),
		outlierAlerted: make(map[string]time.Time),
	}
}

// Config returns the configuration in effect, defaults applied.
func (a *Analyzer) Config() Config { return a.cfg }

// ObserveVIP feeds one sample of a VIP's rates (per second) taken at at, and
// returns the insights it triggers: anomalies first, then any forecasts that
// are due, each group in the order pps, new flows, drops.
//
// A rate that is negative, NaN or infinite (a counter reset, a missing read)
// is skipped: that metric's state is left as it was. A sample not later than
// the VIP's previous one is ignored as a whole, since it defines no time step
// for the trend; pass times from time.Now, whose monotonic reading makes
// wall-clock steps harmless.
func (a *Analyzer) ObserveVIP(at time.Time, vip string, pps, newFlowsPerS, dropRate float64) []Insight {
	a.mu.Lock()
	defer a.mu.Unlock()

	st := a.vips[vip]
	if st == nil {
		st = &vipState{}
		a.vips[vip] = st
	} else if !at.After(st.last) {
		return nil
	}
	st.last = at

	subject := "vip " + vip
	values := [numVIPMetrics]float64{pps, newFlowsPerS, dropRate}
	var anomalies, forecasts []Insight
	for m := range numVIPMetrics {
		x := values[m]
		if x < 0 || math.IsNaN(x) || math.IsInf(x, 0) {
			continue
		}
		s := &st.series[m]
		name := m.name()

		// Judge against the baseline of earlier samples, then absorb.
		absorbed := x
		if s.ew.n >= a.cfg.Warmup {
			mean, sd := s.ew.mean, s.ew.std()
			z := (x - mean) / sd
			if math.Abs(z) >= a.cfg.ZThreshold {
				if !s.alerted || at.Sub(s.lastAlert) >= a.cfg.Cooldown {
					s.alerted, s.lastAlert = true, at
					anomalies = append(anomalies, anomaly(at, subject, name, x, mean, z))
				}
				// Winsorize: see the package comment.
				absorbed = mean + math.Copysign(a.cfg.ZThreshold*sd, z)
			}
		}
		s.ew.update(absorbed, a.cfg.Alpha)
		s.holt.update(at, absorbed, a.cfg.HoltAlpha, a.cfg.HoltBeta)

		if s.ew.n > a.cfg.Warmup && (!s.forecasted || at.Sub(s.lastForecast) >= a.cfg.ForecastEvery) {
			s.forecasted, s.lastForecast = true, at
			forecasts = append(forecasts, a.forecast(at, subject, name, s))
		}
	}
	return append(anomalies, forecasts...)
}

func anomaly(at time.Time, subject, metric string, x, mean, z float64) Insight {
	dir := "above"
	if z < 0 {
		dir = "below"
	}
	return Insight{
		Kind:     KindAnomaly,
		Subject:  subject,
		Metric:   metric,
		Score:    z,
		Severity: severity(z),
		Value:    x,
		Baseline: mean,
		At:       at,
		Explanation: fmt.Sprintf("%s on %s is %.1f, %.1fσ %s its EWMA baseline of %.1f",
			metric, subject, x, math.Abs(z), dir, mean),
	}
}

func (a *Analyzer) forecast(at time.Time, subject, metric string, s *series) Insight {
	f := max(s.holt.forecast(a.cfg.Horizon), 0)
	sev := SeverityInfo
	if mean := s.ew.mean; f > forecastMult*mean && f-mean >= a.cfg.ZThreshold*s.ew.std() {
		sev = SeverityWarning
	}
	return Insight{
		Kind:     KindForecast,
		Subject:  subject,
		Metric:   metric,
		Score:    f,
		Severity: sev,
		Value:    f,
		Baseline: s.holt.level,
		At:       at,
		Explanation: fmt.Sprintf("%s on %s is forecast to reach %.1f in %s (now %.1f, trend %+.1f/s)",
			metric, subject, f, formatHorizon(a.cfg.Horizon), s.holt.level, s.holt.trend),
	}
}

// Forget drops all state of a VIP, e.g. when it is removed, so a VIP later
// re-created under the same name starts a fresh warm-up.
func (a *Analyzer) Forget(vip string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	delete(a.vips, vip)
}

// ObserveLatencies judges the backends' last check latencies
// (pool → backend → latency) within each pool and returns one insight per
// slow outlier not reported within the last Cooldown, ordered by pool and
// backend. Negative latencies are ignored. Pools with fewer than MinBackends
// usable latencies are not judged.
func (a *Analyzer) ObserveLatencies(at time.Time, latencies map[string]map[string]time.Duration) []Insight {
	a.mu.Lock()
	defer a.mu.Unlock()

	// An expired cooldown suppresses nothing, so dropping it changes no
	// result; it keeps removed backends from accumulating.
	for k, t := range a.outlierAlerted {
		if at.Sub(t) >= a.cfg.Cooldown {
			delete(a.outlierAlerted, k)
		}
	}

	var out []Insight
	for _, pool := range sortedKeys(latencies) {
		backends := latencies[pool]
		names := make([]string, 0, len(backends))
		xs := make([]float64, 0, len(backends))
		for _, b := range sortedKeys(backends) {
			if d := backends[b]; d >= 0 {
				names = append(names, b)
				xs = append(xs, float64(d))
			}
		}
		if len(xs) < a.cfg.MinBackends {
			continue
		}
		med := median(xs)
		dev := make([]float64, len(xs))
		for i, x := range xs {
			dev[i] = math.Abs(x - med)
		}
		mad := max(median(dev), float64(minMAD), relMADFloor*med)
		for i, x := range xs {
			z := madScale * (x - med) / mad
			if z < a.cfg.OutlierZ {
				continue
			}
			key := pool + "/" + names[i]
			if _, cooling := a.outlierAlerted[key]; cooling {
				continue
			}
			a.outlierAlerted[key] = at
			subject := "backend " + key
			out = append(out, Insight{
				Kind:     KindLatencyOutlier,
				Subject:  subject,
				Metric:   MetricCheckLatency,
				Score:    z,
				Severity: severity(z),
				Value:    x / float64(time.Millisecond),
				Baseline: med / float64(time.Millisecond),
				At:       at,
				Explanation: fmt.Sprintf("%s check latency %s is %.1f robust σ above the pool median of %s",
					subject, formatLatency(time.Duration(x)), z, formatLatency(time.Duration(med))),
			})
		}
	}
	return out
}

func severity(score float64) Severity {
	switch s := math.Abs(score); {
	case s >= criticalScore:
		return SeverityCritical
	case s >= warningScore:
		return SeverityWarning
	default:
		return SeverityInfo
	}
}

// ewma is an exponentially weighted mean and variance.
type ewma struct {
	n    int // samples absorbed
	mean float64
	vr   float64
}

// update absorbs x. The weight is max(alpha, 1/n): for the first 1/alpha
// samples the recurrence is then exactly the running mean and population
// variance (Welford), and the first sample sets the mean with zero variance.
func (e *ewma) update(x, alpha float64) {
	e.n++
	w := max(alpha, 1/float64(e.n))
	diff := x - e.mean
	incr := w * diff
	e.mean += incr
	e.vr = (1 - w) * (e.vr + diff*incr)
}

// std is the floored standard deviation used for z-scores; see the package
// comment for the three floors.
func (e *ewma) std() float64 {
	m := math.Abs(e.mean)
	return max(math.Sqrt(e.vr), math.Sqrt(m), relStdFloor*m, minRateStd)
}

// holt is Holt's linear trend model with the trend in units per second.
type holt struct {
	n     int
	last  time.Time
	level float64
	trend float64 // per second
}

// update absorbs x observed at at, which must be after the previous sample
// (ObserveVIP guarantees it).
func (h *holt) update(at time.Time, x, alpha, beta float64) {
	dt := at.Sub(h.last).Seconds()
	h.n++
	h.last = at
	switch h.n {
	case 1:
		h.level, h.trend = x, 0
	case 2:
		// The usual initialisation: the slope between the first two samples.
		h.trend = (x - h.level) / dt
		h.level = x
	default:
		level := alpha*x + (1-alpha)*(h.level+h.trend*dt)
		h.trend = beta*(level-h.level)/dt + (1-beta)*h.trend
		h.level = level
	}
}

func (h *holt) forecast(horizon time.Duration) float64 {
	return h.level + h.trend*horizon.Seconds()
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// median of a non-empty slice; xs is not modified.
func median(xs []float64) float64 {
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// formatHorizon writes a duration without trailing zero units: "5m", "1h30m",
// "90s" rather than time.Duration's "5m0s".
func formatHorizon(d time.Duration) string {
	s := d.String()
	if strings.HasSuffix(s, "m0s") {
		s = strings.TrimSuffix(s, "0s")
	}
	if strings.HasSuffix(s, "h0m") {
		s = strings.TrimSuffix(s, "0m")
	}
	return s
}

// formatLatency writes a latency for a sentence: whole or tenth milliseconds
// from 1ms ("84ms", "2.5ms"), microseconds below ("250µs").
func formatLatency(d time.Duration) string {
	if d < time.Millisecond {
		return d.Round(time.Microsecond).String()
	}
	ms := float64(d.Round(100*time.Microsecond)) / float64(time.Millisecond)
	return strconv.FormatFloat(ms, 'f', -1, 64) + "ms"
}
