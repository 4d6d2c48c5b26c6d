package billing

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

func at(t *testing.T, s string) time.Time {
	t.Helper()
	ts, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		t.Fatal(err)
	}
	return ts
}

func subj(t *testing.T, snap Snapshot, name string) SubjectUsage {
	t.Helper()
	for _, s := range snap.Subjects {
		if s.Subject == name {
			return s
		}
	}
	t.Fatalf("subject %q not in snapshot %+v", name, snap.Subjects)
	return SubjectUsage{}
}

func hasSubj(snap Snapshot, name string) bool {
	for _, s := range snap.Subjects {
		if s.Subject == name {
			return true
		}
	}
	return false
}

func l4(p, b, f uint64) Usage { return Usage{Packets: p, Bytes: b, NewFlows: f} }

func open(t *testing.T, path string, now time.Time) *Ledger {
	t.Helper()
	l, err := Open(path, now, nil)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	return l
}

func save(t *testing.T, l *Ledger) {
	t.Helper()
	if err := l.Save(); err != nil {
		t.Fatalf("Save: %v", err)
	}
}

func readState(t *testing.T, path string) *stateFile {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	st, err := decodeState(data)
	if err != nil {
		t.Fatalf("decode %s: %v", path, err)
	}
	return st
}

const (
	vipA = "vip:10.0.0.1:80/tcp"
	vipB = "vip:10.0.0.2:443/tcp"
	pool = "pool:web"
)

func TestRecordAccumulates(t *testing.T) {
	path := filepath.Join(t.TempDir(), "billing.json")
	l := open(t, path, at(t, "2026-10-05T12:00:00Z"))

	// The first sample is a baseline only. L7 fields of a cumulative
	// sample are ignored.
	snap := l.Record(at(t, "2026-10-05T12:00:00Z"), map[string]Usage{
		vipA: {Packets: 100, Bytes: 1000, NewFlows: 5, Requests: 99},
		pool: l4(10, 100, 1),
	})
	if got := subj(t, snap, vipA); got.Period != (Usage{}) || got.Interval != (Usage{}) {
		t.Fatalf("baseline accounted something: %+v", got)
	}
	if snap.IntervalSeconds != 0 {
		t.Errorf("IntervalSeconds = %v before any interval, want 0", snap.IntervalSeconds)
	}

	snap = l.Record(at(t, "2026-10-05T12:00:01Z"), map[string]Usage{
		vipA: l4(150, 1600, 7),
		pool: l4(12, 150, 1),
	})
	if got, want := subj(t, snap, vipA).Interval, l4(50, 600, 2); got != want {
		t.Errorf("interval = %+v, want %+v", got, want)
	}
	if snap.IntervalSeconds != 1 {
		t.Errorf("IntervalSeconds = %v, want 1", snap.IntervalSeconds)
	}

	// pool is missing from this sample: no interval, baseline kept.
	snap = l.Record(at(t, "2026-10-05T12:00:03Z"), map[string]Usage{vipA: l4(200, 2000, 7)})
	a := subj(t, snap, vipA)
	if want := l4(50, 400, 0); a.Interval != want {
		t.Errorf("interval = %+v, want %+v", a.Interval, want)
	}
	if want := l4(100, 1000, 2); a.Period != want {
		t.Errorf("period = %+v, want %+v", a.Period, want)
	}
	if p := subj(t, snap, pool); p.Interval != (Usage{}) || p.Period != l4(2, 50, 0) {
		t.Errorf("pool = %+v, want empty interval and period {2 50 0}", p)
	}
	if snap.IntervalSeconds != 2 {
		t.Errorf("IntervalSeconds = %v, want 2", snap.IntervalSeconds)
	}
	snap = l.Record(at(t, "2026-10-05T12:00:04Z"), map[string]Usage{pool: l4(20, 200, 3)})
	if got, want := subj(t, snap, pool).Period, l4(10, 100, 2); got != want {
		t.Errorf("pool period after gap = %+v, want %+v", got, want)
	}

	// A counter going backwards is a reset: the new value is the delta,
	// for every counter of the subject, even one that did not decrease.
	snap = l.Record(at(t, "2026-10-05T12:00:05Z"), map[string]Usage{vipA: l4(30, 3000, 1)})
	a = subj(t, snap, vipA)
	if want := l4(30, 3000, 1); a.Interval != want {
		t.Errorf("interval after reset = %+v, want %+v", a.Interval, want)
	}
	if want := l4(130, 4000, 3); a.Period != want {
		t.Errorf("period after reset = %+v, want %+v", a.Period, want)
	}

	// Kind, and the order: kind, then subject.
	if len(snap.Subjects) != 2 || snap.Subjects[0].Subject != pool || snap.Subjects[0].Kind != "pool" ||
		snap.Subjects[1].Kind != "vip" {
		t.Errorf("subjects = %+v, want pool then vip", snap.Subjects)
	}
	if ps, pe := at(t, "2026-10-01T00:00:00Z"), at(t, "2026-11-01T00:00:00Z"); !snap.PeriodStart.Equal(ps) || !snap.PeriodEnd.Equal(pe) {
		t.Errorf("period = %v..%v, want %v..%v", snap.PeriodStart, snap.PeriodEnd, ps, pe)
	}

	// Snapshot does not close an interval.
	s2 := l.Snapshot(at(t, "2026-10-05T12:00:05.5Z"))
	if got := subj(t, s2, vipA); got != a {
		t.Errorf("Snapshot = %+v, want %+v", got, a)
	}
}

