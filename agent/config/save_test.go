package config

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// exampleFile is the shipped, heavily commented example configuration.
var exampleFile = filepath.Join("..", "..", "deploy", "veloflux.yaml")

// The VIPs the tests add, in the file's own layout as Save writes them.
const (
	vip443 = `  - address: 10.200.0.101
    port: 443
    protocol: tcp
    mode: dsr
    pool: web
    source_affinity: false
`
	vip8443 = `  - address: 10.200.0.102
    port: 8443
    protocol: tcp
    mode: dsr
    pool: web
    source_affinity: false
`
	// The end of the example's only VIP, after which new ones go.
	vipTail = `    # Send all flows from one client address to the same backend.
    source_affinity: false
`
)

func newVIP(addr string, port int) VIP {
	return VIP{Address: addr, Port: port, Protocol: ProtocolTCP, Mode: VIPModeDSR, Pool: "web"}
}

// TestSaveEditsOperatorsFile: an API write changes only what changed in the
// operator's file. Each case's expected file is the example with exactly
// the expected edit, so every comment, blank line and untouched section is
// checked byte for byte; the result must also load as the new config.
// Before, Save re-marshalled the model and every comment was lost.
func TestSaveEditsOperatorsFile(t *testing.T) {
	for _, tc := range []struct {
		name   string
		before func(*Config) // an earlier API write, if any
		change func(*Config)
		edit   func(t *testing.T, example string) string // the example as it should end up
		// dropsComments: the change removes the only element of a list,
		// which takes the comments inside it along.
		dropsComments bool
	}{{
		name:   "add a VIP",
		change: func(c *Config) { c.VIPs = append(c.VIPs, newVIP("10.200.0.101", 443)) },
		edit: func(t *testing.T, s string) string {
			return replaceOnce(t, s, vipTail, vipTail+vip443)
		},
	}, {
		name: "delete a middle VIP",
		before: func(c *Config) {
			c.VIPs = append(c.VIPs, newVIP("10.200.0.101", 443), newVIP("10.200.0.102", 8443))
		},
		change: func(c *Config) { c.VIPs = append(c.VIPs[:1:1], c.VIPs[2]) },
		edit: func(t *testing.T, s string) string {
			return replaceOnce(t, s, vipTail, vipTail+vip8443)
		},
	}, {
		// The file must then say "vips: []", so that a reload can tell a
		// deliberate withdrawal from a file cut short.
		name:          "delete the only VIP",
		change:        func(c *Config) { c.VIPs = nil },
		dropsComments: true,
		edit: func(t *testing.T, s string) string {
			start := strings.Index(s, "vips:\n")
			end := strings.Index(s, vipTail) + len(vipTail)
			if start < 0 || end < start {
				t.Fatal("the example's VIP section moved")
			}
			return s[:start] + "vips: []\n" + s[end:]
		},
	}, {
		name:   "change a backend weight",
		change: func(c *Config) { w := uint32(5); c.Pools[0].Backends[1].Weight = &w },
		edit: func(t *testing.T, s string) string {
			return replaceOnce(t, s, "address: 10.200.0.12\n        port: 80\n        weight: 1\n",
				"address: 10.200.0.12\n        port: 80\n        weight: 5\n")
		},
	}, {
		name: "add a backend",
		change: func(c *Config) {
			c.Pools[0].Backends = append(c.Pools[0].Backends, Backend{Address: "10.200.0.14", Port: 8080})
		},
		edit: func(t *testing.T, s string) string {
			last := "      - address: 10.200.0.13\n        port: 80\n        weight: 1\n"
			return replaceOnce(t, s, last, last+"      - address: 10.200.0.14\n        port: 8080\n        weight: 1\n")
		},
	}, {
		// A drain-unrelated field the file leaves at its default: it is
		// written (after its commented-out example), and no other default
		// is.
		name:   "set a default-valued field",
		change: func(c *Config) { c.Pools[0].HealthCheck.Port = 8081 },
		edit: func(t *testing.T, s string) string {
			return replaceOnce(t, s, "      # port: 8081\n", "      # port: 8081\n      port: 8081\n")
		},
	}, {
		name:   "add to the denylist",
		change: func(c *Config) { c.Security.Denylist = append(c.Security.Denylist, "192.0.2.0/24") },
		edit: func(t *testing.T, s string) string {
			return replaceOnce(t, s, "  denylist: []\n", "  denylist: [192.0.2.0/24]\n")
		},
	}} {
		t.Run(tc.name, func(t *testing.T) {
			example := readFile(t, exampleFile)
			path := filepath.Join(t.TempDir(), "veloflux.yaml")
			if err := os.WriteFile(path, []byte(example), 0o600); err != nil {
				t.Fatal(err)
			}
			if tc.before != nil {
				saveChange(t, path, tc.before)
			}
			want := saveChange(t, path, tc.change)

			got := readFile(t, path)
			wantText := tc.edit(t, example)
			if got != wantText {
				t.Errorf("saved file differs from the expected edit of the example:\n%s", lineDiff(wantText, got))
			}
			if tc.dropsComments {
				assertCommentsKept(t, wantText, got)
			} else {
				assertCommentsKept(t, example, got)
			}
			loaded, err := Load(path)
			if err != nil {
				t.Fatalf("Load(saved file): %v", err)
			}
			if same, err := sameConfig(loaded, want); err != nil || !same {
				t.Errorf("saved file loads as a different configuration (err=%v)", err)
			}
		})
	}
}

