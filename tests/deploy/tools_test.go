package deploy

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/veloflux/veloflux/tests/testenv"
)

// TestPromtool runs Prometheus's and Alertmanager's own checkers on the
// shipped files: the rules parse, their unit tests pass, and both
// configurations load (promtool check config also loads the rule files it
// names).
func TestPromtool(t *testing.T) {
	promDir := repoPath(t, "deploy/prometheus")
	amDir := repoPath(t, "deploy/alertmanager")
	for _, tc := range []struct {
		name, tool, pkg, dir string
		args                 []string
	}{
		{"check rules", "promtool", "prometheus", promDir, []string{"check", "rules", "alerts.yml"}},
		{"test rules", "promtool", "prometheus", promDir, []string{"test", "rules", "alerts_test.yml"}},
		{"check config", "promtool", "prometheus", promDir, []string{"check", "config", "prometheus.yml"}},
		{"amtool check-config", "amtool", "prometheus-alertmanager", amDir, []string{"check-config", "alertmanager.yml"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			bin := testenv.RequireTool(t, tc.tool, tc.pkg)
			out, err := run(t, tc.dir, time.Minute, bin, tc.args...)
			t.Logf("%s %s:\n%s", tc.tool, strings.Join(tc.args, " "), out)
			if err != nil {
				t.Fatalf("%s %s in %s: %v", tc.tool, strings.Join(tc.args, " "), tc.dir, err)
			}
			if !strings.Contains(out, "SUCCESS") {
				t.Errorf("%s %s printed no SUCCESS", tc.tool, strings.Join(tc.args, " "))
			}
		})
	}

	// The unit tests must be able to fail: the same tests with one
	// expected annotation changed are run on a copy and must not pass.
	t.Run("test rules catches a wrong expectation", func(t *testing.T) {
		bin := testenv.RequireTool(t, "promtool", "prometheus")
		dir := t.TempDir()
		rules, err := os.ReadFile(filepath.Join(promDir, "alerts.yml"))
		if err != nil {
			t.Fatal(err)
		}
		tests, err := os.ReadFile(filepath.Join(promDir, "alerts_test.yml"))
		if err != nil {
			t.Fatal(err)
		}
		const want = `summary: "Pool web on lb-1:8080 has no healthy backend"`
		if !strings.Contains(string(tests), want) {
			t.Fatalf("alerts_test.yml no longer contains %s; pick another expectation to break", want)
		}
		broken := strings.Replace(string(tests), want, `summary: "Pool web is fine"`, 1)
		for name, data := range map[string][]byte{"alerts.yml": rules, "alerts_test.yml": []byte(broken)} {
			if err := os.WriteFile(filepath.Join(dir, name), data, 0o644); err != nil {
				t.Fatal(err)
			}
		}
		out, err := run(t, dir, time.Minute, bin, "test", "rules", "alerts_test.yml")
		if err == nil {
			t.Fatalf("promtool test rules passed with a wrong expected summary:\n%s", out)
		}
		if !strings.Contains(out, "VelofluxPoolNoHealthyBackend") {
			t.Errorf("promtool test rules failed, but not on VelofluxPoolNoHealthyBackend:\n%s", out)
		}
	})
}