func TestRestart(t *testing.T) {
	path := filepath.Join(t.TempDir(), "billing.json")
	l := open(t, path, at(t, "2026-10-05T12:00:00Z"))
	l.Record(at(t, "2026-10-05T12:00:00Z"), map[string]Usage{
		vipA: l4(100, 1000, 1),
		vipB: l4(500, 5000, 5),
		pool: l4(7, 70, 0),
	})
	l.Record(at(t, "2026-10-05T12:00:01Z"), map[string]Usage{
		vipA: l4(110, 1100, 2),
		vipB: l4(600, 6000, 6),
	})
	save(t, l)

	// Down for an hour. vipA kept counting in the pinned maps, vipB's
	// entry was recreated, pool only ever had a baseline.
	l = open(t, path, at(t, "2026-10-05T13:00:01Z"))
	snap := l.Snapshot(at(t, "2026-10-05T13:00:01Z"))
	if got, want := subj(t, snap, vipA).Period, l4(10, 100, 1); got != want {
		t.Errorf("period after reopen = %+v, want %+v", got, want)
	}
	snap = l.Record(at(t, "2026-10-05T13:00:01Z"), map[string]Usage{
		vipA: l4(1110, 11100, 12),
		vipB: l4(40, 400, 1),
		pool: l4(9, 90, 1),
	})
	if got, want := subj(t, snap, vipA).Interval, l4(1000, 10000, 10); got != want {
		t.Errorf("downtime interval = %+v, want %+v", got, want)
	}
	if got, want := subj(t, snap, vipA).Period, l4(1010, 10100, 11); got != want {
		t.Errorf("period = %+v, want %+v", got, want)
	}
	if got, want := subj(t, snap, vipB).Period, l4(140, 1400, 2); got != want {
		t.Errorf("reset subject period = %+v, want %+v", got, want)
	}
	if got, want := subj(t, snap, pool).Period, l4(2, 20, 1); got != want {
		t.Errorf("baseline-only subject period = %+v, want %+v", got, want)
	}
	if snap.IntervalSeconds != 3600 {
		t.Errorf("IntervalSeconds = %v, want 3600 (the downtime)", snap.IntervalSeconds)
	}
}

