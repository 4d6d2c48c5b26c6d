package config

import (
	"bytes"
	"fmt"
	"io/fs"

	"go.yaml.in/yaml/v3"

	"github.com/veloflux/veloflux/agent/config/yamledit"
	"github.com/veloflux/veloflux/agent/statefile"
)

// newFileMode is used when Save creates the file: the config names the API
// token file and describes the network, so it is not world-readable.
const newFileMode fs.FileMode = 0o600

// Save validates c and writes it to path with statefile (atomically, and
// serialised with any other writer of the directory).
//
// An existing file is the operator's: it is edited, not regenerated. Save
// reads it, works out how the configuration it holds differs from c, and
// changes only that in the text, so comments, blank lines, key order and
// quoting stay, and defaults the file leaves out are written only when
// they change (see yamledit.Apply). The edited text must parse to exactly
// c; if it would not, nor if the file on disk no longer parses, nothing is
// written and the error says why. A new file gets c in full.
//
// The previous file is kept as path+".bak". An existing file's permission
// bits are preserved; a new file gets mode 0600. If path is a symbolic
// link, the file it points to is replaced, so that the link keeps working.
func Save(path string, c *Config) error {
	if c == nil {
		return fmt.Errorf("config: save %s: nil config", path)
	}
	// Refuse to persist something Load would reject: the agent would then
	// fail to start after the next restart.
	if err := c.Validate(); err != nil {
		return fmt.Errorf("config: save %s: %w", path, err)
	}
	data, err := c.Marshal()
	if err != nil {
		return fmt.Errorf("config: save %s: %w", path, err)
	}
	// c in the form Load returns it (defaults filled, values canonical):
	// what the written file must parse to.
	want, err := Parse(data)
	if err != nil {
		return fmt.Errorf("config: save %s: %w", path, err)
	}
	err = statefile.Edit(path, statefile.Options{Perm: newFileMode, Backup: true},
		func(current []byte, exists bool) ([]byte, error) {
			if !exists {
				return data, nil
			}
			return editFile(current, want)
		})
	if err != nil {
		return fmt.Errorf("config: save %s: %w", path, err)
	}
	return nil
}

// editFile returns the text of a configuration file changed to say want.
func editFile(current []byte, want *Config) ([]byte, error) {
	was, err := Parse(current)
	if err != nil {
		return nil, fmt.Errorf("the file on disk no longer parses, so it cannot be edited "+
			"without losing what is in it; fix it (or reload it) first: %w", err)
	}
	var from, to yaml.Node
	if err := from.Encode(was); err != nil {
		return nil, fmt.Errorf("encode the configuration on disk: %w", err)
	}
	if err := to.Encode(want); err != nil {
		return nil, fmt.Errorf("encode the new configuration: %w", err)
	}
	edited, err := yamledit.Apply(current, &from, &to)
	if err != nil {
		return nil, fmt.Errorf("edit the file keeping its comments: %w", err)
	}
	got, err := Parse(edited)
	if err != nil {
		return nil, fmt.Errorf("edit the file keeping its comments: the result would not load: %w", err)
	}
	// Compared in their encoded form, in which an empty list and a missing
	// one ("denylist: []" or no denylist) are the same, as for the agent.
	if same, err := sameConfig(got, want); err != nil || !same {
		return nil, fmt.Errorf("edit the file keeping its comments: the result would load as a different configuration (%v)", err)
	}
	// A reload refuses a file that withdraws every VIP without saying
	// "vips: []" (it may be cut short), so an edit that removes the last
	// VIP must say it.
	if len(was.VIPs) > 0 && len(want.VIPs) == 0 && got.VIPs == nil {
		return nil, fmt.Errorf("edit the file keeping its comments: the result would not say `vips: []`")
	}
	return edited, nil
}

func sameConfig(a, b *Config) (bool, error) {
	x, err := a.Marshal()
	if err != nil {
		return false, err
	}
	y, err := b.Marshal()
	if err != nil {
		return false, err
	}
	return bytes.Equal(x, y), nil
}
