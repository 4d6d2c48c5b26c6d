package billing

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"slices"
	"time"

	"github.com/veloflux/veloflux/agent/statefile"
)

// fileVersion is the version of the state and archive file format this
// package writes and reads.
const fileVersion = 1

// fileMode is the mode of every file the ledger writes: usage per VIP is
// customer data.
const fileMode fs.FileMode = 0o600

// maxArchiveCopies bounds the numbered archives tried for one month; more
// than a handful means something other than a crash is writing them.
const maxArchiveCopies = 100

// ErrCorrupt is wrapped by the error decodeState returns for a file that
// cannot be used. It wraps statefile.ErrCorrupt, so that Open moves such a
// state file aside instead of failing.
var ErrCorrupt = fmt.Errorf("billing state file: %w", statefile.ErrCorrupt)

// stateFile is the persisted form of a period: the state file holds the
// current one, an archive a finished one.
type stateFile struct {
	Version     int       `json:"version"`
	PeriodStart time.Time `json:"period_start"`
	PeriodEnd   time.Time `json:"period_end"` // informational; derived from period_start
	UpdatedAt   time.Time `json:"updated_at,omitzero"`
	// LastRecord is when the baselines were sampled, so that the first
	// interval after a restart has a length.
	LastRecord time.Time               `json:"last_record,omitzero"`
	Subjects   map[string]*fileSubject `json:"subjects"`
}

type fileSubject struct {
	Kind     string    `json:"kind"` // informational; derived from the name
	Period   Usage     `json:"period"`
	Baseline *Counters `json:"baseline,omitempty"` // last cumulative sample
	Seen     bool      `json:"seen_in_period"`
}

// Open returns the ledger persisted at path, as of time now.
//
//   - A missing file starts a fresh period (the month of now) with no
//     baselines.
//   - A file of the current month is resumed: totals and baselines.
//   - A file of an earlier month is archived as path+".YYYY-MM" (its own
//     month) before Open returns, and a fresh period starts; the baselines
//     are kept, so traffic since the file was last saved is accounted to
//     the new period by the first Record.
//   - A file of a later month (the clock went back) is resumed as is: the
//     ledger never returns to an earlier period.
//   - A file that cannot be parsed, or fails validation, is moved aside as
//     path+".corrupt-<timestamp>" and logged, and a fresh period starts as
//     for a missing file: the agent must not stay down over its ledger.
//   - A file of an unknown version (written by a newer agent) is an error
//     and is left as it is: its data is good, this agent cannot read it,
//     and starting a second ledger for the month beside it would split
//     the bill.
func Open(path string, now time.Time, log *slog.Logger) (*Ledger, error) {
	now = now.UTC()
	l := &Ledger{path: path, subjects: map[string]*subject{}, updated: now}
	var st *stateFile
	found, err := statefile.Read(path, log, func(data []byte) (err error) {
		st, err = decodeState(data)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("billing: open: %w", err)
	}
	if !found {
		l.periodStart, _ = PeriodOf(now)
		l.gen = 1 // so that the first Save creates the file
		return l, nil
	}
	l.load(st)
	if l.rollover(now) {
		l.touch(now)
		// Archive now rather than at the first periodic Save: the operator
		// restarting the agent early in a month expects last month's file.
		if err := l.Save(); err != nil {
			return nil, fmt.Errorf("billing: open %s: start period %s: %w",
				path, l.periodStart.Format("2006-01"), err)
		}
	}
	return l, nil
}

// Save writes the periods that have ended since the last Save to their
// archives, then the current period to the state file. It does nothing if
// nothing changed since the last successful Save.
//
// Every file is written with statefile.Write: atomically, and durably.
// Archives come first, so the state file never moves to a new period while
// the old one exists nowhere on disk; a failed archive is retried by the
// next Save.
//
// Archives are never overwritten. If path+".YYYY-MM" already exists (a crash
// between writing an archive and the state file leaves both, and the next
// Open archives the state file again), it is kept, and the period is
// considered archived if the existing file holds at least the same totals
// for every subject; otherwise the period goes to path+".YYYY-MM.1" (".2",
// and so on), and whoever bills must pick the file with the larger totals.
func (l *Ledger) Save() error {
	l.saveMu.Lock()
	defer l.saveMu.Unlock()

	l.mu.Lock()
	if l.gen == l.savedGen && len(l.finished) == 0 {
		l.mu.Unlock()
		return nil
	}
	finished := slices.Clone(l.finished)
	cur := l.stateLocked()
	gen := l.gen
	l.mu.Unlock()

	for _, st := range finished {
		if err := l.writeArchive(st); err != nil {
			return err
		}
		// Only Save removes from finished, under saveMu; rollover only
		// appends. So the head is still st.
		l.mu.Lock()
		l.finished = slices.Delete(l.finished, 0, 1)
		l.mu.Unlock()
	}

	data, err := encodeState(cur)
	if err != nil {
		return fmt.Errorf("billing: save %s: %w", l.path, err)
	}
	if err := statefile.Write(l.path, data, statefile.Options{Perm: fileMode}); err != nil {
		return fmt.Errorf("billing: save %s: %w", l.path, err)
	}
	l.mu.Lock()
	l.savedGen = max(l.savedGen, gen)
	l.mu.Unlock()
	return nil
}

// Run saves the ledger every interval until ctx is done, then saves once
// more and returns that final Save's error. A failed periodic Save is passed
// to report (if not nil) and retried at the next tick; nothing is lost in
// memory. Records made after Run returns need another Save.
func (l *Ledger) Run(ctx context.Context, every time.Duration, report func(error)) error {
	if every <= 0 {
		return fmt.Errorf("billing: run %s: save interval %v is not positive", l.path, every)
	}
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return l.Save()
		case <-t.C:
			if err := l.Save(); err != nil && report != nil {
				report(err)
			}
		}
	}
}