func TestMonthRollover(t *testing.T) {
	path := filepath.Join(t.TempDir(), "billing.json")
	l := open(t, path, at(t, "2026-01-31T23:59:58Z"))
	l.Record(at(t, "2026-01-31T23:59:58Z"), map[string]Usage{vipA: l4(0, 0, 0), vipB: l4(0, 0, 0)})
	l.Record(at(t, "2026-01-31T23:59:59Z"), map[string]Usage{vipA: l4(10, 100, 1), vipB: l4(1, 1, 1)})
	l.AddL7(pool, 4, 40, 400)
	save(t, l)

	// The delta of the Record that crosses midnight goes to February.
	snap := l.Record(at(t, "2026-02-01T00:00:00.5Z"), map[string]Usage{vipA: l4(15, 150, 1)})
	if ps := at(t, "2026-02-01T00:00:00Z"); !snap.PeriodStart.Equal(ps) {
		t.Errorf("PeriodStart = %v, want %v", snap.PeriodStart, ps)
	}
	if pe := at(t, "2026-03-01T00:00:00Z"); !snap.PeriodEnd.Equal(pe) {
		t.Errorf("PeriodEnd = %v, want %v", snap.PeriodEnd, pe)
	}
	if d := snap.PeriodEnd.Sub(snap.PeriodStart); d != 28*24*time.Hour {
		t.Errorf("February 2026 lasts %v, want 28 days", d)
	}
	if got, want := subj(t, snap, vipA).Period, l4(5, 50, 0); got != want {
		t.Errorf("new period = %+v, want %+v (the crossing delta)", got, want)
	}
	if got := subj(t, snap, pool).Period; got != (Usage{}) {
		t.Errorf("pool period = %+v, want zero", got)
	}

	// The archive is written by Save, before the state file.
	archive := path + ".2026-01"
	if _, err := os.Stat(archive); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("archive exists before Save: %v", err)
	}
	save(t, l)
	old := readState(t, archive)
	if !old.PeriodStart.Equal(at(t, "2026-01-01T00:00:00Z")) {
		t.Errorf("archive period_start = %v", old.PeriodStart)
	}
	if got, want := old.Subjects[vipA].Period, l4(10, 100, 1); got != want {
		t.Errorf("archived vipA = %+v, want %+v", got, want)
	}
	if got, want := old.Subjects[pool].Period, (Usage{Requests: 4, BytesIn: 40, BytesOut: 400}); got != want {
		t.Errorf("archived pool = %+v, want %+v", got, want)
	}
	if fi, err := os.Stat(archive); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("archive mode: %v, %v", fi.Mode(), err)
	}
	cur := readState(t, path)
	if !cur.PeriodStart.Equal(snap.PeriodStart) || cur.Subjects[vipA].Period != l4(5, 50, 0) {
		t.Errorf("state file = %+v / %+v, want February totals", cur.PeriodStart, cur.Subjects[vipA])
	}

	// vipB and pool were not seen in February: dropped when it ends.
	// Snapshot rolls over too.
	l.Record(at(t, "2026-02-10T00:00:00Z"), map[string]Usage{vipA: l4(20, 200, 2)})
	snap = l.Snapshot(at(t, "2026-03-01T00:00:00Z"))
	if !snap.PeriodStart.Equal(at(t, "2026-03-01T00:00:00Z")) || subj(t, snap, vipA).Period != (Usage{}) {
		t.Errorf("March snapshot = %+v", snap)
	}
	if hasSubj(snap, vipB) || hasSubj(snap, pool) {
		t.Errorf("subjects unseen for a whole period kept: %+v", snap.Subjects)
	}
	save(t, l)
	if got, want := readState(t, path+".2026-02").Subjects[vipA].Period, l4(10, 100, 1); got != want {
		t.Errorf("February archive vipA = %+v, want %+v", got, want)
	}

	// The clock stepping back does not return to February.
	l.Record(at(t, "2026-03-01T00:00:01Z"), map[string]Usage{vipA: l4(20, 200, 2)})
	snap = l.Record(at(t, "2026-02-28T23:00:00Z"), map[string]Usage{vipA: l4(25, 250, 2)})
	if !snap.PeriodStart.Equal(at(t, "2026-03-01T00:00:00Z")) || subj(t, snap, vipA).Period != l4(5, 50, 0) {
		t.Errorf("after clock step back: %+v", snap)
	}
	if snap.IntervalSeconds != 0 {
		t.Errorf("negative interval reported as %v, want 0", snap.IntervalSeconds)
	}
}

