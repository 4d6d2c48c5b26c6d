// Package yamledit changes a YAML document the way a careful person would:
// only the values that differ are rewritten, and everything else (comments,
// blank lines, key order, quoting, indentation, flow or block style) stays
// byte for byte as it was.
//
// Re-encoding a parsed document cannot do that: on a plain round trip of the
// shipped example configuration, go.yaml.in/yaml/v3 drops the blank lines
// and moves comments, and github.com/goccy/go-yaml moves the comments that
// follow a list dash and re-spaces line comments. So the document is only
// parsed to learn where each node sits, and every change is a splice into
// the original text: a scalar is replaced where it stands, a removed key or
// list element is cut out with the comment lines directly above it, and
// new keys and elements are rendered by the YAML encoder and inserted with
// the indentation of their siblings.
package yamledit

import (
	"bytes"
	"cmp"
	"errors"
	"fmt"
	"slices"
	"strings"
	"unicode/utf8"

	"go.yaml.in/yaml/v3"
)

// Apply returns src changed so that where it described from, it describes
// to. from and to are trees of the same schema, as yaml.Node.Encode makes
// them, and src must decode to from, except that keys src leaves out stand
// for their values in from (defaults): such keys are written only when
// their value changes, and then only the parts that change.
//
// Lists are matched element by element (a longest common subsequence of
// equal elements), so removing a middle element leaves its neighbours'
// text alone, and an element that changed is edited rather than rewritten.
//
// The caller must check that the result decodes as intended: Apply works
// on the text and trusts src to be an ordinary YAML document; anchors and
// aliases in a part that changes are refused.
func Apply(src []byte, from, to *yaml.Node) ([]byte, error) {
	var doc yaml.Node
	if err := yaml.Unmarshal(src, &doc); err != nil {
		return nil, fmt.Errorf("parse the document: %w", err)
	}
	root := unwrap(&doc)
	if root == nil || root.Kind != yaml.MappingNode || root.Style&yaml.FlowStyle != 0 {
		return nil, errors.New("the document is not a block mapping")
	}
	e := newEditor(src)
	if err := e.change("", root, unwrap(from), unwrap(to), owner{indent: -1}); err != nil {
		return nil, err
	}
	return e.result()
}

func unwrap(n *yaml.Node) *yaml.Node {
	if n != nil && n.Kind == yaml.DocumentNode {
		if len(n.Content) == 0 {
			return nil
		}
		return n.Content[0]
	}
	return n
}

// owner says where a value sits: its key's or its dash's indentation, and
// the line that key or dash is on, so that a value can be replaced by a
// block below it.
type owner struct {
	indent int // column of the key or dash (0-based); -1 for the root
	line   int // 0-based line of the key or dash
}

type splice struct {
	start, end int
	text       string
	order      int
}

type editor struct {
	src       []byte
	lineStart []int
	splices   []splice
}

func newEditor(src []byte) *editor {
	e := &editor{src: src, lineStart: []int{0}}
	for i, c := range src {
		if c == '\n' && i+1 < len(src) {
			e.lineStart = append(e.lineStart, i+1)
		}
	}
	return e
}

func (e *editor) add(start, end int, text string) {
	e.splices = append(e.splices, splice{start: start, end: end, text: text, order: len(e.splices)})
}

// result applies the splices. Insertions at one offset keep the order they
// were made in and come before a cut starting there.
func (e *editor) result() ([]byte, error) {
	slices.SortStableFunc(e.splices, func(a, b splice) int {
		if c := cmp.Compare(a.start, b.start); c != 0 {
			return c
		}
		if c := cmp.Compare(a.end-a.start, b.end-b.start); c != 0 {
			return c
		}
		return cmp.Compare(a.order, b.order)
	})
	var out bytes.Buffer
	pos := 0
	for _, s := range e.splices {
		if s.start < pos {
			return nil, fmt.Errorf("internal: overlapping edits at byte %d", s.start)
		}
		out.Write(e.src[pos:s.start])
		out.WriteString(s.text)
		pos = s.end
	}
	out.Write(e.src[pos:])
	return out.Bytes(), nil
}

// Lines, 0-based.

func (e *editor) lines() int { return len(e.lineStart) }

