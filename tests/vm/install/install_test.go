package install

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/veloflux/veloflux/tests/lab"
	"github.com/veloflux/veloflux/tests/testenv"
	"github.com/veloflux/veloflux/tests/vm/vmimage"
)

// vip is the dsr VIP of the test; the lab routes it from the client via the
// balancer's address, which the VM takes over.
var vip = netip.MustParseAddr("198.51.100.80")

// maxExposure is the highest `systemd-analyze security` score a unit may
// have; deploy/veloflux.service scored 7.2 before it was sandboxed, 2.7
// after, and deploy/veloflux-decap.service 4.2 (scored offline) and 2.0
// (README.md, "Install on a host").
const maxExposure = 3.0

func TestInstallOnDebian12UnderSystemd(t *testing.T) {
	img := vmimage.ForTest(t)
	testenv.RequireTool(t, "ip", "iproute2")
	testenv.RequireTool(t, "tar", "tar")
	payload := vmimage.PayloadForTest(t)
	installCmd := readmeInstallCommand(t, filepath.Join(payload, "README.md"))
	ctx, cancel := context.WithTimeout(t.Context(), 9*time.Minute)
	defer cancel()

	l := lab.ForTest(t, lab.Options{Backends: 2, VIPs: []netip.Addr{vip}, Prefix: uniquePrefix(t)})
	lanAddr := l.Balancer.Addr4
	// The VM is the balancer: its eth1 takes the balancer's address, the
	// one the client routes the VIP through.
	mustRun(t, l.Balancer.Command(ctx, "ip", "link", "set", "dev", l.Balancer.IfName, "down"))
	mustRun(t, l.Balancer.Command(ctx, "ip", "addr", "flush", "dev", l.Balancer.IfName))
	tap := l.Prefix + "tap"
	mustRun(t, l.Switch.Command(ctx, "ip", "tuntap", "add", "dev", tap, "mode", "tap", "multi_queue"))
	t.Cleanup(func() {
		if out, err := l.Switch.Command(context.Background(), "ip", "link", "del", tap).CombinedOutput(); err != nil {
			t.Logf("delete tap %s: %v: %s", tap, err, out)
		}
	})
	mustRun(t, l.Switch.Command(ctx, "ip", "link", "set", "dev", tap, "master", l.BridgeName, "up"))
	if err := l.StartBackendServers(ctx); err != nil {
		t.Fatal(err)
	}

	start := time.Now()
	g := bootGuest(t, img, l.Switch, tap, "52:54:00:5a:00:01")
	bootID, err := g.waitBoot(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("VM up after %s (kernel %s)", time.Since(start).Round(time.Second), img.Release)

	// The host-built binaries, deploy/ and README.md, then install.sh as
	// the README has it; `make build` ran on the host.
	if err := g.upload(ctx, payload, "/root/veloflux"); err != nil {
		t.Fatal(err)
	}
	out := g.must(t, ctx, "cd /root/veloflux && "+installCmd)
	t.Logf("%s:\n%s", installCmd, out)
	if !strings.Contains(out, "systemctl enable --now veloflux") {
		t.Errorf("install.sh under systemd did not say how to start the service:\n%s", out)
	}
	g.must(t, ctx, `test -x /usr/local/bin/veloflux && test -x /usr/local/bin/vfctl
test -f /etc/systemd/system/veloflux.service && test -f /usr/local/share/doc/veloflux/README.md
test "$(stat -c %a /etc/veloflux/veloflux.yaml)" = 600`)
	checkUnit(t, ctx, g)

	// eth1 on the lab's segment, by systemd-networkd so that it survives
	// the reboot; then the configuration: XDP native on eth1, one dsr VIP.
	g.must(t, ctx, fmt.Sprintf(`printf '[Match]\nName=eth1\n[Network]\nAddress=%[1]s/24\nLinkLocalAddressing=no\n' \
	>/etc/systemd/network/20-lan.network
networkctl reload
for i in $(seq 50); do ip -4 addr show dev eth1 | grep -q 'inet %[1]s/' && exit 0; sleep 0.2; done
echo "eth1 did not get %[1]s" >&2; ip addr show dev eth1 >&2; exit 1`, lanAddr))
	g.must(t, ctx, "cat >/etc/veloflux/veloflux.yaml <<'VELOFLUX_YAML'\n"+agentConfig(l)+
		"VELOFLUX_YAML\nveloflux validate --config /etc/veloflux/veloflux.yaml")
	g.must(t, ctx, "systemctl enable --now veloflux")
	waitReady(t, ctx, g)
	checkService(t, ctx, g, "agent running")
	sendRequests(t, ctx, l, 20)

	t.Run("restart under a live stream", func(t *testing.T) {
		stream := startStream(ctx, l)
		stream.waitRequests(t, 5)
		before := stream.count()
		g.must(t, ctx, "systemctl restart veloflux")
		waitReady(t, ctx, g)
		stream.waitRequests(t, before+10)
		if err := stream.stop(); err != nil {
			t.Fatalf("the stream through the VIP broke across `systemctl restart veloflux`: %v", err)
		}
		t.Logf("stream: %d requests on one connection, all answered by %s", stream.count(), stream.backend)
		checkService(t, ctx, g, "adopted a running data plane")
	})

	t.Run("stop leaves the data path pinned", func(t *testing.T) {
		g.must(t, ctx, `systemctl stop veloflux
test "$(systemctl is-active veloflux || true)" = inactive`)
		checkAttached(t, ctx, g)
		journal := g.must(t, ctx, "journalctl -u veloflux -o cat --no-pager")
		if !strings.Contains(journal, "the data path stays attached and pinned") {
			t.Errorf("the journal does not show the agent stopping with the data path pinned:\n%s", tail(journal, 20))
		}
		sendRequests(t, ctx, l, 20)
	})

	t.Run("reboot", func(t *testing.T) {
		// --no-block: the command returns before the connection drops. Its
		// outcome shows in the boot id changing.
		_, _ = g.run(ctx, "systemctl reboot --no-block")
		g.closeMaster()
		start := time.Now()
		if _, err := g.waitBoot(ctx, bootID); err != nil {
			t.Fatal(err)
		}
		t.Logf("VM back after %s", time.Since(start).Round(time.Second))
		waitReady(t, ctx, g)
		checkService(t, ctx, g, "agent running")
		sendRequests(t, ctx, l, 20)
	})

	// The backend's decapsulator under its own unit, on a dummy link of the
	// VM (generic XDP): it starts, is as sandboxed as the agent's unit, and
	// the uninstall below takes it down.
	t.Run("decapsulator unit", func(t *testing.T) {
		g.must(t, ctx, `ip link add vfdecap0 type dummy && ip link set vfdecap0 up
cat >/etc/veloflux/decap.yaml <<'DECAP_YAML'
decap:
  interfaces: [vfdecap0]
  local: [192.0.2.11]
  xdp_mode: generic
DECAP_YAML
systemctl start veloflux-decap`)
		// The pins appear before the command has attached and written its
		// addresses: wait for both.
		out := g.must(t, ctx, `for i in $(seq 100); do
	s=$(vfctl decap 2>/dev/null || true)
	case $s in *vfdecap0*192.0.2.11*|*192.0.2.11*vfdecap0*) break ;; esac
	sleep 0.2
done
systemctl status --no-pager veloflux-decap
vfctl decap`)
		for _, want := range []string{"Active: active (running)", "vfdecap0", "192.0.2.11"} {
			if !strings.Contains(out, want) {
				t.Errorf("veloflux-decap.service or vfctl decap shows no %q:\n%s", want, out)
			}
		}
		checkExposure(t, ctx, g, "veloflux-decap.service")
	})

	t.Run("uninstall as the README says", func(t *testing.T) {
		g.must(t, ctx, "cd /root/veloflux\n"+readmeUninstall(t, filepath.Join(payload, "README.md")))
		g.must(t, ctx, `! systemctl cat veloflux >/dev/null 2>&1
for f in /usr/local/bin/veloflux /usr/local/bin/vfctl /etc/systemd/system/veloflux-decap.service \
	/usr/local/share/doc/veloflux /etc/veloflux /var/lib/veloflux; do
	if [ -e "$f" ]; then echo "$f is still there" >&2; exit 1; fi
done
for d in /sys/fs/bpf/veloflux /sys/fs/bpf/veloflux-decap; do
	if ls "$d" 2>/dev/null | grep -E '^(vf_|link_)'; then echo "pins are left in $d" >&2; exit 1; fi
done
if ip -d link show dev vfdecap0 | grep -q 'prog/xdp'; then echo "vfdecap0 still runs XDP" >&2; exit 1; fi
if ip -d link show dev eth1 | grep -q 'prog/xdp'; then echo "eth1 still runs XDP" >&2; exit 1; fi`)
	})
}

// readmeUninstall returns the commands of the code block that follows "To
// uninstall:" in README.md's "Install on a host".
func readmeUninstall(t *testing.T, readme string) string {
	t.Helper()
	section := readmeSection(t, readme, "Install on a host")
	_, rest, ok := strings.Cut(section, "To uninstall:")
	if !ok {
		t.Fatal(`README.md's "Install on a host" has no "To uninstall:"`)
	}
	m := regexp.MustCompile("(?s)```sh\n(.*?)```").FindStringSubmatch(rest)
	if m == nil {
		t.Fatal(`README.md's "To uninstall:" is followed by no sh code block`)
	}
	return m[1]
}

// readmeSection returns the text of README.md's "## title" section.
func readmeSection(t *testing.T, readme, title string) string {
	t.Helper()
	b, err := os.ReadFile(readme)
	if err != nil {
		t.Fatal(err)
	}
	_, section, ok := strings.Cut(string(b), "\n## "+title+"\n")
	if !ok {
		t.Fatalf("README.md has no %q section", "## "+title)
	}
	section, _, _ = strings.Cut(section, "\n## ")
	return section
}

// readmeInstallCommand returns the line of README.md's "Install on a host"
// that runs deploy/install.sh, so the test installs exactly as operators
// are told to.
func readmeInstallCommand(t *testing.T, readme string) string {
	t.Helper()
	section := readmeSection(t, readme, "Install on a host")
	m := regexp.MustCompile(`(?m)^(sudo deploy/install\.sh)\b`).FindStringSubmatch(section)
	if m == nil {
		t.Fatalf(`README.md's "Install on a host" has no line starting "sudo deploy/install.sh":%s`, section)
	}
	return m[1]
}

func agentConfig(l *lab.Lab) string {
	var b strings.Builder
	b.WriteString(`dataplane:
  interfaces: [eth1]
  xdp_mode: native
  conntrack_size: 65536
api:
  listen: ":9090"
metrics:
  listen: ":8080"
pools:
  - name: web
    algorithm: round_robin
    health_check: {type: http, path: /healthz, interval: 1s, timeout: 500ms, rise: 1, fall: 3}
    backends:
`)
	for _, be := range l.Backends {
		fmt.Fprintf(&b, "      - {address: %s, port: %d}\n", be.Addr4, lab.HTTPPort)
	}
	fmt.Fprintf(&b, "vips:\n  - {address: %s, port: %d, protocol: tcp, mode: dsr, pool: web}\n", vip, lab.HTTPPort)
	return b.String()
}

// checkUnit runs systemd-analyze on the installed unit: verify must find
// nothing, and the exposure score must stay at or below maxExposure.
func checkUnit(t *testing.T, ctx context.Context, g *guest) {
	t.Helper()
	if out := g.must(t, ctx, "systemd-analyze verify /etc/systemd/system/veloflux.service 2>&1"); strings.TrimSpace(out) != "" {
		t.Errorf("systemd-analyze verify veloflux.service:\n%s", out)
	}
	checkExposure(t, ctx, g, "veloflux.service")
}

// checkExposure fails t when `systemd-analyze security` scores unit above
// maxExposure.
func checkExposure(t *testing.T, ctx context.Context, g *guest, unit string) {
	t.Helper()
	out := g.must(t, ctx, "systemd-analyze security --no-pager "+unit+" 2>&1")
	m := regexp.MustCompile(`Overall exposure level for ` + regexp.QuoteMeta(unit) + `: ([0-9.]+)`).FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("systemd-analyze security %s printed no exposure level:\n%s", unit, out)
	}
	score, err := strconv.ParseFloat(m[1], 64)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("systemd-analyze security %s: exposure %.1f", unit, score)
	if score > maxExposure {
		t.Errorf("%s exposure %.1f, want at most %.1f:\n%s", unit, score, maxExposure, out)
	}
}