// TestSaveBackupIsPreviousVersion: after two API writes, .bak is the output
// of the first one, comments and all. Before, the first write stripped the
// comments and the second made .bak that stripped file.
func TestSaveBackupIsPreviousVersion(t *testing.T) {
	example := readFile(t, exampleFile)
	path := filepath.Join(t.TempDir(), "veloflux.yaml")
	if err := os.WriteFile(path, []byte(example), 0o640); err != nil {
		t.Fatal(err)
	}
	saveChange(t, path, func(c *Config) { c.API.ProtectReads = true })
	first := readFile(t, path)
	if bak := readFile(t, path+".bak"); bak != example {
		t.Errorf(".bak after the first write is not the original file:\n%s", lineDiff(example, bak))
	}
	saveChange(t, path, func(c *Config) { c.VIPs = append(c.VIPs, newVIP("10.200.0.101", 443)) })
	if bak := readFile(t, path+".bak"); bak != first {
		t.Errorf(".bak after the second write is not the first write's output:\n%s", lineDiff(first, bak))
	}
	assertCommentsKept(t, example, readFile(t, path+".bak"))
	assertCommentsKept(t, example, readFile(t, path))
	assertMode(t, path, 0o640)
	assertOnlyFiles(t, filepath.Dir(path), "veloflux.yaml", "veloflux.yaml.bak")
}

// TestSaveRefusesUnfaithfulEdit: when the file cannot be edited into the
// new configuration (here its denylist names one network twice, which the
// model holds once, so entries cannot be matched), or no longer parses,
// Save fails with a clear error and writes nothing.
func TestSaveRefusesUnfaithfulEdit(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "veloflux.yaml")
	text := minimal + "security:\n  denylist:\n    - 10.0.0.1\n    - 10.0.0.1/32\n"
	if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	next, err := c.Modify(func(c *Config) error {
		c.Security.Denylist = append(c.Security.Denylist, "192.0.2.0/24")
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	err = Save(path, next)
	if err == nil || !strings.Contains(err.Error(), "security.denylist") {
		t.Errorf("Save = %v, want an error naming security.denylist", err)
	}
	if got := readFile(t, path); got != text {
		t.Error("a refused Save changed the file")
	}

	if err := os.WriteFile(path, []byte("node: [\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := Save(path, next); err == nil || !strings.Contains(err.Error(), "no longer parses") {
		t.Errorf("Save over a broken file = %v, want an error saying it no longer parses", err)
	}
	assertOnlyFiles(t, dir, "veloflux.yaml")
}

// TestSaveFileWithoutVIPs: a file with no vips key (an agent with no VIPs)
// takes an unrelated write without gaining one; only removing the last VIP
// must write "vips: []" (see the golden case "delete the only VIP").
func TestSaveFileWithoutVIPs(t *testing.T) {
	path := filepath.Join(t.TempDir(), "veloflux.yaml")
	text := "# no services yet\nnode:\n  name: lb-test\npools:\n  - name: web\n    backends:\n      - {address: 10.200.0.11, port: 80}\n"
	if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	saveChange(t, path, func(c *Config) { c.API.ProtectReads = true })
	want := text + "api:\n  protect_reads: true\n"
	if got := readFile(t, path); got != want {
		t.Errorf("saved file:\n%s\nwant\n%s", got, want)
	}
}

// saveChange applies change to the configuration in path the way the API
// does (Modify, then Save) and returns the new configuration.
func saveChange(t *testing.T, path string, change func(*Config)) *Config {
	t.Helper()
	c, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	next, err := c.Modify(func(c *Config) error { change(c); return nil })
	if err != nil {
		t.Fatal(err)
	}
	if err := Save(path, next); err != nil {
		t.Fatalf("Save: %v", err)
	}
	return next
}

// assertCommentsKept checks that every comment line and every blank line of
// the original is still in got, in the same order.
func assertCommentsKept(t *testing.T, original, got string) {
	t.Helper()
	gotLines := strings.Split(got, "\n")
	i := 0
	for _, line := range strings.Split(original, "\n") {
		if !strings.HasPrefix(strings.TrimSpace(line), "#") && strings.TrimSpace(line) != "" {
			continue
		}
		for i < len(gotLines) && gotLines[i] != line {
			i++
		}
		if i == len(gotLines) {
			t.Errorf("line %q of the original is missing (or out of order) in the saved file", line)
			return
		}
		i++
	}
}

func replaceOnce(t *testing.T, s, old, new string) string {
	t.Helper()
	if n := strings.Count(s, old); n != 1 {
		t.Fatalf("the example holds %q %d times, want once", old, n)
	}
	return strings.Replace(s, old, new, 1)
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(data)
}

// lineDiff shows the first differing line and some context.
func lineDiff(want, got string) string {
	w, g := strings.Split(want, "\n"), strings.Split(got, "\n")
	for i := 0; i < max(len(w), len(g)); i++ {
		var wl, gl string
		if i < len(w) {
			wl = w[i]
		}
		if i < len(g) {
			gl = g[i]
		}
		if wl != gl {
			from, to := max(i-3, 0), min(i+6, len(g))
			return fmt.Sprintf("first difference at line %d:\n  want: %s\n  got:  %s\ngot around it:\n%s",
				i+1, wl, gl, strings.Join(g[from:to], "\n"))
		}
	}
	return "(no difference)"
}