func (e *editor) lineText(l int) string {
	end := e.lineEnd(l)
	s := string(e.src[e.lineStart[l]:end])
	return strings.TrimSuffix(strings.TrimSuffix(s, "\n"), "\r")
}

// lineEnd is the offset just after line l's newline.
func (e *editor) lineEnd(l int) int {
	if l+1 < len(e.lineStart) {
		return e.lineStart[l+1]
	}
	return len(e.src)
}

func (e *editor) lineOf(off int) int {
	l, found := slices.BinarySearch(e.lineStart, off)
	if !found {
		l--
	}
	return l
}

func indentOf(s string) int { return len(s) - len(strings.TrimLeft(s, " ")) }

func (e *editor) isBlank(l int) bool { return strings.TrimSpace(e.lineText(l)) == "" }

func (e *editor) isComment(l int) bool {
	return strings.HasPrefix(strings.TrimSpace(e.lineText(l)), "#")
}

// offset converts a node's 1-based line and column (in characters) to a
// byte offset.
func (e *editor) offset(n *yaml.Node) int {
	l := n.Line - 1
	off := e.lineStart[l]
	for range n.Column - 1 {
		_, size := utf8.DecodeRune(e.src[off:])
		off += size
	}
	return off
}

// end returns the offset just after the text of n, whose key or dash is at
// column indent.
func (e *editor) end(n *yaml.Node, indent int) (int, error) {
	switch {
	case n.Kind == yaml.AliasNode:
		return e.offset(n) + 1 + len(n.Value), nil
	case (n.Kind == yaml.MappingNode || n.Kind == yaml.SequenceNode) && n.Style&yaml.FlowStyle != 0:
		return e.flowEnd(e.offset(n))
	case n.Kind == yaml.MappingNode || n.Kind == yaml.SequenceNode:
		if len(n.Content) == 0 {
			return e.offset(n), nil
		}
		last := n.Content[len(n.Content)-1]
		childIndent := n.Content[0].Column - 1
		if n.Kind == yaml.SequenceNode {
			childIndent = n.Column - 1
		}
		return e.end(last, childIndent)
	}
	start := e.offset(n)
	switch {
	case n.Tag == "!!null" && n.Value == "" && n.Style == 0:
		return start, nil
	case n.Style&(yaml.LiteralStyle|yaml.FoldedStyle) != 0:
		l := e.lineOf(start)
		last := l
		for next := l + 1; next < e.lines(); next++ {
			if e.isBlank(next) {
				continue
			}
			if indentOf(e.lineText(next)) <= indent {
				break
			}
			last = next
		}
		return e.lineStart[last] + len(e.lineText(last)), nil
	case n.Style&(yaml.DoubleQuotedStyle|yaml.SingleQuotedStyle) != 0:
		return e.quotedEnd(start)
	}
	// A plain scalar in block context: to the end of the line or a comment.
	l := e.lineOf(start)
	text := e.lineText(l)
	rest := text[start-e.lineStart[l]:]
	if i := strings.Index(rest, " #"); i >= 0 {
		rest = rest[:i]
	}
	if i := strings.Index(rest, "\t#"); i >= 0 {
		rest = rest[:i]
	}
	return start + len(strings.TrimRight(rest, " \t")), nil
}

func (e *editor) quotedEnd(start int) (int, error) {
	q := e.src[start]
	for i := start + 1; i < len(e.src); i++ {
		switch {
		case q == '"' && e.src[i] == '\\':
			i++
		case e.src[i] == q && q == '\'' && i+1 < len(e.src) && e.src[i+1] == '\'':
			i++
		case e.src[i] == q:
			return i + 1, nil
		}
	}
	return 0, fmt.Errorf("unterminated quoted scalar at byte %d", start)
}

// flowEnd finds the bracket closing the flow collection opening at start.
func (e *editor) flowEnd(start int) (int, error) {
	depth := 0
	for i := start; i < len(e.src); i++ {
		switch c := e.src[i]; c {
		case '[', '{':
			depth++
		case ']', '}':
			depth--
			if depth == 0 {
				return i + 1, nil
			}
		case '"', '\'':
			end, err := e.quotedEnd(i)
			if err != nil {
				return 0, err
			}
			i = end - 1
		case '#':
			if i > 0 && (e.src[i-1] == ' ' || e.src[i-1] == '\t') {
				for i < len(e.src) && e.src[i] != '\n' {
					i++
				}
			}
		}
	}
	return 0, fmt.Errorf("unterminated flow collection at byte %d", start)
}