func TestPeriodOf(t *testing.T) {
	for _, tc := range []struct {
		in, start, end string
		days           int
	}{
		{"2026-02-14T10:00:00Z", "2026-02-01T00:00:00Z", "2026-03-01T00:00:00Z", 28},
		{"2028-02-29T23:59:59.999Z", "2028-02-01T00:00:00Z", "2028-03-01T00:00:00Z", 29},
		{"2026-12-31T23:59:59Z", "2026-12-01T00:00:00Z", "2027-01-01T00:00:00Z", 31},
		{"2026-04-30T12:00:00Z", "2026-04-01T00:00:00Z", "2026-05-01T00:00:00Z", 30},
		// Local midnight of March 1st east of UTC is still February.
		{"2026-03-01T00:30:00+01:00", "2026-02-01T00:00:00Z", "2026-03-01T00:00:00Z", 28},
	} {
		start, end := PeriodOf(at(t, tc.in))
		if !start.Equal(at(t, tc.start)) || !end.Equal(at(t, tc.end)) || start.Location() != time.UTC {
			t.Errorf("PeriodOf(%s) = %v, %v; want %s, %s", tc.in, start, end, tc.start, tc.end)
		}
		if d := end.Sub(start); d != time.Duration(tc.days)*24*time.Hour {
			t.Errorf("PeriodOf(%s) lasts %v, want %d days", tc.in, d, tc.days)
		}
	}
}

func TestOpenArchivesEarlierMonth(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "billing.json")
	l := open(t, path, at(t, "2026-09-29T10:00:00Z"))
	l.Record(at(t, "2026-09-29T10:00:00Z"), map[string]Usage{vipA: l4(100, 1000, 1)})
	l.Record(at(t, "2026-09-29T10:00:01Z"), map[string]Usage{vipA: l4(300, 3000, 3)})
	save(t, l)
	septFile, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}

	// The agent is down until November.
	l = open(t, path, at(t, "2026-11-03T08:00:00Z"))
	archived, err := os.ReadFile(path + ".2026-09")
	if err != nil {
		t.Fatalf("archive not written by Open: %v", err)
	}
	var st stateFile
	if err := json.Unmarshal(archived, &st); err != nil {
		t.Fatal(err)
	}
	if st.Version != fileVersion || st.Subjects[vipA].Period != l4(200, 2000, 2) {
		t.Errorf("archive = %s", archived)
	}
	cur := readState(t, path)
	if !cur.PeriodStart.Equal(at(t, "2026-11-01T00:00:00Z")) || cur.Subjects[vipA].Period != (Usage{}) {
		t.Errorf("state file after Open = %+v %+v", cur.PeriodStart, cur.Subjects[vipA])
	}
	if cur.Subjects[vipA].Baseline == nil || *cur.Subjects[vipA].Baseline != (Counters{300, 3000, 3}) {
		t.Errorf("baseline not kept across the archive: %+v", cur.Subjects[vipA].Baseline)
	}
	// Traffic while down is accounted to the new period.
	snap := l.Record(at(t, "2026-11-03T08:00:00Z"), map[string]Usage{vipA: l4(350, 3500, 4)})
	if got, want := subj(t, snap, vipA).Period, l4(50, 500, 1); got != want {
		t.Errorf("November period = %+v, want %+v", got, want)
	}
	if _, err := os.Stat(path + ".2026-10"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("an archive was written for October, a month without data: %v", err)
	}

	t.Run("existing archive covering the period is kept", func(t *testing.T) {
		// A crash after the archive was written but before the state file.
		dir := t.TempDir()
		path := filepath.Join(dir, "billing.json")
		if err := os.WriteFile(path, septFile, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path+".2026-09", septFile, 0o600); err != nil {
			t.Fatal(err)
		}
		open(t, path, at(t, "2026-10-01T00:00:00Z"))
		if _, err := os.Stat(path + ".2026-09.1"); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("duplicate archive written: %v", err)
		}
		if got, err := os.ReadFile(path + ".2026-09"); err != nil || string(got) != string(septFile) {
			t.Errorf("existing archive changed: %v", err)
		}
	})

	t.Run("existing archive with other data is not overwritten", func(t *testing.T) {
		dir := t.TempDir()
		path := filepath.Join(dir, "billing.json")
		if err := os.WriteFile(path, septFile, 0o600); err != nil {
			t.Fatal(err)
		}
		other := []byte("not an archive of ours\n")
		if err := os.WriteFile(path+".2026-09", other, 0o600); err != nil {
			t.Fatal(err)
		}
		open(t, path, at(t, "2026-10-01T00:00:00Z"))
		if got, err := os.ReadFile(path + ".2026-09"); err != nil || string(got) != string(other) {
			t.Errorf("existing archive overwritten: %v", err)
		}
		if got := readState(t, path+".2026-09.1"); got.Subjects[vipA].Period != l4(200, 2000, 2) {
			t.Errorf("numbered archive = %+v", got.Subjects[vipA])
		}
	})
}