// waitReady waits until the agent answers /health with 200 and the VIP has
// both backends up.
func waitReady(t *testing.T, ctx context.Context, g *guest) {
	t.Helper()
	start := time.Now()
	defer func() { t.Logf("agent ready after %s", time.Since(start).Round(100*time.Millisecond)) }()
	deadline := start.Add(90 * time.Second)
	var last string
	for time.Now().Before(deadline) {
		out, err := g.run(ctx, `curl -sS -o /dev/null -w '%{http_code}\n' --max-time 5 http://127.0.0.1:9090/health || true
vfctl -o json vips`)
		if err == nil {
			code, vipsJSON, _ := strings.Cut(out, "\n")
			var vips []struct {
				RealsUp int `json:"reals_up"`
			}
			if code == "200" && json.Unmarshal([]byte(vipsJSON), &vips) == nil && len(vips) == 1 && vips[0].RealsUp == 2 {
				return
			}
		}
		last = out
		if err != nil {
			last = err.Error()
		}
		time.Sleep(time.Second)
	}
	journal, _ := g.run(ctx, "systemctl status --no-pager veloflux; journalctl -u veloflux -o cat --no-pager | tail -n 30")
	t.Fatalf("agent not ready (/health 200, both reals up) within 90s; last:\n%s\n%s", last, journal)
}

