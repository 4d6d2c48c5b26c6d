package deploy

import (
	"fmt"
	"reflect"
	"slices"
	"strings"
	"testing"
)

// The module does not depend on Prometheus's own PromQL parser, and these
// tests must not add it, so this file reads just enough PromQL to say which
// metrics an expression selects and which labels it uses. It knows the
// grammar's shape, not its semantics: the names and labels it returns are
// for checking against a scrape, and `promtool check rules` is what
// validates the syntax.

// selector is one vector selector, `name{label="value", ...}`.
type selector struct {
	name   string
	labels []string // the labels its matchers name
	pos    int      // index of its first token
}

// grouping is a by/without/on/ignoring/group_left/group_right clause.
type grouping struct {
	keyword string
	labels  []string
	// For by and without, the token range of the aggregated expression:
	// the labels must exist on every selector inside it. For on, ignoring
	// and the group modifiers the whole expression (start 0, end -1).
	start, end int
}

// exprUse is what an expression selects and groups by.
type exprUse struct {
	selectors []selector
	groupings []grouping
}

type tokKind int

const (
	tIdent tokKind = iota
	tNumber
	tString
	tPunct // ( ) { } [ ] ,
	tOp
)

type token struct {
	kind tokKind
	text string
}

var (
	groupKeywords = map[string]bool{"by": true, "without": true, "on": true, "ignoring": true,
		"group_left": true, "group_right": true}
	// Words that are operators or literals, never metric names.
	wordOperators = map[string]bool{"and": true, "or": true, "unless": true, "bool": true,
		"offset": true, "atan2": true, "inf": true, "nan": true}
	aggregations = map[string]bool{"sum": true, "min": true, "max": true, "avg": true, "group": true,
		"stddev": true, "stdvar": true, "count": true, "count_values": true, "bottomk": true,
		"topk": true, "quantile": true, "limitk": true, "limit_ratio": true}
)

func isIdentStart(c byte) bool {
	return c == '_' || c == ':' || ('a' <= c && c <= 'z') || ('A' <= c && c <= 'Z')
}

func isIdentChar(c byte) bool { return isIdentStart(c) || ('0' <= c && c <= '9') }

// lex splits a PromQL expression into tokens.
func lex(expr string) ([]token, error) {
	var toks []token
	for i := 0; i < len(expr); {
		c := expr[i]
		switch {
		case c == ' ' || c == '\t' || c == '\n' || c == '\r':
			i++
		case c == '#':
			for i < len(expr) && expr[i] != '\n' {
				i++
			}
		case isIdentStart(c):
			j := i + 1
			for j < len(expr) && isIdentChar(expr[j]) {
				j++
			}
			toks = append(toks, token{tIdent, expr[i:j]})
			i = j
		case ('0' <= c && c <= '9') || c == '.':
			// Numbers and durations alike: 0.5, 1e3, 5m, 1h30m.
			j := i + 1
			for j < len(expr) && (isIdentChar(expr[j]) || expr[j] == '.') {
				j++
			}
			toks = append(toks, token{tNumber, expr[i:j]})
			i = j
		case c == '"' || c == '\'' || c == '`':
			j := i + 1
			for j < len(expr) && expr[j] != c {
				if expr[j] == '\\' && c != '`' {
					j++
				}
				j++
			}
			if j >= len(expr) {
				return nil, fmt.Errorf("unterminated string at offset %d", i)
			}
			toks = append(toks, token{tString, expr[i+1 : j]})
			i = j + 1
		case strings.IndexByte("(){}[],", c) >= 0:
			toks = append(toks, token{tPunct, string(c)})
			i++
		default:
			if i+1 < len(expr) {
				if two := expr[i : i+2]; two == "==" || two == "!=" || two == "=~" || two == "!~" ||
					two == ">=" || two == "<=" {
					toks = append(toks, token{tOp, two})
					i += 2
					continue
				}
			}
			if strings.IndexByte("=<>+-*/%^@:", c) < 0 {
				return nil, fmt.Errorf("unexpected %q at offset %d", c, i)
			}
			toks = append(toks, token{tOp, string(c)})
			i++
		}
	}
	return toks, nil
}

