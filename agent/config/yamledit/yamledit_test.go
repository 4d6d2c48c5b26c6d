package yamledit

import (
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"
)

func node(t *testing.T, text string) *yaml.Node {
	t.Helper()
	var n yaml.Node
	if err := yaml.Unmarshal([]byte(text), &n); err != nil {
		t.Fatalf("parse %q: %v", text, err)
	}
	return &n
}

func TestApply(t *testing.T) {
	for _, tc := range []struct {
		name, src, from, to, want string
	}{{
		name: "a changed scalar keeps its quotes and line comment",
		src:  "# head\nlisten: \":9090\"   # the API\nother: 1\n",
		from: "{listen: ':9090', other: 1}",
		to:   "{listen: ':9191', other: 1}",
		want: "# head\nlisten: \":9191\"   # the API\nother: 1\n",
	}, {
		name: "a removed first key of a list element keeps the dash",
		src:  "routes:\n  - host: a\n    # the prefix\n    path: /\n  - host: b\n    path: /b\n",
		from: "{routes: [{host: a, path: /}, {host: b, path: /b}]}",
		to:   "{routes: [{path: /}, {host: b, path: /b}]}",
		want: "routes:\n  -\n    # the prefix\n    path: /\n  - host: b\n    path: /b\n",
	}, {
		name: "a removed element takes its own comment and one blank line",
		src:  "xs:\n  # one\n  - 1\n\n  # two\n  - 2\n\n  # three\n  - 3\n",
		from: "{xs: [1, 2, 3]}",
		to:   "{xs: [1, 3]}",
		want: "xs:\n  # one\n  - 1\n\n  # three\n  - 3\n",
	}, {
		name: "an element inserted in the middle goes before the next one's comment",
		src:  "xs:\n  - 1 # one\n  # three\n  - 3\n",
		from: "{xs: [1, 3]}",
		to:   "{xs: [1, 2, 3]}",
		want: "xs:\n  - 1 # one\n  - 2\n  # three\n  - 3\n",
	}, {
		name: "an empty value becomes a block after its comments",
		src:  "node:\n  # name: x\n\nb: 1\n",
		from: "{node: {name: h}, b: 1}",
		to:   "{node: {name: y}, b: 1}",
		want: "node:\n  # name: x\n  name: y\n\nb: 1\n",
	}, {
		name: "a flow mapping keeps the operator's spelling and omissions",
		src:  "xs:\n  - {address: 10.0.0.1, timeout: 5m}\n",
		from: "{xs: [{address: 10.0.0.1, timeout: 5m0s, weight: 1}]}",
		to:   "{xs: [{address: 10.0.0.1, timeout: 5m0s, weight: 2}]}",
		want: "xs:\n  - {address: 10.0.0.1, timeout: 5m, weight: 2}\n",
	}, {
		name: "a default left out is written only as far as it changes",
		src:  "a: 1\n",
		from: "{a: 1, limits: {rate: 0, burst: 0}}",
		to:   "{a: 1, limits: {rate: 0, burst: 5}}",
		want: "a: 1\nlimits:\n  burst: 5\n",
	}, {
		name: "a list losing its last element says []",
		src:  "# the services\nvips:   # none yet\n  # the web VIP\n  - a\n\nb: 1\n",
		from: "{vips: [a], b: 1}",
		to:   "{vips: [], b: 1}",
		want: "# the services\nvips: []   # none yet\n\nb: 1\n",
	}, {
		name: "a literal block scalar is replaced whole",
		src:  "text: |\n  one\n  two\nb: 1\n",
		from: "{text: \"one\\ntwo\\n\", b: 1}",
		to:   "{text: three, b: 1}",
		want: "text: three\nb: 1\n",
	}} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Apply([]byte(tc.src), node(t, tc.from), node(t, tc.to))
			if err != nil {
				t.Fatalf("Apply: %v", err)
			}
			if string(got) != tc.want {
				t.Errorf("Apply =\n%s\nwant\n%s", got, tc.want)
			}
		})
	}
}

func TestApplyRefuses(t *testing.T) {
	for _, tc := range []struct {
		name, src, from, to, err string
	}{{
		name: "anchors",
		src:  "a: &x 1\nb: *x\n",
		from: "{a: 1, b: 1}",
		to:   "{a: 2, b: 1}",
		err:  "a: cannot edit a value with a YAML anchor",
	}, {
		name: "lists that do not match",
		src:  "xs: [1, 1]\nys:\n  - 1\n  - 1\n",
		from: "{xs: [1, 1], ys: [1]}",
		to:   "{xs: [1, 1], ys: [1, 2]}",
		err:  "ys: the file lists 2 entries where the configuration has 1",
	}, {
		name: "not a mapping",
		src:  "- 1\n",
		from: "[1]",
		to:   "[2]",
		err:  "not a block mapping",
	}} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Apply([]byte(tc.src), node(t, tc.from), node(t, tc.to))
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("Apply = %v, want an error containing %q", err, tc.err)
			}
		})
	}
}