// checkService checks what an operator looks at: systemctl status, the
// journal (which must hold want), vfctl status and the XDP mode of eth1.
func checkService(t *testing.T, ctx context.Context, g *guest, want string) {
	t.Helper()
	status := g.must(t, ctx, "systemctl status --no-pager veloflux")
	if !strings.Contains(status, "Active: active (running)") {
		t.Errorf("systemctl status veloflux:\n%s", status)
	}
	journal := g.must(t, ctx, "journalctl -u veloflux -o cat --no-pager")
	if !strings.Contains(journal, want) {
		t.Errorf("journalctl -u veloflux has no %q:\n%s", want, tail(journal, 30))
	}
	checkAttached(t, ctx, g)
}

// checkAttached checks that vfctl sees the XDP link on eth1 and that the
// kernel runs it in native (driver) mode.
func checkAttached(t *testing.T, ctx context.Context, g *guest) {
	t.Helper()
	out := g.must(t, ctx, "vfctl -o json status")
	var st struct {
		Links []struct {
			Interface string `json:"interface"`
			Detached  bool   `json:"detached"`
		} `json:"links"`
	}
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("vfctl -o json status: %v\n%s", err, out)
	}
	if len(st.Links) != 1 || st.Links[0].Interface != "eth1" || st.Links[0].Detached {
		t.Errorf("vfctl status shows links %+v, want eth1 attached", st.Links)
	}
	out = g.must(t, ctx, "ip -j -d link show dev eth1")
	var links []struct {
		XDP struct {
			Mode int `json:"mode"`
		} `json:"xdp"`
	}
	if err := json.Unmarshal([]byte(out), &links); err != nil || len(links) != 1 {
		t.Fatalf("ip -j -d link show dev eth1: %v\n%s", err, out)
	}
	// XDP_ATTACHED_DRV: the virtio-net driver runs the program.
	if links[0].XDP.Mode != 1 {
		t.Errorf("eth1's XDP mode is %d, want 1 (native); ip link:\n%s", links[0].XDP.Mode, out)
	}
}

func uniquePrefix(t *testing.T) string {
	b := make([]byte, 2)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return "vfvm" + hex.EncodeToString(b)
}

func mustRun(t *testing.T, cmd *exec.Cmd) {
	t.Helper()
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(cmd.Args, " "), err, out)
	}
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
