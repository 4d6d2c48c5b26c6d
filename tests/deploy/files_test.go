package deploy

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/veloflux/veloflux/agent/config"
)

// ---------------------------------------------------------------------------
// The shipped files' shapes, as far as the tests read them

type ruleFile struct {
	Groups []struct {
		Name  string `yaml:"name"`
		Rules []rule `yaml:"rules"`
	} `yaml:"groups"`
}

type rule struct {
	Alert       string            `yaml:"alert"`
	Record      string            `yaml:"record"`
	Expr        string            `yaml:"expr"`
	For         string            `yaml:"for"`
	Labels      map[string]string `yaml:"labels"`
	Annotations map[string]string `yaml:"annotations"`
}

// rules returns every rule of deploy/prometheus/alerts.yml.
func rules(t testing.TB) []rule {
	t.Helper()
	var f ruleFile
	readYAML(t, "deploy/prometheus/alerts.yml", &f)
	var out []rule
	for _, g := range f.Groups {
		out = append(out, g.Rules...)
	}
	if len(out) == 0 {
		t.Fatal("deploy/prometheus/alerts.yml has no rules")
	}
	return out
}

type ruleTestFile struct {
	RuleFiles          []string `yaml:"rule_files"`
	EvaluationInterval string   `yaml:"evaluation_interval"`
	Tests              []struct {
		Interval    string `yaml:"interval"`
		InputSeries []struct {
			Series string `yaml:"series"`
			Values string `yaml:"values"`
		} `yaml:"input_series"`
		AlertRuleTest []struct {
			EvalTime  string `yaml:"eval_time"`
			Alertname string `yaml:"alertname"`
			ExpAlerts []struct {
				ExpLabels      map[string]string `yaml:"exp_labels"`
				ExpAnnotations map[string]string `yaml:"exp_annotations"`
			} `yaml:"exp_alerts"`
		} `yaml:"alert_rule_test"`
	} `yaml:"tests"`
}

type staticConfigs []struct {
	Targets []string `yaml:"targets"`
}

type prometheusConfig struct {
	Global struct {
		ScrapeInterval     string `yaml:"scrape_interval"`
		EvaluationInterval string `yaml:"evaluation_interval"`
	} `yaml:"global"`
	RuleFiles []string `yaml:"rule_files"`
	Alerting  struct {
		Alertmanagers []struct {
			StaticConfigs staticConfigs `yaml:"static_configs"`
		} `yaml:"alertmanagers"`
	} `yaml:"alerting"`
	ScrapeConfigs []struct {
		JobName       string        `yaml:"job_name"`
		StaticConfigs staticConfigs `yaml:"static_configs"`
	} `yaml:"scrape_configs"`
}

// targets returns the targets of a scrape job, or nil without that job.
func (c *prometheusConfig) targets(job string) []string {
	for _, sc := range c.ScrapeConfigs {
		if sc.JobName == job {
			var out []string
			for _, s := range sc.StaticConfigs {
				out = append(out, s.Targets...)
			}
			return out
		}
	}
	return nil
}

type composeFile struct {
	Services map[string]composeService `yaml:"services"`
	Volumes  map[string]any            `yaml:"volumes"`
}

type composeService struct {
	Build           any      `yaml:"build"`
	Image           string   `yaml:"image"`
	Restart         string   `yaml:"restart"`
	NetworkMode     string   `yaml:"network_mode"`
	Privileged      bool     `yaml:"privileged"`
	CapDrop         []string `yaml:"cap_drop"`
	CapAdd          []string `yaml:"cap_add"`
	SecurityOpt     []string `yaml:"security_opt"`
	ReadOnly        bool     `yaml:"read_only"`
	Command         []string `yaml:"command"`
	Volumes         []any    `yaml:"volumes"`
	Ulimits         any      `yaml:"ulimits"`
	StopSignal      string   `yaml:"stop_signal"`
	StopGracePeriod string   `yaml:"stop_grace_period"`
}

// interpolation is ${NAME}, ${NAME:-default} or ${NAME-default}.
var interpolation = regexp.MustCompile(`\$\{([A-Za-z_][A-Za-z0-9_]*)(:?-([^}]*))?\}`)

// interpolate replaces variables as Compose does, from the environment.
func interpolate(s string) string {
	return interpolation.ReplaceAllStringFunc(s, func(m string) string {
		g := interpolation.FindStringSubmatch(m)
		v, set := os.LookupEnv(g[1])
		switch {
		case g[2] == "":
			return v
		case strings.HasPrefix(g[2], ":-") && v == "", !strings.HasPrefix(g[2], ":") && !set:
			return g[3]
		}
		return v
	})
}

