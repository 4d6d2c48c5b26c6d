package config

import (
	"fmt"
	"math"
	"reflect"
	"strconv"
	"strings"

	"go.yaml.in/yaml/v3"
)

// maxDecodeNodes bounds the work done by one decode. Aliases let a small
// document expand into an enormous one ("billion laughs"); the config can
// arrive through the API, so the limit must hold for hostile input. Real
// configurations are orders of magnitude smaller.
const maxDecodeNodes = 1 << 20

// decoder walks a yaml.Node tree alongside the Go value it decodes into.
// yaml.v3's own decoder stops at the first unknown field when KnownFields is
// set and reports line numbers rather than paths; walking the tree ourselves
// lets us report every problem, each under its path.
type decoder struct {
	errs []FieldError
	// failed holds paths whose value could not be decoded, so that
	// validation errors about the same value can be suppressed.
	failed map[string]bool
	// expanding holds the alias nodes currently being followed, to detect
	// aliases that (indirectly) contain themselves.
	expanding map[*yaml.Node]bool
	budget    int
}

func newDecoder() *decoder {
	return &decoder{
		failed:    make(map[string]bool),
		expanding: make(map[*yaml.Node]bool),
		budget:    maxDecodeNodes,
	}
}

// report records a problem that does not invalidate a value (unknown or
// duplicate keys).
func (d *decoder) report(path, format string, args ...any) {
	d.errs = append(d.errs, FieldError{Path: path, Message: fmt.Sprintf(format, args...)})
}

// fail records a value that could not be decoded.
func (d *decoder) fail(path, format string, args ...any) {
	d.report(path, format, args...)
	d.failed[path] = true
}

// failedAt reports whether path or one of its ancestors failed to decode.
func (d *decoder) failedAt(path string) bool {
	for p := path; p != ""; p = parentPath(p) {
		if d.failed[p] {
			return true
		}
	}
	// A failure at the root (decode budget exhausted) leaves the whole
	// configuration partially decoded.
	return d.failed[""]
}

// parentPath returns "a.b" for "a.b.c" and for "a.b[3]", "" for "a".
func parentPath(p string) string {
	i := strings.LastIndexAny(p, ".[")
	if i < 0 {
		return ""
	}
	return p[:i]
}

func joinPath(parent, key string) string {
	if parent == "" {
		return key
	}
	return parent + "." + key
}

func isNull(n *yaml.Node) bool {
	return n.Kind == yaml.ScalarNode && n.ShortTag() == "!!null"
}

// describe names a node's kind for error messages.
func describe(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a mapping"
	case yaml.SequenceNode:
		return "a sequence"
	case yaml.AliasNode:
		return "an alias"
	case yaml.ScalarNode:
		if isNull(n) {
			return "null"
		}
		return strconv.Quote(n.Value)
	}
	return "an empty document"
}

var unmarshalerType = reflect.TypeFor[yaml.Unmarshaler]()