// stateLocked returns a deep copy of the current period in its file form.
func (l *Ledger) stateLocked() *stateFile {
	start, end := PeriodOf(l.periodStart)
	st := &stateFile{
		Version:     fileVersion,
		PeriodStart: start,
		PeriodEnd:   end,
		UpdatedAt:   l.updated,
		LastRecord:  l.lastRecord,
		Subjects:    make(map[string]*fileSubject, len(l.subjects)),
	}
	for name, s := range l.subjects {
		fsub := &fileSubject{Kind: KindOf(name), Period: s.period, Seen: s.seen}
		if s.base != nil {
			b := *s.base
			fsub.Baseline = &b
		}
		st.Subjects[name] = fsub
	}
	return st
}

// load replaces the ledger's period with st, which decodeState validated.
func (l *Ledger) load(st *stateFile) {
	l.periodStart = st.PeriodStart
	l.lastRecord = st.LastRecord.UTC()
	if !st.UpdatedAt.IsZero() {
		l.updated = st.UpdatedAt.UTC()
	}
	for name, fsub := range st.Subjects {
		s := &subject{period: fsub.Period, seen: fsub.Seen}
		if fsub.Baseline != nil {
			b := *fsub.Baseline
			s.base = &b
		}
		l.subjects[name] = s
	}
}

func encodeState(st *stateFile) ([]byte, error) {
	// Indented: operators read these files when a bill is disputed.
	data, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return nil, err
	}
	return append(data, '\n'), nil
}

// decodeState parses and validates a state or archive file.
func decodeState(data []byte) (*stateFile, error) {
	var st stateFile
	if err := json.Unmarshal(data, &st); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrCorrupt, err)
	}
	switch {
	case st.Version == 0:
		return nil, fmt.Errorf("%w: no version", ErrCorrupt)
	case st.Version != fileVersion:
		// Probably written by a newer agent before a downgrade; its data is
		// fine, this agent just cannot read it.
		return nil, fmt.Errorf("unsupported billing state file version %d (this agent reads version %d)",
			st.Version, fileVersion)
	}
	start, _ := PeriodOf(st.PeriodStart)
	if st.PeriodStart.IsZero() || !start.Equal(st.PeriodStart) {
		return nil, fmt.Errorf("%w: period_start %s is not the first instant of a month in UTC",
			ErrCorrupt, st.PeriodStart.Format(time.RFC3339))
	}
	st.PeriodStart = start
	for name, fsub := range st.Subjects {
		if name == "" {
			return nil, fmt.Errorf("%w: subject with an empty name", ErrCorrupt)
		}
		if fsub == nil {
			return nil, fmt.Errorf("%w: subject %q is null", ErrCorrupt, name)
		}
	}
	return &st, nil
}

// writeArchive writes the finished period st to its archive, never
// overwriting an existing archive (see Save).
func (l *Ledger) writeArchive(st *stateFile) error {
	base := l.path + "." + st.PeriodStart.Format("2006-01")
	data, err := encodeState(st)
	if err != nil {
		return fmt.Errorf("billing: archive %s: %w", base, err)
	}
	for i := range maxArchiveCopies {
		name := base
		if i > 0 {
			name = fmt.Sprintf("%s.%d", base, i)
		}
		existing, err := os.ReadFile(name)
		if errors.Is(err, fs.ErrNotExist) {
			if err := statefile.Write(name, data, statefile.Options{Perm: fileMode, Exclusive: true}); err != nil {
				return fmt.Errorf("billing: archive %s: %w", name, err)
			}
			return nil
		}
		if err != nil {
			return fmt.Errorf("billing: archive %s: %w", name, err)
		}
		if old, err := decodeState(existing); err == nil && covers(old, st) {
			return nil
		}
	}
	return fmt.Errorf("billing: archive %s: %d archives of this month already exist", base, maxArchiveCopies)
}

// covers reports whether the archive old holds at least what st holds, so
// that writing st would add nothing.
func covers(old, st *stateFile) bool {
	if !old.PeriodStart.Equal(st.PeriodStart) {
		return false
	}
	for name, s := range st.Subjects {
		if s.Period == (Usage{}) {
			continue
		}
		o, ok := old.Subjects[name]
		if !ok || !o.Period.covers(s.Period) {
			return false
		}
	}
	return true
}