// mounts returns the service's volumes as target → source, from both the
// short ("src:dst[:mode]") and the long ({source, target}) syntax, with
// variables replaced.
func (s composeService) mounts() (map[string]string, error) {
	out := map[string]string{}
	for _, v := range s.Volumes {
		switch v := v.(type) {
		case string:
			parts := strings.Split(interpolate(v), ":")
			if len(parts) < 2 {
				return nil, fmt.Errorf("volume %q: want source:target", v)
			}
			out[parts[1]] = parts[0]
		case map[string]any:
			src, _ := v["source"].(string)
			dst, _ := v["target"].(string)
			src, dst = interpolate(src), interpolate(dst)
			if src == "" || dst == "" {
				return nil, fmt.Errorf("volume %v: want source and target", v)
			}
			out[dst] = src
		default:
			return nil, fmt.Errorf("volume %v: neither a string nor a mapping", v)
		}
	}
	return out, nil
}

// flag returns the value of --name=value in the service's command.
func (s composeService) flag(name string) (string, bool) {
	for _, a := range s.Command {
		if v, ok := strings.CutPrefix(a, "--"+name+"="); ok {
			return v, true
		}
	}
	return "", false
}

func readCompose(t testing.TB) composeFile {
	t.Helper()
	var c composeFile
	readYAML(t, "deploy/compose.yaml", &c)
	return c
}

// capSet is a capability list as compose writes it ("BPF"), upper case and
// without the CAP_ prefix, in the file's order.
func capSet(caps []string) []string {
	var out []string
	for _, c := range caps {
		out = append(out, strings.TrimPrefix(strings.ToUpper(c), "CAP_"))
	}
	return out
}

// port returns the port of a host:port or :port address.
func port(t testing.TB, addr string) string {
	t.Helper()
	_, p, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatalf("address %q: %v", addr, err)
	}
	return p
}

// ---------------------------------------------------------------------------
// Tests

// severities are the severity label values alerts.yml documents.
var severities = []string{"critical", "warning", "info"}

// TestAlertRules checks what promtool does not: every alert carries a
// severity, a summary and a description, selects only scrape jobs that
// prometheus.yml defines, and fires in at least one case of
// alerts_test.yml; and every alert the unit tests name exists.
func TestAlertRules(t *testing.T) {
	rs := rules(t)
	var prom prometheusConfig
	readYAML(t, "deploy/prometheus/prometheus.yml", &prom)
	var tests ruleTestFile
	readYAML(t, "deploy/prometheus/alerts_test.yml", &tests)

	fires := map[string]bool{} // alert → fires in some unit test
	tested := map[string]bool{}
	for _, tc := range tests.Tests {
		for _, at := range tc.AlertRuleTest {
			tested[at.Alertname] = true
			if len(at.ExpAlerts) > 0 {
				fires[at.Alertname] = true
			}
		}
	}

	jobRE := regexp.MustCompile(`\bjob\s*=\s*"([^"]*)"`)
	seen := map[string]bool{}
	for _, r := range rs {
		if r.Alert == "" {
			continue // a recording rule
		}
		if seen[r.Alert] {
			t.Errorf("alert %s is defined twice", r.Alert)
		}
		seen[r.Alert] = true
		if !strings.HasPrefix(r.Alert, "Veloflux") {
			t.Errorf("alert %s: name should start with Veloflux (the inhibit rules match Veloflux.+)", r.Alert)
		}
		if s := r.Labels["severity"]; !slices.Contains(severities, s) {
			t.Errorf("alert %s: severity %q, want one of %v", r.Alert, s, severities)
		}
		for _, a := range []string{"summary", "description"} {
			if strings.TrimSpace(r.Annotations[a]) == "" {
				t.Errorf("alert %s: no %s annotation", r.Alert, a)
			}
		}
		if r.For != "" {
			if _, err := time.ParseDuration(r.For); err != nil {
				t.Errorf("alert %s: for %q: %v", r.Alert, r.For, err)
			}
		}
		for _, m := range jobRE.FindAllStringSubmatch(r.Expr, -1) {
			if prom.targets(m[1]) == nil {
				t.Errorf("alert %s selects job=%q, which prometheus.yml does not scrape", r.Alert, m[1])
			}
		}
		if !fires[r.Alert] {
			t.Errorf("alert %s fires in no case of alerts_test.yml", r.Alert)
		}
	}
	for name := range tested {
		if !seen[name] {
			t.Errorf("alerts_test.yml tests alert %s, which alerts.yml does not define", name)
		}
	}
	if !slices.Contains(tests.RuleFiles, "alerts.yml") {
		t.Errorf("alerts_test.yml rule_files %v: want alerts.yml", tests.RuleFiles)
	}
	t.Logf("%d alerts, each firing in a unit test", len(seen))
}