// span is the whole lines an entry or element occupies, with the comment
// lines directly above it at its own indentation and the comment lines
// below it indented deeper (a commented-out key of its block).
type span struct {
	first, last int // lines
	contentEnd  int // offset after the value's text
}

func (e *editor) span(startLine, indent int, value *yaml.Node) (span, error) {
	end, err := e.end(value, indent)
	if err != nil {
		return span{}, err
	}
	last := max(e.lineOf(max(end-1, 0)), startLine)
	for last+1 < e.lines() && e.isComment(last+1) && indentOf(e.lineText(last+1)) > indent {
		last++
	}
	first := startLine
	for first > 0 && e.isComment(first-1) && indentOf(e.lineText(first-1)) == indent {
		first--
	}
	return span{first: first, last: last, contentEnd: end}, nil
}

// cutLines removes lines first..last, and one blank line after them when
// there is one before them too, so that no double gap is left.
func (e *editor) cutLines(first, last int) {
	if last+1 < e.lines() && e.isBlank(last+1) && (first == 0 || e.isBlank(first-1)) {
		last++
	}
	e.add(e.lineStart[first], e.lineEnd(last), "")
}

// insertLines inserts text (whole lines) before line l, or at the end.
func (e *editor) insertLines(l int, text string) {
	off := len(e.src)
	if l < e.lines() {
		off = e.lineStart[l]
	}
	if off == len(e.src) && len(e.src) > 0 && e.src[len(e.src)-1] != '\n' {
		text = "\n" + text
	}
	e.add(off, off, text)
}

// change edits d, the document's node for the value that was from and is
// to be to.
func (e *editor) change(path string, d, from, to *yaml.Node, own owner) error {
	if equal(from, to) {
		return nil
	}
	if d.Kind == yaml.AliasNode || d.Anchor != "" {
		return fmt.Errorf("%s: cannot edit a value with a YAML anchor or alias", name(path))
	}
	if (d.Kind == yaml.MappingNode || d.Kind == yaml.SequenceNode) && d.Style&yaml.FlowStyle != 0 {
		return e.replaceFlow(path, d, from, to, own)
	}
	switch {
	case d.Kind == yaml.MappingNode && to.Kind == yaml.MappingNode:
		return e.changeMapping(path, d, from, to)
	case d.Kind == yaml.SequenceNode && to.Kind == yaml.SequenceNode && len(to.Content) == 0:
		return e.emptySequence(path, d, own)
	case d.Kind == yaml.SequenceNode && to.Kind == yaml.SequenceNode:
		return e.changeSequence(path, d, from, to)
	case d.Kind == yaml.ScalarNode:
		return e.replaceScalar(path, d, minimal(from, to), own)
	}
	return fmt.Errorf("%s: cannot replace a %s by a %s", name(path), kindName(d), kindName(to))
}

func (e *editor) changeMapping(path string, d, from, to *yaml.Node) error {
	indent := d.Content[0].Column - 1
	var added []*yaml.Node
	for i := 0; i+1 < len(to.Content); i += 2 {
		k, want := to.Content[i], to.Content[i+1]
		was := lookup(from, k.Value)
		if was != nil && equal(was, want) {
			continue
		}
		dk, dv := lookupPair(d, k.Value)
		if dv == nil {
			added = append(added, k, minimal(was, want))
			continue
		}
		if was == nil {
			was = &yaml.Node{Kind: dv.Kind, Tag: dv.Tag}
		}
		if err := e.change(join(path, k.Value), dv, was, want, owner{indent: indent, line: dk.Line - 1}); err != nil {
			return err
		}
	}
	for i := 0; i+1 < len(from.Content); i += 2 {
		k := from.Content[i]
		if lookup(to, k.Value) != nil {
			continue
		}
		if dk, dv := lookupPair(d, k.Value); dv != nil {
			if err := e.deleteEntry(dk, dv, indent); err != nil {
				return err
			}
		}
	}
	if len(added) == 0 {
		return nil
	}
	lastKey, lastValue := d.Content[len(d.Content)-2], d.Content[len(d.Content)-1]
	sp, err := e.span(lastKey.Line-1, indent, lastValue)
	if err != nil {
		return err
	}
	text, err := renderBlock(&yaml.Node{Kind: yaml.MappingNode, Content: added}, indent)
	if err != nil {
		return fmt.Errorf("%s: %w", name(path), err)
	}
	e.insertLines(e.afterClosingComments(sp.last+1, indent), text)
	return nil
}