// decode stores n into v, which must be addressable. A null node leaves v
// unchanged, so "key:" with no value keeps the default rather than zeroing
// it.
func (d *decoder) decode(path string, n *yaml.Node, v reflect.Value) {
	if d.budget <= 0 {
		return
	}
	d.budget--
	if d.budget == 0 {
		d.fail("", "document too large: more than %d values after expanding aliases", maxDecodeNodes)
		return
	}

	if n.Kind == yaml.AliasNode {
		if n.Alias == nil {
			d.fail(path, "alias *%s refers to an unknown anchor", n.Value)
			return
		}
		if d.expanding[n] {
			d.fail(path, "alias *%s contains itself", n.Value)
			return
		}
		d.expanding[n] = true
		d.decode(path, n.Alias, v)
		delete(d.expanding, n)
		return
	}
	if isNull(n) {
		return
	}

	if v.CanAddr() && v.Addr().Type().Implements(unmarshalerType) {
		u := v.Addr().Interface().(yaml.Unmarshaler)
		if err := u.UnmarshalYAML(n); err != nil {
			d.fail(path, "%s", err)
		}
		return
	}

	switch v.Kind() {
	case reflect.Struct:
		d.decodeStruct(path, n, v)
	case reflect.Slice:
		d.decodeSlice(path, n, v)
	case reflect.Pointer:
		// Decode into a fresh value so that a failed decode leaves the
		// previous (default) value in place and nothing is shared with it.
		p := reflect.New(v.Type().Elem())
		if df, ok := p.Interface().(defaulter); ok {
			df.setDefaults()
		}
		before := len(d.errs)
		d.decode(path, n, p.Elem())
		// A section (a pointer to a struct) is kept despite errors in
		// some of its fields, so that the rest of it is validated too,
		// as for sections that are not pointers.
		if len(d.errs) == before || p.Elem().Kind() == reflect.Struct {
			v.Set(p)
		}
	case reflect.String:
		if n.Kind != yaml.ScalarNode {
			d.fail(path, "expected a string, got %s", describe(n))
			return
		}
		v.SetString(n.Value)
	case reflect.Bool:
		var b bool
		if n.Kind != yaml.ScalarNode || n.ShortTag() != "!!bool" || n.Decode(&b) != nil {
			d.fail(path, "cannot parse %s as boolean (want true or false)", describe(n))
			return
		}
		v.SetBool(b)
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		var i int64
		// Requiring the !!int tag rejects quoted numbers and floats, which
		// yaml.v3 would otherwise accept (silently truncating 1.5 to 1).
		if n.Kind != yaml.ScalarNode || n.ShortTag() != "!!int" || n.Decode(&i) != nil {
			d.fail(path, "cannot parse %s as integer", describe(n))
			return
		}
		if v.OverflowInt(i) {
			d.fail(path, "%s is out of range", n.Value)
			return
		}
		v.SetInt(i)
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		if n.Kind != yaml.ScalarNode || n.ShortTag() != "!!int" {
			d.fail(path, "cannot parse %s as integer", describe(n))
			return
		}
		var u uint64
		if err := n.Decode(&u); err != nil {
			var i int64
			if n.Decode(&i) == nil && i < 0 {
				d.fail(path, "must not be negative, got %s", n.Value)
			} else {
				d.fail(path, "cannot parse %s as integer", describe(n))
			}
			return
		}
		if v.OverflowUint(u) {
			d.fail(path, "%s is out of range", n.Value)
			return
		}
		v.SetUint(u)
	case reflect.Float32, reflect.Float64:
		var f float64
		tag := n.ShortTag()
		if n.Kind != yaml.ScalarNode || (tag != "!!float" && tag != "!!int") || n.Decode(&f) != nil ||
			math.IsNaN(f) || math.IsInf(f, 0) {
			d.fail(path, "cannot parse %s as a number", describe(n))
			return
		}
		v.SetFloat(f)
	default:
		// Only reachable if a field of an unsupported type is added to the
		// schema; report it instead of panicking.
		d.fail(path, "internal error: cannot decode into Go type %s", v.Type())
	}
}

func (d *decoder) decodeStruct(path string, n *yaml.Node, v reflect.Value) {
	if n.Kind != yaml.MappingNode {
		d.fail(path, "expected a mapping, got %s", describe(n))
		return
	}
	fields := yamlFields(v.Type())
	firstLine := make(map[string]int, len(n.Content)/2)
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, val := n.Content[i], n.Content[i+1]
		if k.Kind == yaml.AliasNode && k.Alias != nil {
			k = k.Alias
		}
		if k.Kind != yaml.ScalarNode {
			d.report(path, "line %d: mapping keys must be strings, got %s", k.Line, describe(k))
			continue
		}
		if k.ShortTag() == "!!merge" {
			d.report(joinPath(path, k.Value), "merge keys are not supported")
			continue
		}
		name := k.Value
		fp := joinPath(path, name)
		if line, dup := firstLine[name]; dup {
			d.report(fp, "duplicate key (first defined on line %d)", line)
			continue
		}
		firstLine[name] = k.Line
		idx, ok := fields[name]
		if !ok {
			d.report(fp, "unknown field")
			continue
		}
		d.decode(fp, val, v.Field(idx))
	}
}

func (d *decoder) decodeSlice(path string, n *yaml.Node, v reflect.Value) {
	if n.Kind != yaml.SequenceNode {
		d.fail(path, "expected a sequence, got %s", describe(n))
		return
	}
	s := reflect.MakeSlice(v.Type(), len(n.Content), len(n.Content))
	for i, item := range n.Content {
		e := s.Index(i)
		if df, ok := e.Addr().Interface().(defaulter); ok {
			df.setDefaults()
		}
		d.decode(fmt.Sprintf("%s[%d]", path, i), item, e)
	}
	v.Set(s)
}

// yamlFields maps the YAML key of each exported field of struct type t to
// the field's index.
func yamlFields(t reflect.Type) map[string]int {
	m := make(map[string]int, t.NumField())
	for i := range t.NumField() {
		f := t.Field(i)
		if !f.IsExported() {
			continue
		}
		name, _, _ := strings.Cut(f.Tag.Get("yaml"), ",")
		switch name {
		case "-":
			continue
		case "":
			name = strings.ToLower(f.Name)
		}
		m[name] = i
	}
	return m
}
