// Package billing accounts usage per VIP and per pool over billing periods
// of one calendar month (UTC), and persists the totals in the agent's state
// directory so that restarting the agent does not reset them.
//
// The agent samples the data plane's counters about once a second and hands
// them to Ledger.Record. The data-plane counters are cumulative: they live
// in pinned BPF maps and keep counting while the agent is down, and they
// only start over when a map entry is recreated. The ledger therefore keeps,
// for every subject, the last cumulative values it saw (its baseline) and
// accounts only the difference between successive samples. The L7 proxy
// reports deltas instead, through Ledger.AddL7.
//
// Subjects are strings with a kind prefix: "vip:10.0.0.1:80/tcp" or
// "pool:web". The kind of a subject is the text before its first colon.
//
// # Accounting rules
//
//   - The first sample of a subject the ledger has no baseline for only
//     establishes the baseline and accounts nothing: its counters may have
//     been counting since long before this ledger existed.
//   - The baselines are persisted with the totals. After a restart, the first
//     sample is compared against the saved baseline, so the traffic that
//     flowed while the agent was down is accounted (to the period in which
//     that first sample falls).
//   - If any of a subject's cumulative counters is lower than its baseline,
//     the counters were reset (the map entry was recreated or the id
//     reassigned); the new values themselves are the delta, since the
//     counters restarted from zero. A reset after which every counter has
//     already grown past its old value cannot be told apart from growth and
//     is accounted as growth; at a one-second sampling interval that would
//     need a subject to redo all its previous traffic within a second.
//   - The period is the calendar month, UTC, of the time passed to Record or
//     Snapshot. When that time falls in a later month than the current
//     period, the finished period is set aside to be archived and the totals
//     start again from zero. The delta of the Record that crosses the
//     boundary goes to the new month: all that is known is that it happened
//     between two samples, and a sampling interval is about a second.
//   - Time never moves a ledger back to an earlier period: if the clock
//     steps back across a month boundary, accounting continues in the
//     current period.
//   - A subject that was neither sampled nor reported during a whole period
//     is dropped (with its baseline) when that period ends, so deleted VIPs
//     and pools do not accumulate forever. Its usage is in the archive.
//
// # Files
//
// The state file (for example /var/lib/veloflux/billing.json) is JSON with
// a version field. It is replaced atomically and has mode 0600. A finished
// period is written, in the same format, to the state file's name followed
// by "." and the month ("billing.json.2026-10"). Archives are never
// overwritten: see Ledger.Save.
//
// A state file that cannot be parsed is an error wrapping ErrCorrupt, and
// the file is left alone. Starting over from zero would silently lose the
// month's usage, and a billing record is worth an operator's look: move the
// file aside to start a fresh period.
package billing

import (
	"cmp"
	"slices"
	"strings"
	"sync"
	"time"
)

// UpdateType is the type of the WebSocket message, on the billing channel,
// whose data is a Snapshot.
const UpdateType = "usage_update"

// Usage is an amount of traffic. Packets, Bytes and NewFlows come from the
// XDP data plane; Requests, BytesIn and BytesOut are reported by the L7
// proxy and stay zero for subjects it does not serve.
type Usage struct {
	Packets  uint64 `json:"packets"`
	Bytes    uint64 `json:"bytes"`
	NewFlows uint64 `json:"new_flows"`
	Requests uint64 `json:"requests"`
	BytesIn  uint64 `json:"bytes_in"`
	BytesOut uint64 `json:"bytes_out"`
}

func (u *Usage) add(d Usage) {
	u.Packets += d.Packets
	u.Bytes += d.Bytes
	u.NewFlows += d.NewFlows
	u.Requests += d.Requests
	u.BytesIn += d.BytesIn
	u.BytesOut += d.BytesOut
}

// covers reports whether u is at least o in every field.
func (u Usage) covers(o Usage) bool {
	return u.Packets >= o.Packets && u.Bytes >= o.Bytes && u.NewFlows >= o.NewFlows &&
		u.Requests >= o.Requests && u.BytesIn >= o.BytesIn && u.BytesOut >= o.BytesOut
}