// afterClosingComments skips the comment lines from line l on that are
// indented at least as far as the block's entries: they close the block
// (often a commented-out example of the very key being added), so what is
// appended to the block goes after them.
func (e *editor) afterClosingComments(l, indent int) int {
	for l < e.lines() && e.isComment(l) && indentOf(e.lineText(l)) >= indent {
		l++
	}
	return l
}

func (e *editor) deleteEntry(k, v *yaml.Node, indent int) error {
	l := k.Line - 1
	sp, err := e.span(l, indent, v)
	if err != nil {
		return err
	}
	line := e.lineText(l)
	keyCol := e.offset(k) - e.lineStart[l]
	if strings.TrimSpace(line[:keyCol]) == "" {
		e.cutLines(sp.first, sp.last)
		return nil
	}
	// The key shares its line with the dash of a list element: keep the
	// dash (the element's other keys follow on the next lines) and cut
	// from the key to the end of the entry, but not the final newline.
	from := e.lineStart[l] + len(strings.TrimRight(line[:keyCol], " "))
	to := e.lineEnd(sp.last)
	if to > 0 && e.src[to-1] == '\n' {
		to--
	}
	e.add(from, to, "")
	return nil
}

func (e *editor) changeSequence(path string, d, from, to *yaml.Node) error {
	if len(d.Content) != len(from.Content) {
		return fmt.Errorf("%s: the file lists %d entries where the configuration has %d (duplicates merged?)",
			name(path), len(d.Content), len(from.Content))
	}
	items := make([]item, len(d.Content))
	for i, n := range d.Content {
		it, err := e.item(n)
		if err != nil {
			return fmt.Errorf("%s: %w", name(fmt.Sprintf("%s[%d]", path, i)), err)
		}
		items[i] = it
	}
	for _, g := range gaps(from.Content, to.Content) {
		pairs := min(len(g.removed), len(g.added))
		for p := range pairs {
			i, j := g.removed[p], g.added[p]
			if err := e.change(fmt.Sprintf("%s[%d]", path, j), d.Content[i], from.Content[i], to.Content[j],
				owner{indent: items[i].indent, line: items[i].line}); err != nil {
				return err
			}
		}
		for _, i := range g.removed[pairs:] {
			e.cutLines(items[i].span.first, items[i].span.last)
		}
		if len(g.added) > pairs {
			var values []*yaml.Node
			for _, j := range g.added[pairs:] {
				values = append(values, to.Content[j])
			}
			text, err := e.renderItems(d, values, items[0].indent)
			if err != nil {
				return fmt.Errorf("%s: %w", name(path), err)
			}
			at := e.afterClosingComments(items[len(items)-1].span.last+1, items[0].indent)
			if g.before < len(items) {
				at = items[g.before].span.first
			}
			e.insertLines(at, text)
		}
	}
	return nil
}

// renderItems writes new elements of the block list d as "- " lines at
// indent, in flow style when every element d has is a flow collection
// ("- {address: 10.0.0.1, port: 80}"), so that the list keeps one look.
func (e *editor) renderItems(d *yaml.Node, values []*yaml.Node, indent int) (string, error) {
	flow := true
	for _, n := range d.Content {
		flow = flow && (n.Kind == yaml.MappingNode || n.Kind == yaml.SequenceNode) && n.Style&yaml.FlowStyle != 0
	}
	if !flow {
		return renderBlock(&yaml.Node{Kind: yaml.SequenceNode, Content: values}, indent)
	}
	var out strings.Builder
	for _, v := range values {
		text, err := renderInline(v, yaml.FlowStyle, indent)
		if err != nil {
			return "", err
		}
		fmt.Fprintf(&out, "%s- %s\n", strings.Repeat(" ", indent), text)
	}
	return out.String(), nil
}