// TestOpenCorrupt: a state file that cannot be used used to stop the agent
// from starting. It is moved aside (kept for whoever bills) and logged, and
// a fresh period starts. A file of a newer version is good data this agent
// cannot read: that stays an error and the file is left alone.
func TestOpenCorrupt(t *testing.T) {
	now := at(t, "2026-10-05T00:00:00Z")
	for _, tc := range []struct {
		name, content string
		corrupt       bool
	}{
		{"garbage", "{not json", true},
		{"empty", "", true},
		{"trailing data", `{"version":1,"period_start":"2026-10-01T00:00:00Z","subjects":{}} x`, true},
		{"no version", `{"period_start":"2026-10-01T00:00:00Z","subjects":{}}`, true},
		{"mid-month period", `{"version":1,"period_start":"2026-10-02T00:00:00Z","subjects":{}}`, true},
		{"null subject", `{"version":1,"period_start":"2026-10-01T00:00:00Z","subjects":{"vip:x":null}}`, true},
		{"newer version", `{"version":2,"period_start":"2026-10-01T00:00:00Z","subjects":{}}`, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "billing.json")
			if err := os.WriteFile(path, []byte(tc.content), 0o600); err != nil {
				t.Fatal(err)
			}
			var logs strings.Builder
			l, err := Open(path, now, slog.New(slog.NewTextHandler(&logs, nil)))
			if !tc.corrupt {
				if err == nil || !strings.Contains(err.Error(), path) {
					t.Fatalf("Open = %v, want an error naming the file", err)
				}
				if got, _ := os.ReadFile(path); string(got) != tc.content {
					t.Errorf("file modified: %q", got)
				}
				if entries, _ := os.ReadDir(dir); len(entries) != 1 {
					t.Errorf("files created next to the file: %v", entries)
				}
				return
			}
			if err != nil {
				t.Fatalf("Open: %v", err)
			}
			if snap := l.Snapshot(now); len(snap.Subjects) != 0 || !snap.PeriodStart.Equal(at(t, "2026-10-01T00:00:00Z")) {
				t.Errorf("ledger after a corrupt file = %+v, want a fresh October", snap)
			}
			aside, _ := filepath.Glob(path + ".corrupt-*")
			if len(aside) != 1 {
				t.Fatalf("moved-aside files = %q, want one", aside)
			}
			if got, _ := os.ReadFile(aside[0]); string(got) != tc.content {
				t.Errorf("moved-aside file = %q, want the original content", got)
			}
			if !strings.Contains(logs.String(), "level=ERROR") {
				t.Errorf("nothing logged: %q", logs.String())
			}
			if err := l.Save(); err != nil {
				t.Fatalf("Save after a corrupt file: %v", err)
			}
			if st := readState(t, path); st.Version != fileVersion {
				t.Errorf("new state file = %+v", st)
			}
		})
	}

	t.Run("unreadable", func(t *testing.T) {
		path := t.TempDir() // a directory cannot be read as a file
		if _, err := Open(path, now, nil); err == nil || !strings.Contains(err.Error(), path) {
			t.Errorf("Open(directory) = %v, want an error naming it", err)
		}
	})
}