// Counters are the cumulative data-plane counters of one subject, the
// baseline the next sample is compared against.
type Counters struct {
	Packets  uint64 `json:"packets"`
	Bytes    uint64 `json:"bytes"`
	NewFlows uint64 `json:"new_flows"`
}

// delta returns what was accounted between the baseline c and the sample
// cur. The counters of a map entry are reset together, so one counter going
// backwards means all of them restarted from zero.
func (c Counters) delta(cur Counters) Usage {
	if cur.Packets < c.Packets || cur.Bytes < c.Bytes || cur.NewFlows < c.NewFlows {
		return Usage{Packets: cur.Packets, Bytes: cur.Bytes, NewFlows: cur.NewFlows}
	}
	return Usage{
		Packets:  cur.Packets - c.Packets,
		Bytes:    cur.Bytes - c.Bytes,
		NewFlows: cur.NewFlows - c.NewFlows,
	}
}

// SubjectUsage is the usage of one subject in a Snapshot.
type SubjectUsage struct {
	Subject string `json:"subject"`
	Kind    string `json:"kind"` // "vip" or "pool"
	// Interval is what the latest Record accounted: the data-plane delta
	// since the Record before it, plus the L7 deltas reported in between.
	Interval Usage `json:"interval"`
	// Period is the total since PeriodStart.
	Period Usage `json:"period"`
}

// Snapshot is the state of a ledger at one instant.
type Snapshot struct {
	At          time.Time `json:"at"`
	PeriodStart time.Time `json:"period_start"` // first instant of the month, UTC
	PeriodEnd   time.Time `json:"period_end"`   // first instant of the next month (exclusive)
	// IntervalSeconds is the length of the interval the subjects' Interval
	// covers; 0 before the first interval is complete. After a restart the
	// first interval spans the downtime, as does its usage.
	IntervalSeconds float64        `json:"interval_seconds"`
	Subjects        []SubjectUsage `json:"subjects"` // sorted by Kind, then Subject
}

// PeriodOf returns the billing period that t falls in: the first instant of
// its calendar month in UTC, and the first instant of the next month.
func PeriodOf(t time.Time) (start, end time.Time) {
	t = t.UTC()
	start = time.Date(t.Year(), t.Month(), 1, 0, 0, 0, 0, time.UTC)
	return start, start.AddDate(0, 1, 0)
}

// KindOf returns the kind of a subject: the text before its first colon
// ("vip", "pool"), or "" if it has none.
func KindOf(subject string) string {
	kind, _, found := strings.Cut(subject, ":")
	if !found {
		return ""
	}
	return kind
}

// subject is the ledger's state for one subject.
type subject struct {
	period   Usage
	interval Usage // closed by the latest Record; not persisted
	pendL7   Usage // L7 reported since the latest Record; already in period
	base     *Counters
	// seen records that the subject was sampled or reported during the
	// current period; subjects never seen in a period are dropped at its end.
	seen bool
}

// Ledger accounts usage per subject over the current billing period. It is
// safe for concurrent use.
type Ledger struct {
	path string

	// saveMu serializes Save, so that writes of the state file and the
	// archives do not interleave. It is held without mu during the disk I/O,
	// so Record and Snapshot never wait for an fsync.
	saveMu sync.Mutex

	mu           sync.Mutex
	periodStart  time.Time
	lastRecord   time.Time // zero before the first Record ever
	lastInterval float64   // length of the latest closed interval, seconds
	updated      time.Time // latest time passed to Open, Record or Snapshot
	subjects     map[string]*subject
	// finished holds periods that have ended but are not yet written as
	// archives. Save writes them before the state file, so that the state
	// file never holds a newer period while an older one exists nowhere.
	finished []*stateFile
	gen      uint64 // incremented by every change
	savedGen uint64 // gen of the latest state written
}