// emptySequence replaces the block list d, all of whose elements go, by
// "[]" after its key: an empty list that says so, unlike a bare "key:".
func (e *editor) emptySequence(path string, d *yaml.Node, own owner) error {
	if own.indent < 0 {
		return fmt.Errorf("%s: cannot replace the document", name(path))
	}
	first, err := e.item(d.Content[0])
	if err != nil {
		return fmt.Errorf("%s: %w", name(path), err)
	}
	last, err := e.item(d.Content[len(d.Content)-1])
	if err != nil {
		return fmt.Errorf("%s: %w", name(path), err)
	}
	if first.span.first <= own.line {
		return fmt.Errorf("%s: cannot empty a list that starts on its key's line", name(path))
	}
	// The key's line ends with its ":" (and perhaps a comment).
	line := e.lineText(own.line)
	colon := strings.Index(line[own.indent:], ":")
	if colon < 0 {
		return fmt.Errorf("%s: cannot find the key's colon", name(path))
	}
	at := e.lineStart[own.line] + own.indent + colon + 1
	e.add(at, at, " []")
	e.add(e.lineStart[first.span.first], e.lineEnd(last.span.last), "")
	return nil
}

// item is a block list element: its dash and the lines it occupies.
type item struct {
	line, indent int // of the dash
	span         span
}

func (e *editor) item(n *yaml.Node) (item, error) {
	l := n.Line - 1
	prefix := e.lineText(l)[:e.offset(n)-e.lineStart[l]]
	dash := -1
	if t := strings.TrimRight(prefix, " "); strings.HasSuffix(t, "-") {
		dash = len(t) - 1
	} else if strings.TrimSpace(prefix) == "" {
		// "- # comment" with the element on the lines below.
		for l--; l >= 0; l-- {
			t := strings.TrimSpace(e.lineText(l))
			if t == "" || strings.HasPrefix(t, "#") {
				continue
			}
			if t == "-" || strings.HasPrefix(t, "- ") || strings.HasPrefix(t, "-\t") {
				rest := strings.TrimSpace(t[1:])
				if rest == "" || strings.HasPrefix(rest, "#") {
					dash = indentOf(e.lineText(l))
				}
			}
			break
		}
	}
	if dash < 0 {
		return item{}, errors.New("cannot find the dash of a list element")
	}
	sp, err := e.span(l, dash, n)
	if err != nil {
		return item{}, err
	}
	return item{line: l, indent: dash, span: sp}, nil
}

// replaceScalar puts to where the scalar d stands, keeping d's quoting
// where to's value allows it. A collection replacing an empty value is
// written as a block below the key (or inline, when empty).
func (e *editor) replaceScalar(path string, d, to *yaml.Node, own owner) error {
	start := e.offset(d)
	end, err := e.end(d, own.indent)
	if err != nil {
		return err
	}
	if to.Kind != yaml.ScalarNode && len(to.Content) > 0 {
		if own.indent < 0 {
			return fmt.Errorf("%s: cannot replace the document", name(path))
		}
		return e.replaceWithBlock(path, d, to, own, start, end)
	}
	style := d.Style &^ (yaml.LiteralStyle | yaml.FoldedStyle)
	text, err := renderInline(to, style, own.indent)
	if err != nil {
		return fmt.Errorf("%s: %w", name(path), err)
	}
	if start == end && start > 0 && e.src[start-1] != ' ' {
		text = " " + text // "key:" had no value
	}
	e.add(start, end, text)
	return nil
}

// replaceWithBlock replaces the inline value d (at src[start:end]) of the
// entry own with to, written as a block: the old value and the blanks
// before it are cut, and the block goes after the entry's lines.
func (e *editor) replaceWithBlock(path string, d, to *yaml.Node, own owner, start, end int) error {
	sp, err := e.span(own.line, own.indent, d)
	if err != nil {
		return err
	}
	text, err := renderBlock(to, own.indent+2)
	if err != nil {
		return fmt.Errorf("%s: %w", name(path), err)
	}
	cut := start
	for cut > 0 && e.src[cut-1] == ' ' {
		cut--
	}
	e.add(cut, end, "")
	e.insertLines(sp.last+1, text)
	return nil
}

