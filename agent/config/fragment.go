package config

import (
	"reflect"
)

// DecodeFragment strictly decodes one section of the configuration (a Pool,
// Backend, VIP or Route), given as YAML or JSON (JSON is YAML), into v, with
// that section's own defaults applied first. Problems are reported as a
// *ValidationError under path, for example "pools[2].backends[0].port", so
// that an API body is judged by the same rules and in the same words as the
// file. Rules that involve the rest of the configuration (unique names,
// references between sections) are checked when the whole is parsed.
func DecodeFragment(data []byte, path string, v any) error {
	rv := reflect.ValueOf(v)
	if rv.Kind() != reflect.Pointer || rv.IsNil() || rv.Elem().Kind() != reflect.Struct {
		return &ValidationError{Errors: []FieldError{{Path: path, Message: "internal: DecodeFragment needs a pointer to a struct"}}}
	}
	root, ferr := parseDocument(data)
	if ferr != nil {
		ferr.Path = path
		return &ValidationError{Errors: []FieldError{*ferr}}
	}
	if def, ok := v.(defaulter); ok {
		def.setDefaults()
	}
	d := newDecoder()
	d.decode(path, root, rv.Elem())
	if len(d.errs) > 0 {
		return &ValidationError{Errors: d.errs}
	}
	return nil
}

// Clone returns a deep copy, so that a change can be tried on the copy and
// thrown away whole if it does not validate.
func (c *Config) Clone() (*Config, error) {
	data, err := c.Marshal()
	if err != nil {
		return nil, err
	}
	return Parse(data)
}

// Modify returns a new configuration: a copy of c changed by mutate, then
// put through Parse as a whole, so that defaults, normalization and every
// validation rule apply exactly as to the file. c itself never changes; an
// error from mutate or validation comes back as it is.
func (c *Config) Modify(mutate func(*Config) error) (*Config, error) {
	next, err := c.Clone()
	if err != nil {
		return nil, err
	}
	if err := mutate(next); err != nil {
		return nil, err
	}
	data, err := next.Marshal()
	if err != nil {
		return nil, err
	}
	return Parse(data)
}

// redactedSecret stands in for a secret in Redacted's copy.
const redactedSecret = "<redacted>"

// Redacted returns a copy of c fit to show: the BGP peers' TCP MD5
// passwords are replaced, so that GET /api/config does not hand them to
// whoever may read it. It is for display only: what it does not change it
// shares with c, so treat it as read-only, like the configuration in force.
func (c *Config) Redacted() *Config {
	out := *c
	if c.BGP != nil && len(c.BGP.Peers) > 0 {
		bgp := *c.BGP
		bgp.Peers = append(bgp.Peers[:0:0], c.BGP.Peers...)
		for i := range bgp.Peers {
			if bgp.Peers[i].Password != "" {
				bgp.Peers[i].Password = redactedSecret
			}
		}
		out.BGP = &bgp
	}
	return &out
}