func TestAddL7(t *testing.T) {
	path := filepath.Join(t.TempDir(), "billing.json")
	l := open(t, path, at(t, "2026-10-05T12:00:00Z"))
	l.Record(at(t, "2026-10-05T12:00:00Z"), map[string]Usage{pool: l4(0, 0, 0)})

	l.AddL7(pool, 3, 300, 3000)
	l.AddL7(pool, 1, 100, 1000)
	l.AddL7("pool:api", 2, 20, 200) // a subject only the proxy knows
	l.AddL7("", 1, 1, 1)            // ignored
	l7 := Usage{Requests: 4, BytesIn: 400, BytesOut: 4000}

	snap := l.Snapshot(at(t, "2026-10-05T12:00:00.5Z"))
	if got := subj(t, snap, pool); got.Period != l7 || got.Interval != (Usage{}) {
		t.Errorf("before Record: %+v, want period %+v and an empty interval", got, l7)
	}
	if len(snap.Subjects) != 2 {
		t.Errorf("subjects = %+v", snap.Subjects)
	}

	snap = l.Record(at(t, "2026-10-05T12:00:01Z"), map[string]Usage{pool: l4(5, 50, 1)})
	want := l7
	want.add(l4(5, 50, 1))
	if got := subj(t, snap, pool); got.Interval != want || got.Period != want {
		t.Errorf("after Record: %+v, want interval and period %+v", got, want)
	}
	if got, want := subj(t, snap, "pool:api"), (Usage{Requests: 2, BytesIn: 20, BytesOut: 200}); got.Interval != want || got.Period != want {
		t.Errorf("proxy-only subject = %+v, want %+v", got, want)
	}

	snap = l.Record(at(t, "2026-10-05T12:00:02Z"), map[string]Usage{pool: l4(5, 50, 1)})
	if got := subj(t, snap, pool); got.Interval != (Usage{}) || got.Period != want {
		t.Errorf("next interval: %+v, want empty interval, period %+v", got, want)
	}

	save(t, l)
	l = open(t, path, at(t, "2026-10-05T12:01:00Z"))
	if got := subj(t, l.Snapshot(at(t, "2026-10-05T12:01:00Z")), pool).Period; got != want {
		t.Errorf("after restart: %+v, want %+v", got, want)
	}
}