// replaceFlow rewrites a flow collection ("[a, b]", "{k: v}") whole, from
// the document's own elements where they did not change; an empty one that
// receives collections becomes a block, as the encoder would write it.
func (e *editor) replaceFlow(path string, d, from, to *yaml.Node, own owner) error {
	start := e.offset(d)
	end, err := e.flowEnd(start)
	if err != nil {
		return err
	}
	if len(d.Content) == 0 && own.indent >= 0 && hasCollections(to) {
		return e.replaceWithBlock(path, d, to, own, start, end)
	}
	merged := merge(d, from, to)
	merged.Style = yaml.FlowStyle
	text, err := renderInline(merged, yaml.FlowStyle, own.indent)
	if err != nil {
		return fmt.Errorf("%s: %w", name(path), err)
	}
	e.add(start, end, text)
	return nil
}

// merge is to, built from the document's nodes d wherever they still say
// the same, so that a rewritten flow collection keeps the operator's
// spelling of unchanged values and leaves out defaults they left out.
func merge(d, from, to *yaml.Node) *yaml.Node {
	if d != nil && from != nil && equal(from, to) {
		return d
	}
	switch {
	case d != nil && d.Kind == yaml.MappingNode && to.Kind == yaml.MappingNode:
		out := &yaml.Node{Kind: yaml.MappingNode, Tag: d.Tag, Style: d.Style}
		for i := 0; i+1 < len(d.Content); i += 2 {
			k, v := d.Content[i], d.Content[i+1]
			want := lookup(to, k.Value)
			switch {
			case want != nil:
				out.Content = append(out.Content, k, merge(v, lookup(from, k.Value), want))
			case lookup(from, k.Value) == nil:
				out.Content = append(out.Content, k, v) // an empty value the schema omits
			}
		}
		for i := 0; i+1 < len(to.Content); i += 2 {
			k, want := to.Content[i], to.Content[i+1]
			if _, dv := lookupPair(d, k.Value); dv != nil {
				continue
			}
			if was := lookup(from, k.Value); was == nil || !equal(was, want) {
				out.Content = append(out.Content, k, minimal(was, want))
			}
		}
		return out
	case d != nil && from != nil && d.Kind == yaml.SequenceNode && to.Kind == yaml.SequenceNode &&
		len(d.Content) == len(from.Content):
		out := &yaml.Node{Kind: yaml.SequenceNode, Tag: d.Tag, Style: d.Style}
		matched := lcs(from.Content, to.Content)
		byNew := map[int]int{}
		for _, m := range matched {
			byNew[m[1]] = m[0]
		}
		for j, want := range to.Content {
			if i, ok := byNew[j]; ok {
				out.Content = append(out.Content, d.Content[i])
			} else {
				out.Content = append(out.Content, want)
			}
		}
		return out
	}
	return to
}

// minimal is what must be written for a key the document leaves out: the
// parts of want that differ from was, its value so far (its default).
func minimal(was, want *yaml.Node) *yaml.Node {
	if was == nil || was.Kind != yaml.MappingNode || want.Kind != yaml.MappingNode {
		return want
	}
	out := &yaml.Node{Kind: yaml.MappingNode, Tag: want.Tag}
	for i := 0; i+1 < len(want.Content); i += 2 {
		k, v := want.Content[i], want.Content[i+1]
		old := lookup(was, k.Value)
		if old != nil && equal(old, v) {
			continue
		}
		out.Content = append(out.Content, k, minimal(old, v))
	}
	return out
}

// gap is a run of elements between two that stayed: removed from the old
// list, added to the new one, before the old element at index before.
type gap struct {
	removed, added []int
	before         int
}

func gaps(from, to []*yaml.Node) []gap {
	var out []gap
	i, j := 0, 0
	for _, m := range append(lcs(from, to), [2]int{len(from), len(to)}) {
		g := gap{before: m[0]}
		for ; i < m[0]; i++ {
			g.removed = append(g.removed, i)
		}
		for ; j < m[1]; j++ {
			g.added = append(g.added, j)
		}
		if len(g.removed) > 0 || len(g.added) > 0 {
			out = append(out, g)
		}
		i, j = m[0]+1, m[1]+1
	}
	return out
}

