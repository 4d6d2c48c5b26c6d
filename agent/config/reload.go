package config

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"time"
)

// Settling: a reload reads the file until two reads a settle interval apart
// agree, so that a SIGHUP landing while an editor (or a configuration
// manager) is still writing does not apply a valid prefix of the file.
const (
	DefaultSettle    = 100 * time.Millisecond
	DefaultSettleMax = 5 * time.Second
)

// LoadSettled reads path once its content has stopped changing: the size,
// modification time and bytes must be the same on two reads settle apart.
// It gives up after max with an error naming the file, and validates the
// settled content as Load does.
func LoadSettled(ctx context.Context, path string, settle, max time.Duration) (*Config, error) {
	data, err := readSettled(ctx, path, settle, max)
	if err != nil {
		return nil, err
	}
	c, err := Parse(data)
	if err != nil {
		return nil, fmt.Errorf("config: load %s: %w", path, err)
	}
	return c, nil
}

type fileSnapshot struct {
	size  int64
	mtime time.Time
	data  []byte
}

func snapshot(path string) (fileSnapshot, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return fileSnapshot{}, fmt.Errorf("config: read %s: %w", path, err)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return fileSnapshot{}, fmt.Errorf("config: read %s: %w", path, err)
	}
	return fileSnapshot{size: fi.Size(), mtime: fi.ModTime(), data: data}, nil
}

func (a fileSnapshot) same(b fileSnapshot) bool {
	return a.size == b.size && a.mtime.Equal(b.mtime) && int64(len(a.data)) == a.size && bytes.Equal(a.data, b.data)
}

func readSettled(ctx context.Context, path string, settle, max time.Duration) ([]byte, error) {
	deadline := time.Now().Add(max)
	prev, err := snapshot(path)
	if err != nil {
		return nil, err
	}
	t := time.NewTimer(settle)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("config: read %s: %w", path, ctx.Err())
		case <-t.C:
		}
		cur, err := snapshot(path)
		if err != nil {
			return nil, err
		}
		if cur.same(prev) {
			return cur.data, nil
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("config: read %s: the file kept changing for %s; not applying a file that is still being written", path, max)
		}
		prev = cur
		t.Reset(settle)
	}
}

// CheckReplacement says whether next may replace cur in a running agent
// when it comes from the file (a reload): it refuses changes only a restart
// can make, and a file that would withdraw every VIP without saying so.
// A file whose vips key is missing or empty-valued is most likely cut
// short or half edited; withdrawing everything takes an explicit
// `vips: []`.
func CheckReplacement(cur, next *Config) error {
	errs := []error{RestartOnlyChanges(cur, next)}
	if len(cur.VIPs) > 0 && next.VIPs == nil {
		errs = append(errs, fmt.Errorf("vips: the file lists no VIPs, which would withdraw all %d running; write `vips: []` to do that on purpose",
			len(cur.VIPs)))
	}
	return errors.Join(errs...)
}

// RestartOnlyChanges names the settings that differ between cur and next
// and that a running agent cannot change: they size or shape the loaded
// maps, or start the proxy's listeners.
func RestartOnlyChanges(cur, next *Config) error {
	var errs []error
	if cur.Dataplane.RingSize != next.Dataplane.RingSize {
		errs = append(errs, fmt.Errorf("dataplane.ring_size: changing %d to %d needs `veloflux detach` and a restart",
			cur.Dataplane.RingSize, next.Dataplane.RingSize))
	}
	if cur.Proxy.Enabled != next.Proxy.Enabled {
		errs = append(errs, errors.New("proxy.enabled: turning the L7 proxy on or off needs a restart"))
	}
	if cur.Dataplane.ConntrackSize != next.Dataplane.ConntrackSize {
		errs = append(errs, fmt.Errorf("dataplane.conntrack_size: changing %d to %d needs `veloflux detach` and a restart",
			cur.Dataplane.ConntrackSize, next.Dataplane.ConntrackSize))
	}
	if cur, next := cur.Dataplane.NAT.TableSize, next.Dataplane.NAT.TableSize; cur != next {
		errs = append(errs, fmt.Errorf("dataplane.nat.table_size: changing %d to %d needs `veloflux detach` and a restart", cur, next))
	}
	// Not pinned, so a restart is enough: the new agent loads a new table.
	if cur, next := cur.Dataplane.NewFlowLimit.TableSize, next.Dataplane.NewFlowLimit.TableSize; cur != next {
		errs = append(errs, fmt.Errorf("dataplane.new_flow_limit.table_size: changing %d to %d needs a restart", cur, next))
	}
	return errors.Join(errs...)
}
