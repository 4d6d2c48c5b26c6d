package api

import (
	"bufio"
	"encoding/json"
	"os"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"
)

// jsonFields lists the JSON names of a struct's fields, embedded structs
// flattened, in declaration order.
func jsonFields(t reflect.Type) []string {
	var out []string
	for i := range t.NumField() {
		f := t.Field(i)
		if !f.IsExported() {
			continue
		}
		name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		if name == "-" {
			continue
		}
		if f.Anonymous && name == "" && f.Type.Kind() == reflect.Struct {
			out = append(out, jsonFields(f.Type)...)
			continue
		}
		if name == "" {
			name = f.Name
		}
		out = append(out, name)
	}
	return out
}

// messageTypes maps every WebSocket message type to the Go type of its data.
var messageTypes = map[string]any{
	MsgConnected:       ConnectedData{},
	MsgPong:            PongData{},
	MsgError:           ErrorData{},
	MsgMetricsUpdate:   MetricsView{},
	MsgBackendUpdate:   BackendUpdate{},
	MsgStatusUpdate:    StatusView{},
	MsgHealthStatus:    HealthStatus{},
	MsgHealthEvent:     HealthEvent{},
	MsgSecurityEvent:   SecurityEventData{},
	MsgSecuritySummary: SecuritySummary{},
	MsgUsageUpdate:     UsageUpdate{},
	MsgAIStatus:        AIStatus{},
	MsgInsight:         Insight{},
}

// documentedFields reads the message table of docs/ARCHITECTURE.md:
// "| `type` | field, field, ... |".
func documentedFields(t *testing.T) map[string][]string {
	t.Helper()
	f, err := os.Open("../../docs/ARCHITECTURE.md")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	row := regexp.MustCompile("^\\| `([a-z_]+)` \\| ([a-z_0-9, ]+) \\|$")
	out := map[string][]string{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if m := row.FindStringSubmatch(sc.Text()); m != nil {
			out[m[1]] = strings.Split(m[2], ", ")
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// Every message type of the seven channels is a named Go type, and its
// fields are the ones docs/ARCHITECTURE.md documents, in the same order. A
// message of each type decodes as the envelope the contract promises.
func TestMessageFieldsMatchTheDocument(t *testing.T) {
	doc := documentedFields(t)
	for typ, data := range messageTypes {
		want, ok := doc[typ]
		if !ok {
			t.Errorf("message type %q is not in docs/ARCHITECTURE.md's message table", typ)
			continue
		}
		if got := jsonFields(reflect.TypeOf(data)); !slices.Equal(got, want) {
			t.Errorf("%s: the Go type has fields %q, the document %q", typ, got, want)
		}
		raw, err := json.Marshal(NewMessage(typ, data))
		if err != nil {
			t.Fatalf("%s: %v", typ, err)
		}
		var env struct {
			Type      string          `json:"type"`
			Timestamp time.Time       `json:"timestamp"`
			Data      json.RawMessage `json:"data"`
		}
		if err := json.Unmarshal(raw, &env); err != nil || env.Type != typ || env.Timestamp.IsZero() ||
			!strings.HasPrefix(string(env.Data), "{") {
			t.Errorf("%s: the message %s does not decode as {type, timestamp, data object}: %v", typ, raw, err)
		}
	}
	for typ := range doc {
		if _, ok := messageTypes[typ]; !ok {
			t.Errorf("docs/ARCHITECTURE.md documents message type %q, which has no Go type", typ)
		}
	}
}