// lcs returns index pairs of a longest common subsequence of equal
// elements.
func lcs(a, b []*yaml.Node) [][2]int {
	n, m := len(a), len(b)
	table := make([][]int, n+1)
	for i := range table {
		table[i] = make([]int, m+1)
	}
	for i := n - 1; i >= 0; i-- {
		for j := m - 1; j >= 0; j-- {
			if equal(a[i], b[j]) {
				table[i][j] = table[i+1][j+1] + 1
			} else {
				table[i][j] = max(table[i+1][j], table[i][j+1])
			}
		}
	}
	var out [][2]int
	for i, j := 0, 0; i < n && j < m; {
		switch {
		case equal(a[i], b[j]):
			out = append(out, [2]int{i, j})
			i++
			j++
		case table[i+1][j] >= table[i][j+1]:
			i++
		default:
			j++
		}
	}
	return out
}

// renderBlock writes n in block style with every line indented by indent
// columns: a mapping as its entries, a list as its "- " elements.
func renderBlock(n *yaml.Node, indent int) (string, error) {
	var buf bytes.Buffer
	enc := yaml.NewEncoder(&buf)
	enc.SetIndent(2)
	if err := enc.Encode(n); err != nil {
		return "", fmt.Errorf("render: %w", err)
	}
	if err := enc.Close(); err != nil {
		return "", fmt.Errorf("render: %w", err)
	}
	pad := strings.Repeat(" ", indent)
	var out strings.Builder
	for line := range strings.Lines(buf.String()) {
		if strings.TrimSpace(line) != "" {
			out.WriteString(pad)
		}
		out.WriteString(line)
	}
	return out.String(), nil
}

// renderInline writes n on one line where it stands (a scalar, or a flow
// collection), in style where the value allows it. Should the encoder wrap
// a long flow collection, its continuation lines are indented below the
// owner so that they stay inside it.
func renderInline(n *yaml.Node, style yaml.Style, indent int) (string, error) {
	c := *n
	c.Style = style
	if c.Kind == yaml.ScalarNode {
		c.Style &^= yaml.FlowStyle
	}
	if c.Kind != yaml.ScalarNode {
		c.Style |= yaml.FlowStyle
	}
	data, err := yaml.Marshal(&c)
	if err != nil {
		return "", fmt.Errorf("render: %w", err)
	}
	text := strings.TrimSuffix(string(data), "\n")
	if c.Kind == yaml.ScalarNode && strings.Contains(text, "\n") {
		return "", fmt.Errorf("cannot write the multi-line value %q in place", n.Value)
	}
	return strings.ReplaceAll(text, "\n", "\n"+strings.Repeat(" ", max(indent, 0)+2)), nil
}

func lookupPair(m *yaml.Node, key string) (k, v *yaml.Node) {
	if m == nil || m.Kind != yaml.MappingNode {
		return nil, nil
	}
	for i := 0; i+1 < len(m.Content); i += 2 {
		if m.Content[i].Value == key {
			return m.Content[i], m.Content[i+1]
		}
	}
	return nil, nil
}

func lookup(m *yaml.Node, key string) *yaml.Node {
	_, v := lookupPair(m, key)
	return v
}

// equal compares values, not their spelling or position.
func equal(a, b *yaml.Node) bool {
	if a == nil || b == nil {
		return a == b
	}
	if a.Kind != b.Kind || len(a.Content) != len(b.Content) {
		return false
	}
	if a.Kind == yaml.ScalarNode && (a.Value != b.Value || a.ShortTag() != b.ShortTag()) {
		return false
	}
	for i := range a.Content {
		if !equal(a.Content[i], b.Content[i]) {
			return false
		}
	}
	return true
}

func hasCollections(n *yaml.Node) bool {
	for _, c := range n.Content {
		if c.Kind == yaml.MappingNode || c.Kind == yaml.SequenceNode {
			return true
		}
	}
	return n.Kind == yaml.MappingNode && len(n.Content) > 0
}

func join(path, key string) string {
	if path == "" {
		return key
	}
	return path + "." + key
}

func name(path string) string {
	if path == "" {
		return "the document"
	}
	return path
}

func kindName(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "mapping"
	case yaml.SequenceNode:
		return "list"
	case yaml.ScalarNode:
		return "value"
	}
	return "node"
}