// TestCompose checks deploy/compose.yaml against what the rest of deploy/
// says: the agent on the host's network with all capabilities dropped but
// a few, never privileged, its pins on the host's /sys/fs/bpf; Prometheus
// and Alertmanager on the ports prometheus.yml uses; the files they mount
// present. docker-compose, when installed, checks the file's schema too.
func TestCompose(t *testing.T) {
	c := readCompose(t)
	deployDir := repoPath(t, "deploy")
	for _, name := range []string{"veloflux", "prometheus", "alertmanager"} {
		if _, ok := c.Services[name]; !ok {
			t.Fatalf("compose.yaml: no service %q", name)
		}
	}

	t.Run("veloflux", func(t *testing.T) {
		// The defaults, whatever the environment running the test says.
		t.Setenv("VELOFLUX_CONFIG_DIR", "")
		t.Setenv("VELOFLUX_STATE_DIR", "")
		s := c.Services["veloflux"]
		if s.NetworkMode != "host" {
			t.Errorf("network_mode %q, want host: XDP attaches to the host's interfaces", s.NetworkMode)
		}
		if s.Privileged {
			t.Error("privileged: the agent must run with its capability list only")
		}
		if !slices.Equal(capSet(s.CapDrop), []string{"ALL"}) {
			t.Errorf("cap_drop %v, want [ALL]", s.CapDrop)
		}
		caps := capSet(s.CapAdd)
		for _, want := range []string{"BPF", "PERFMON", "NET_ADMIN"} {
			if !slices.Contains(caps, want) {
				t.Errorf("cap_add %v lacks %s", caps, want)
			}
		}
		// Anything beyond this list needs a reason in compose.yaml and a
		// subtest in TestContainer showing what fails without it.
		for _, c := range caps {
			if !slices.Contains(containerCapReasons(), c) {
				t.Errorf("cap_add has %s, which TestContainer does not test", c)
			}
		}
		for _, o := range s.SecurityOpt {
			if strings.Contains(o, "unconfined") {
				t.Errorf("security_opt %q: keep the runtime's seccomp and AppArmor profiles", o)
			}
		}
		if !s.ReadOnly {
			t.Error("read_only is false; the agent writes only to its mounted directories")
		}
		m, err := s.mounts()
		if err != nil {
			t.Fatal(err)
		}
		if m["/sys/fs/bpf"] != "/sys/fs/bpf" {
			t.Errorf("/sys/fs/bpf is mounted from %q, want the host's /sys/fs/bpf so that pins outlive the container", m["/sys/fs/bpf"])
		}
		// Unless overridden, the directories of the systemd install.
		for _, dir := range []string{"/etc/veloflux", "/var/lib/veloflux"} {
			if m[dir] != dir {
				t.Errorf("%s is mounted from %q, want %s", dir, m[dir], dir)
			}
		}
		b, ok := s.Build.(map[string]any)
		if !ok || b["dockerfile"] != "deploy/Dockerfile" {
			t.Errorf("build %v: want dockerfile deploy/Dockerfile", s.Build)
		} else if ctx, _ := b["context"].(string); filepath.Join(deployDir, ctx) != repoPath(t, ".") {
			t.Errorf("build context %q is not the repository root", ctx)
		}
	})

	var prom prometheusConfig
	readYAML(t, "deploy/prometheus/prometheus.yml", &prom)
	cfg, err := config.Load(repoPath(t, "deploy/veloflux.yaml"))
	if err != nil {
		t.Fatalf("load deploy/veloflux.yaml: %v", err)
	}

	t.Run("prometheus", func(t *testing.T) {
		s := c.Services["prometheus"]
		if !strings.HasPrefix(s.Image, "prom/prometheus:") {
			t.Errorf("image %q, want the official prom/prometheus", s.Image)
		}
		checkHostListener(t, s, "web.listen-address", "9091")
		if got := prom.targets("prometheus"); !slices.Equal(got, []string{"127.0.0.1:9091"}) {
			t.Errorf("prometheus.yml scrapes Prometheus at %v, want 127.0.0.1:9091", got)
		}
		agent := prom.targets("veloflux")
		if len(agent) != 1 || port(t, agent[0]) != port(t, cfg.Metrics.Listen) {
			t.Errorf("prometheus.yml scrapes the agent at %v; deploy/veloflux.yaml has metrics.listen %q",
				agent, cfg.Metrics.Listen)
		}
		var am []string
		for _, a := range prom.Alerting.Alertmanagers {
			for _, sc := range a.StaticConfigs {
				am = append(am, sc.Targets...)
			}
		}
		if !slices.Equal(am, []string{"127.0.0.1:9092"}) {
			t.Errorf("prometheus.yml sends alerts to %v, want the compose Alertmanager at 127.0.0.1:9092", am)
		}
		conf, _ := s.flag("config.file")
		checkMountedFile(t, s, deployDir, conf, "prometheus/prometheus.yml")
		// rule_files are relative to prometheus.yml, in the container too.
		for _, rf := range prom.RuleFiles {
			checkMountedFile(t, s, deployDir, filepath.Join(filepath.Dir(conf), rf), "prometheus/"+rf)
		}
	})

	t.Run("alertmanager", func(t *testing.T) {
		s := c.Services["alertmanager"]
		if !strings.HasPrefix(s.Image, "prom/alertmanager:") {
			t.Errorf("image %q, want the official prom/alertmanager", s.Image)
		}
		checkHostListener(t, s, "web.listen-address", "9092")
		if v, ok := s.flag("cluster.listen-address"); !ok || v != "" {
			t.Errorf("--cluster.listen-address=%q (set %v): want it empty, or a lone Alertmanager gossips on the host's :9094", v, ok)
		}
		conf, _ := s.flag("config.file")
		checkMountedFile(t, s, deployDir, conf, "alertmanager/alertmanager.yml")
	})

	t.Run("docker-compose config", func(t *testing.T) {
		// Optional everywhere: Compose is not what CI installs, and the
		// checks above cover what the tests rely on.
		bin, err := exec.LookPath("docker-compose")
		if err != nil {
			t.Skip("docker-compose not installed (Debian package docker-compose); schema not checked")
		}
		out, err := run(t, deployDir, time.Minute, bin, "-f", "compose.yaml", "config", "-q")
		if err != nil {
			t.Fatalf("docker-compose -f compose.yaml config -q in %s: %v\n%s", deployDir, err, out)
		}
	})
}