// matchBrackets maps the index of every opening bracket to the index of
// its closing one.
func matchBrackets(toks []token) (map[int]int, error) {
	pairs := map[string]string{")": "(", "}": "{", "]": "["}
	match := map[int]int{}
	var stack []int
	for i, t := range toks {
		if t.kind != tPunct {
			continue
		}
		switch t.text {
		case "(", "{", "[":
			stack = append(stack, i)
		case ")", "}", "]":
			if len(stack) == 0 || toks[stack[len(stack)-1]].text != pairs[t.text] {
				return nil, fmt.Errorf("unbalanced %q (token %d)", t.text, i)
			}
			match[stack[len(stack)-1]] = i
			stack = stack[:len(stack)-1]
		}
	}
	if len(stack) > 0 {
		return nil, fmt.Errorf("unclosed %q", toks[stack[len(stack)-1]].text)
	}
	return match, nil
}

// labelList reads `( a, b, ... )` starting at the "(" at index open.
func labelList(toks []token, open, close int) ([]string, error) {
	var labels []string
	for _, t := range toks[open+1 : close] {
		switch {
		case t.kind == tIdent:
			labels = append(labels, t.text)
		case t.kind == tPunct && t.text == ",":
		default:
			return nil, fmt.Errorf("unexpected %q in a label list", t.text)
		}
	}
	return labels, nil
}

// matcherLabels reads the label names of `{ l op "v", ... }` starting at
// the "{" at index open.
func matcherLabels(toks []token, open, close int) ([]string, error) {
	var labels []string
	for i := open + 1; i < close; i++ {
		t := toks[i]
		if t.kind == tPunct && t.text == "," {
			continue
		}
		if (t.kind != tIdent && t.kind != tString) || i+2 >= close || toks[i+1].kind != tOp ||
			toks[i+2].kind != tString {
			return nil, fmt.Errorf("malformed label matcher at %q", t.text)
		}
		labels = append(labels, t.text)
		i += 2
	}
	return labels, nil
}

// analyze returns the selectors and grouping clauses of a PromQL
// expression.
func analyze(expr string) (exprUse, error) {
	var u exprUse
	toks, err := lex(expr)
	if err != nil {
		return u, err
	}
	match, err := matchBrackets(toks)
	if err != nil {
		return u, err
	}
	next := func(i int) token {
		if i+1 < len(toks) {
			return toks[i+1]
		}
		return token{}
	}
	isOpen := func(t token, b string) bool { return t.kind == tPunct && t.text == b }
	// clause reads a grouping keyword at i and its label list; it returns
	// the labels and the index after the clause.
	clause := func(i int) ([]string, int, error) {
		if !isOpen(next(i), "(") {
			return nil, i + 1, nil
		}
		labels, err := labelList(toks, i+1, match[i+1])
		return labels, match[i+1] + 1, err
	}

	for i := 0; i < len(toks); i++ {
		t := toks[i]
		switch {
		case isOpen(t, "["):
			// A range or subquery: durations only.
			i = match[i]
		case isOpen(t, "{"):
			// A selector without a name outside matchers.
			labels, err := matcherLabels(toks, i, match[i])
			if err != nil {
				return u, err
			}
			u.selectors = append(u.selectors, selector{labels: labels, pos: i})
			i = match[i]
		case t.kind != tIdent:
		case aggregations[t.text] && (isOpen(next(i), "(") || groupKeywords[next(i).text]):
			g := grouping{}
			j := i + 1
			if groupKeywords[toks[j].text] {
				g.keyword = toks[j].text
				if g.labels, j, err = clause(j); err != nil {
					return u, err
				}
			}
			if j >= len(toks) || !isOpen(toks[j], "(") {
				return u, fmt.Errorf("%s: no argument list", t.text)
			}
			g.start, g.end = j, match[j]
			if k := g.end + 1; g.keyword == "" && k < len(toks) && groupKeywords[toks[k].text] {
				g.keyword = toks[k].text
				if g.labels, _, err = clause(k); err != nil {
					return u, err
				}
			}
			if g.keyword != "" {
				u.groupings = append(u.groupings, g)
			}
			// The argument is scanned by the loop; a postfix clause is
			// skipped as a keyword below.
		case groupKeywords[t.text]:
			if t.text == "by" || t.text == "without" {
				// A postfix clause already recorded with its aggregation.
				_, j, err := clause(i)
				if err != nil {
					return u, err
				}
				i = j - 1
				continue
			}
			if !isOpen(next(i), "(") {
				continue // group_left or group_right with no label list
			}
			labels, j, err := clause(i)
			if err != nil {
				return u, err
			}
			u.groupings = append(u.groupings, grouping{keyword: t.text, labels: labels, start: 0, end: -1})
			i = j - 1
		case wordOperators[t.text]:
		case isOpen(next(i), "("):
			// A function call.
		default:
			s := selector{name: t.text, pos: i}
			if isOpen(next(i), "{") {
				if s.labels, err = matcherLabels(toks, i+1, match[i+1]); err != nil {
					return u, err
				}
				i = match[i+1]
			}
			u.selectors = append(u.selectors, s)
		}
	}
	return u, nil
}