// Record accounts one sample of the data plane's cumulative counters,
// keyed by subject, taken at time at. Only Packets, Bytes and NewFlows of
// each value are read: L7 usage arrives through AddL7. Subjects missing
// from cumulative keep their baseline and account nothing for this
// interval, so a failed read of one counter loses nothing. Empty subject
// names are ignored.
//
// It closes the interval of every subject and returns the Snapshot at at.
func (l *Ledger) Record(at time.Time, cumulative map[string]Usage) Snapshot {
	at = at.UTC()
	l.mu.Lock()
	defer l.mu.Unlock()
	l.rollover(at)

	l.lastInterval = 0
	if !l.lastRecord.IsZero() && at.After(l.lastRecord) {
		l.lastInterval = at.Sub(l.lastRecord).Seconds()
	}
	for _, s := range l.subjects {
		s.interval, s.pendL7 = s.pendL7, Usage{}
	}
	for name, u := range cumulative {
		if name == "" {
			continue
		}
		s := l.subjectLocked(name)
		cur := Counters{Packets: u.Packets, Bytes: u.Bytes, NewFlows: u.NewFlows}
		if s.base != nil {
			d := s.base.delta(cur)
			s.interval.add(d)
			s.period.add(d)
		}
		s.base = &cur
		s.seen = true
	}
	l.lastRecord = at
	l.touch(at)
	return l.snapshotLocked(at)
}

// AddL7 accounts usage the L7 proxy reports for subject: deltas, not
// cumulative values. They count in the current period at once and in the
// interval the next Record closes. An empty subject is ignored.
//
// AddL7 takes no time: the deltas go to the ledger's current period, which
// moves to a new month at the first Record or Snapshot in that month. With
// one Record a second, at most a second of L7 usage lands in the month
// before the one it happened in.
func (l *Ledger) AddL7(subject string, requests, bytesIn, bytesOut uint64) {
	if subject == "" {
		return
	}
	d := Usage{Requests: requests, BytesIn: bytesIn, BytesOut: bytesOut}
	l.mu.Lock()
	defer l.mu.Unlock()
	s := l.subjectLocked(subject)
	s.period.add(d)
	s.pendL7.add(d)
	s.seen = true
	l.gen++
}

// Snapshot returns the ledger's state at time at. If at falls in a later
// month than the current period, the period is rolled over first, as
// Record would.
func (l *Ledger) Snapshot(at time.Time) Snapshot {
	at = at.UTC()
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.rollover(at) {
		l.touch(at)
	}
	return l.snapshotLocked(at)
}

// Path returns the state file's path.
func (l *Ledger) Path() string { return l.path }

// subjectLocked returns the state of name, creating it if needed.
func (l *Ledger) subjectLocked(name string) *subject {
	s, ok := l.subjects[name]
	if !ok {
		s = &subject{}
		l.subjects[name] = s
	}
	return s
}

// touch records a change made at time at.
func (l *Ledger) touch(at time.Time) {
	if at.After(l.updated) {
		l.updated = at
	}
	l.gen++
}

// rollover starts the period at falls in, if that is later than the
// current one, and reports whether it did. The finished period is queued
// for Save to archive. Baselines are kept: the counters go on counting
// across the boundary.
func (l *Ledger) rollover(at time.Time) bool {
	start, _ := PeriodOf(at)
	if !start.After(l.periodStart) {
		return false
	}
	l.finished = append(l.finished, l.stateLocked())
	for name, s := range l.subjects {
		if !s.seen {
			delete(l.subjects, name)
			continue
		}
		s.period, s.seen = Usage{}, false
	}
	l.periodStart = start
	return true
}

func (l *Ledger) snapshotLocked(at time.Time) Snapshot {
	start, end := PeriodOf(l.periodStart)
	snap := Snapshot{
		At:              at,
		PeriodStart:     start,
		PeriodEnd:       end,
		IntervalSeconds: l.lastInterval,
		Subjects:        make([]SubjectUsage, 0, len(l.subjects)),
	}
	for name, s := range l.subjects {
		snap.Subjects = append(snap.Subjects, SubjectUsage{
			Subject:  name,
			Kind:     KindOf(name),
			Interval: s.interval,
			Period:   s.period,
		})
	}
	slices.SortFunc(snap.Subjects, func(a, b SubjectUsage) int {
		return cmp.Or(cmp.Compare(a.Kind, b.Kind), cmp.Compare(a.Subject, b.Subject))
	})
	return snap
}