// checkHostListener checks that a service runs on the host's network and
// listens on the given port.
func checkHostListener(t *testing.T, s composeService, flag, wantPort string) {
	t.Helper()
	if s.NetworkMode != "host" {
		t.Errorf("network_mode %q, want host (it reaches the agent at 127.0.0.1)", s.NetworkMode)
	}
	addr, ok := s.flag(flag)
	if !ok {
		t.Errorf("no --%s in command %v", flag, s.Command)
		return
	}
	if p := port(t, addr); p != wantPort {
		t.Errorf("--%s=%s: port %s, want %s", flag, addr, p, wantPort)
	}
}

// checkMountedFile checks that the file the service reads at inContainer is
// mounted from deploy/<wantSource>, which exists.
func checkMountedFile(t *testing.T, s composeService, deployDir, inContainer, wantSource string) {
	t.Helper()
	m, err := s.mounts()
	if err != nil {
		t.Fatal(err)
	}
	src, ok := m[inContainer]
	if !ok {
		t.Errorf("%s is not mounted (mounts %v)", inContainer, m)
		return
	}
	if filepath.Clean(src) != filepath.Clean("./"+wantSource) {
		t.Errorf("%s is mounted from %s, want ./%s", inContainer, src, wantSource)
	}
	if _, err := os.Stat(filepath.Join(deployDir, src)); err != nil {
		t.Errorf("mount source of %s: %v", inContainer, err)
	}
}

// TestVagrantfile validates deploy/Vagrantfile with Vagrant itself, in each
// of the variants its environment switches select, wherever Vagrant is
// installed (`make test` installs it with vagrant-libvirt where they
// install). tests/vm/vagrant boots the file for real.
func TestVagrantfile(t *testing.T) {
	bin, err := exec.LookPath("vagrant")
	if err != nil {
		t.Skip("vagrant not installed (Debian package vagrant); deploy/Vagrantfile not validated")
	}
	deployDir := repoPath(t, "deploy")
	for _, env := range [][]string{nil, {"VELOFLUX_VM_TEST=1", "VELOFLUX_VM_EMULATE=1"}} {
		t.Run(strings.Join(append([]string{"env"}, env...), " "), func(t *testing.T) {
			ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
			defer cancel()
			// Provider settings are checked only by an installed provider
			// plugin; the rest of the file is checked in full.
			cmd := exec.CommandContext(ctx, bin, "validate", "--ignore-provider")
			cmd.Dir = deployDir
			scratch := t.TempDir()
			cmd.Env = append(os.Environ(), append(env,
				// Vagrant's state and machine folders, kept out of the checkout
				// and the user's home.
				"VAGRANT_DOTFILE_PATH="+filepath.Join(scratch, "dot"),
				"VAGRANT_HOME="+filepath.Join(scratch, "home"),
				"VAGRANT_CHECKPOINT_DISABLE=1")...)
			out, err := cmd.CombinedOutput()
			if err != nil || !strings.Contains(string(out), "validated successfully") {
				t.Fatalf("vagrant validate in %s: %v\n%s", deployDir, err, out)
			}
		})
	}
}