// selectorsIn returns the selectors whose first token lies in [start, end];
// end -1 means all of them.
func (u exprUse) selectorsIn(start, end int) []selector {
	var out []selector
	for _, s := range u.selectors {
		if end < 0 || (s.pos > start && s.pos < end) {
			out = append(out, s)
		}
	}
	return out
}

func TestAnalyze(t *testing.T) {
	type sel struct {
		Name   string
		Labels []string
	}
	type grp struct {
		Keyword string
		Labels  []string
		Metrics []string // names of the selectors in its scope
	}
	for _, tc := range []struct {
		expr      string
		selectors []sel
		groupings []grp
	}{
		{expr: `up{job="veloflux"} == 0`, selectors: []sel{{"up", []string{"job"}}}},
		{
			expr:      `sum by (pool) (rate(x_total{code=~"5.."}[5m])) / sum(rate(x_total[5m])) by (pool, route) > 0.05`,
			selectors: []sel{{"x_total", []string{"code"}}, {"x_total", nil}},
			groupings: []grp{{"by", []string{"pool"}, []string{"x_total"}}, {"by", []string{"pool", "route"}, []string{"x_total"}}},
		},
		{
			expr:      "a / ignoring (reason) group_left sum without (le) (b{c!='d'}) # comment\n",
			selectors: []sel{{"a", nil}, {"b", []string{"c"}}},
			groupings: []grp{
				{"ignoring", []string{"reason"}, []string{"a", "b"}},
				{"without", []string{"le"}, []string{"b"}},
			},
		},
		{
			expr:      `(a > 0.05) * on (vip) group_left (pool, mode) info offset 5m and histogram_quantile(0.99, rate(h_bucket[5m:1m]))`,
			selectors: []sel{{"a", nil}, {"info", nil}, {"h_bucket", nil}},
			groupings: []grp{
				{"on", []string{"vip"}, []string{"a", "info", "h_bucket"}},
				{"group_left", []string{"pool", "mode"}, []string{"a", "info", "h_bucket"}},
			},
		},
		{expr: `max(x) == 0 unless count(y) > bool 1`, selectors: []sel{{"x", nil}, {"y", nil}}},
	} {
		u, err := analyze(tc.expr)
		if err != nil {
			t.Errorf("analyze(%q): %v", tc.expr, err)
			continue
		}
		var sels []sel
		for _, s := range u.selectors {
			sels = append(sels, sel{s.name, s.labels})
		}
		var grps []grp
		for _, g := range u.groupings {
			var names []string
			for _, s := range u.selectorsIn(g.start, g.end) {
				names = append(names, s.name)
			}
			grps = append(grps, grp{g.keyword, g.labels, names})
		}
		if !reflect.DeepEqual(sels, tc.selectors) {
			t.Errorf("analyze(%q) selectors:\n got %v\nwant %v", tc.expr, sels, tc.selectors)
		}
		if !reflect.DeepEqual(grps, tc.groupings) {
			t.Errorf("analyze(%q) groupings:\n got %v\nwant %v", tc.expr, grps, tc.groupings)
		}
	}
	for _, bad := range []string{`sum(x`, `x{a="b"`, `x{a}`, `"open`, `x $ y`} {
		if _, err := analyze(bad); err == nil {
			t.Errorf("analyze(%q): no error", bad)
		}
	}
}

// templateLabels returns the X of every {{ ... $labels.X ... }} in s.
func templateLabels(s string) []string {
	var out []string
	for rest := s; ; {
		i := strings.Index(rest, "$labels.")
		if i < 0 {
			break
		}
		rest = rest[i+len("$labels."):]
		j := 0
		for j < len(rest) && isIdentChar(rest[j]) {
			j++
		}
		if j > 0 && !slices.Contains(out, rest[:j]) {
			out = append(out, rest[:j])
		}
	}
	return out
}
