package api

import (
	"log/slog"
	"sync"
	"time"
)

// authFailureInterval is the least time between two reports of failed
// authentication. A client retrying a wrong token in a loop would otherwise
// write a log record and a WebSocket message per request.
const authFailureInterval = 10 * time.Second

// authFailureReporter logs failed authentications and passes them to the
// security event callback at a bounded rate. The first failure after a
// quiet interval is reported at once; later ones are counted, and reported
// together, as their latest with the count, when the interval has passed.
// Nothing is dropped: every failure is in some report's count.
type authFailureReporter struct {
	interval time.Duration
	log      *slog.Logger
	notify   func(SecurityEvent) // may be nil

	mu      sync.Mutex
	last    time.Time     // when the latest report went out
	pending int           // failures not reported yet
	latest  SecurityEvent // the most recent of them
	timer   *time.Timer   // reports the pending failures; nil when none wait
}

func newAuthFailureReporter(interval time.Duration, log *slog.Logger, notify func(SecurityEvent)) *authFailureReporter {
	return &authFailureReporter{interval: interval, log: log, notify: notify}
}

// failed records one failed authentication.
func (r *authFailureReporter) failed(ev SecurityEvent) {
	r.mu.Lock()
	r.pending++
	r.latest = ev
	if r.timer != nil { // a report is already due
		r.mu.Unlock()
		return
	}
	if wait := r.interval - time.Since(r.last); wait > 0 {
		r.timer = time.AfterFunc(wait, r.flush)
		r.mu.Unlock()
		return
	}
	report := r.takeLocked()
	r.mu.Unlock()
	r.emit(report)
}

// flush reports the pending failures, if any.
func (r *authFailureReporter) flush() {
	r.mu.Lock()
	r.timer = nil
	if r.pending == 0 {
		r.mu.Unlock()
		return
	}
	report := r.takeLocked()
	r.mu.Unlock()
	r.emit(report)
}

// close reports what is pending now rather than when its timer fires, so
// that a stopping server loses no count.
func (r *authFailureReporter) close() {
	r.mu.Lock()
	if r.timer != nil {
		r.timer.Stop()
	}
	r.mu.Unlock()
	r.flush()
}

// takeLocked turns the pending failures into one report. Called with r.mu held.
func (r *authFailureReporter) takeLocked() SecurityEvent {
	report := r.latest
	report.Count = r.pending
	r.pending = 0
	r.last = time.Now()
	return report
}

func (r *authFailureReporter) emit(ev SecurityEvent) {
	r.log.Warn("API authentication failed", "remote", ev.Remote, "method", ev.Method, "path", ev.Path,
		"reason", ev.Reason, "failures", ev.Count)
	if r.notify != nil {
		r.notify(ev)
	}
}