func TestSaveAtomic(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "billing.json")
	l := open(t, path, at(t, "2026-10-05T12:00:00Z"))
	save(t, l) // a fresh ledger creates its file
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("fresh ledger not saved: %v", err)
	}
	l.Record(at(t, "2026-10-05T12:00:00Z"), map[string]Usage{vipA: l4(1, 2, 3)})
	save(t, l)
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("mode = %v, want 0600", fi.Mode().Perm())
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 1 || entries[0].Name() != "billing.json" {
		t.Errorf("directory holds %v, want only billing.json", entries)
	}
	st := readState(t, path)
	if st.Version != 1 || st.Subjects[vipA].Baseline == nil || *st.Subjects[vipA].Baseline != (Counters{1, 2, 3}) {
		t.Errorf("saved state = %+v", st)
	}

	// Nothing changed: Save does not rewrite the file.
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	save(t, l)
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("unchanged ledger rewritten: %v", err)
	}

	// A failed save names the file and leaves no temporary file behind:
	// renaming over a directory fails, even for root.
	l.AddL7(pool, 1, 1, 1)
	if err := os.MkdirAll(filepath.Join(path, "x"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := l.Save(); err == nil || !strings.Contains(err.Error(), path) {
		t.Errorf("Save over a directory = %v, want an error naming %s", err, path)
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 1 {
		t.Errorf("directory holds %v after a failed save, want only billing.json", entries)
	}
	if err := os.RemoveAll(path); err != nil {
		t.Fatal(err)
	}
	save(t, l) // retried: still dirty
	if got := readState(t, path).Subjects[pool]; got == nil || got.Period.Requests != 1 {
		t.Errorf("retried save = %+v", got)
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 1 {
		t.Errorf("directory holds %v, want only billing.json", entries)
	}
}

func TestRun(t *testing.T) {
	path := filepath.Join(t.TempDir(), "billing.json")
	l := open(t, path, at(t, "2026-10-05T12:00:00Z"))
	if err := l.Run(context.Background(), 0, nil); err == nil {
		t.Error("Run with a zero interval succeeded")
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- l.Run(ctx, time.Hour, func(err error) { t.Error(err) }) }()
	l.Record(at(t, "2026-10-05T12:00:00Z"), map[string]Usage{vipA: l4(1, 1, 1)})
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Run: %v", err)
	}
	if st := readState(t, path); st.Subjects[vipA] == nil {
		t.Errorf("final save missing: %+v", st)
	}
}

func TestConcurrent(t *testing.T) {
	path := filepath.Join(t.TempDir(), "billing.json")
	l := open(t, path, at(t, "2026-10-05T12:00:00Z"))
	base := at(t, "2026-10-05T12:00:00Z")
	const writers, steps = 4, 200

	var wg sync.WaitGroup
	for w := range writers {
		name := fmt.Sprintf("vip:10.0.0.%d:80/tcp", w)
		wg.Go(func() {
			for i := range steps + 1 {
				u := l4(uint64(i)*10, uint64(i)*100, uint64(i))
				l.Record(base.Add(time.Duration(i)*time.Millisecond), map[string]Usage{name: u})
			}
		})
	}
	wg.Go(func() {
		for range steps {
			l.AddL7(pool, 1, 2, 3)
		}
	})
	wg.Go(func() {
		for i := range steps {
			snap := l.Snapshot(base.Add(time.Duration(i) * time.Millisecond))
			data, err := json.Marshal(snap)
			if err != nil || len(data) == 0 {
				t.Error(err)
			}
		}
	})
	wg.Go(func() {
		for range 20 {
			if err := l.Save(); err != nil {
				t.Error(err)
			}
		}
	})
	wg.Wait()

	snap := l.Snapshot(base.Add(time.Second))
	for w := range writers {
		name := fmt.Sprintf("vip:10.0.0.%d:80/tcp", w)
		if got, want := subj(t, snap, name).Period, l4(steps*10, steps*100, steps); got != want {
			t.Errorf("%s period = %+v, want %+v", name, got, want)
		}
	}
	if got, want := subj(t, snap, pool).Period, (Usage{Requests: steps, BytesIn: 2 * steps, BytesOut: 3 * steps}); got != want {
		t.Errorf("pool period = %+v, want %+v", got, want)
	}
	save(t, l)
	if got := readState(t, path).Subjects[pool].Period.Requests; got != steps {
		t.Errorf("saved requests = %d, want %d", got, steps)
	}
}
