package deploy

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/veloflux/veloflux/tests/agenttest"
	"github.com/veloflux/veloflux/tests/lab"

	"github.com/veloflux/veloflux/tests/testenv"
)

// containerVIP is the VIP of TestContainer's lab.
var containerVIP = netip.MustParseAddr("198.51.100.30")

// evidence is how a container without one capability fails.
type evidence struct {
	cap string
	// also are capabilities dropped with it, for a capability whose
	// absence another one would hide (CAP_SYS_ADMIN passes the kernel's
	// CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN checks; compose.yaml does not
	// grant it).
	also []string
	// exits: the agent must stop, with one of these in its log.
	exits []string
	// logs: the agent keeps running and logs this.
	logs string
	// zero: with logs, series the agent's /metrics must then report as 0,
	// so that an alert can see the failure.
	zero []gaugeSeries
}

// gaugeSeries names one series of a scrape.
type gaugeSeries struct {
	name   string
	labels map[string]string
}

// capEvidence lists, for every capability compose.yaml may grant, how a
// container without it fails. TestContainer runs each entry whose
// capability compose.yaml grants; TestCompose refuses a capability without
// an entry.
var capEvidence = []evidence{
	// Without CAP_BPF the seccomp profile refuses bpf() (ENOSYS with
	// podman's errno, EPERM with Docker's); without seccomp the kernel
	// refuses the first map creation with EPERM.
	{cap: "BPF", exits: []string{"function not implemented", "operation not permitted"}},
	// The verifier rejects the balancer when it may not treat pointers as
	// a trusted (CAP_PERFMON) program may.
	{cap: "PERFMON", exits: []string{"load program: permission denied"}},
	// XDP programs are networking programs: loading one needs it (as do
	// the netlink neighbour writes with which the agent has a dsr
	// backend's MAC resolved, which this start never reaches).
	{cap: "NET_ADMIN", exits: []string{"load program: operation not permitted"}},
	{cap: "NET_BIND_SERVICE", logs: "bind: permission denied",
		zero: []gaugeSeries{{"veloflux_proxy_listener_up", map[string]string{"role": "http"}}}},
}

// containerCapReasons returns the capabilities capEvidence covers.
func containerCapReasons() []string {
	var out []string
	for _, e := range capEvidence {
		out = append(out, e.cap)
	}
	return out
}

// TestContainer builds deploy/Dockerfile from static binaries built here
// and runs the image as compose.yaml runs it (host network, all
// capabilities dropped but compose.yaml's, read-only root), attached to a
// lab veth in this namespace.
func TestContainer(t *testing.T) {
	bin, err := exec.LookPath("podman")
	if err != nil {
		// Deliberately a skip even with VELOFLUX_REQUIRE_PRIV=1: whether
		// CI installs podman is a separate decision.
		t.Skip("podman not installed (apt-get install podman runc); the image is not tested")
	}
	testenv.RequireRoot(t, "build network namespaces")
	caps := capSet(readCompose(t).Services["veloflux"].CapAdd)
	pm := newPodman(t, bin)
	pm.buildImage(t)
	pm.pickRuntime(t)

	l := lab.ForTest(t, lab.Options{Backends: 2, VIPs: []netip.Addr{containerVIP}, BalancerInRoot: true})
	if err := l.StartBackendServers(t.Context()); err != nil {
		t.Fatalf("start backend servers: %v", err)
	}

	t.Run("commands", func(t *testing.T) { testCommands(t, pm) })
	t.Run("decap", func(t *testing.T) { testDecapContainer(t, pm, l) })
	t.Run("compose capabilities", func(t *testing.T) { testComposeCaps(t, pm, l, caps) })
	for _, ev := range capEvidence {
		if !slices.Contains(caps, ev.cap) {
			continue
		}
		name := "without " + ev.cap
		if len(ev.also) > 0 {
			name += " and " + strings.Join(ev.also, ", ")
		}
		t.Run(name, func(t *testing.T) { testWithout(t, pm, l, caps, ev) })
	}
}

// testWithout runs the image with caps less ev.cap (and ev.also), under a
// seccomp profile like Docker's, and checks that it fails as ev says.
func testWithout(t *testing.T, pm *podman, l *lab.Lab, caps []string, ev evidence) {
	without := slices.DeleteFunc(slices.Clone(caps), func(c string) bool {
		return c == ev.cap || slices.Contains(ev.also, c)
	})
	c := pm.start(t, l, runOpts{caps: without, seccomp: pm.dockerSeccomp(t)})
	switch {
	case len(ev.exits) > 0:
		code, logs := c.waitExit(t, 30*time.Second)
		if code == 0 {
			t.Fatalf("caps %v: exit status 0; want a failure", without)
		}
		i := slices.IndexFunc(ev.exits, func(s string) bool { return strings.Contains(logs, s) })
		if i < 0 {
			t.Fatalf("caps %v: exit %d, but the log says none of %q:\n%s", without, code, ev.exits, logs)
		}
		t.Logf("caps %v: exit %d: %s", without, code, logLine(logs, ev.exits[i]))
	case ev.logs != "":
		c.waitHealthy(t)
		logs := c.waitLog(t, ev.logs, 15*time.Second)
		t.Logf("caps %v: running, and: %s", without, logLine(logs, ev.logs))
		families := c.scrape(t)
		for _, z := range ev.zero {
			wantGauge(t, families, 0, z.name, z.labels)
		}
	default:
		t.Fatalf("the evidence for %s says neither how the agent exits nor what it logs", ev.cap)
	}
}

// testCommands runs the image's other entry points, with no capability:
// the default command without a configuration must fail as an invalid
// configuration does (exit 2), and validate must accept the example file.
func testCommands(t *testing.T, pm *podman) {
	base := append([]string{"run", "--rm", "--network", "none", "--read-only", "--cap-drop", "ALL"}, pm.limits()...)
	out, err := pm.run(t, time.Minute, append(slices.Clone(base), imageName)...)
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != 2 || !strings.Contains(out, "no such file") {
		t.Errorf("the image with no configuration mounted: %v, %s; want exit status 2 and the missing file named", err, out)
	}
	out, err = pm.run(t, time.Minute, append(slices.Clone(base), "-v", repoPath(t, "deploy")+":/etc/veloflux:ro",
		imageName, "validate", "--config", "/etc/veloflux/veloflux.yaml")...)
	if err != nil || !strings.Contains(out, "valid") {
		t.Errorf("veloflux validate of deploy/veloflux.yaml in the image: %v, %s", err, out)
	}
	t.Logf("validate: %s", out)
}

// testComposeCaps runs the image with compose.yaml's capabilities and a
// seccomp profile like Docker's default, which compose.yaml keeps (podman's
// own on Debian 12 allows bpf() only with CAP_SYS_ADMIN).
func testComposeCaps(t *testing.T, pm *podman, l *lab.Lab, caps []string) {
	c := pm.start(t, l, runOpts{caps: caps, seccomp: pm.dockerSeccomp(t)})
	c.waitHealthy(t)
	c.checkAttached(t, l)
	families := c.scrape(t)
	wantGauge(t, families, 1, "veloflux_xdp_attached", map[string]string{"interface": l.Balancer.IfName, "mode": "native"})
	wantGauge(t, families, 1, "veloflux_proxy_listener_up", map[string]string{"role": "http"})

	// Forwarding through the VIP, from the client's namespace, and the
	// L7 proxy on its privileged port, from here.
	vipURL := "http://" + netip.AddrPortFrom(containerVIP, lab.HTTPPort).String() + "/"
	client := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DialContext: l.Client.DialContext, DisableKeepAlives: true}}
	fromBackend := func(code int, body []byte) bool {
		return code == http.StatusOK && bytes.HasPrefix(body, []byte("backend-"))
	}
	waitHTTP(t, client, vipURL, 20*time.Second, fromBackend)
	local := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	waitHTTP(t, local, fmt.Sprintf("http://127.0.0.1:%d/", c.proxyPort), 20*time.Second, fromBackend)

	// The read-only root is no obstacle to API writes: the token went to
	// the state dir, a denylist entry goes to the config file (renamed into
	// place, the previous one kept as .bak).
	if _, err := os.Stat(filepath.Join(c.dir, "state", "api.token")); err != nil {
		t.Errorf("token file: %v", err)
	}
	c.api(t, http.MethodPost, "/api/security/denylist", `{"prefix":"192.0.2.0/24"}`, true)
	saved, err := os.ReadFile(filepath.Join(c.dir, "etc", "veloflux.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(saved), "192.0.2.0/24") {
		t.Errorf("the denylist entry is not in the saved configuration:\n%s", saved)
	}
	if _, err := os.Stat(filepath.Join(c.dir, "etc", "veloflux.yaml.bak")); err != nil {
		t.Errorf("no backup of the configuration: %v", err)
	}

	// vfctl in the running container reads the pins. Opening a ring by
	// id needs CAP_SYS_ADMIN, so vips lists the VIPs with the ring columns
	// unknown, and says why.
	for _, args := range [][]string{{"status"}, {"vips"}} {
		out, err := pm.run(t, time.Minute, append([]string{"exec", c.name, "/usr/local/bin/vfctl"}, args...)...)
		t.Logf("vfctl %s:\n%s", args[0], out)
		if err != nil {
			t.Errorf("vfctl %s in the container: %v", args[0], err)
		}
		want := l.Balancer.IfName
		if args[0] == "vips" {
			want = containerVIP.String()
		}
		if !strings.Contains(out, want) {
			t.Errorf("vfctl %s does not mention %s", args[0], want)
		}
		if args[0] == "vips" && !strings.Contains(out, "CAP_SYS_ADMIN") {
			t.Errorf("vfctl vips without CAP_SYS_ADMIN does not say why the ring columns are unknown")
		}
	}

	// Forwarding goes on while no container runs, and a new container
	// adopts the pins without an error.
	c.stop(t)
	waitHTTP(t, client, vipURL, 5*time.Second, fromBackend)
	c = c.recreate(t)
	c.waitHealthy(t)
	if st := c.status(t); st.Status != "ok" || st.LastReconcile.Error != "" {
		t.Errorf("after a restart: status %q, reconcile error %q; want ok and none", st.Status, st.LastReconcile.Error)
	}
	logs := c.logs(t)
	if !strings.Contains(logs, "adopted a running data plane") {
		t.Errorf("the new container did not adopt the pinned data plane:\n%s", logs)
	}
	// Without CAP_SYS_ADMIN it could not read the installed rings back,
	// so it installed them again, and said so.
	if !strings.Contains(logs, "could not be read back") {
		t.Errorf("the new container did not report reinstalling the rings it could not read:\n%s", logs)
	}
	c.checkAttached(t, l)
	waitHTTP(t, client, vipURL, 5*time.Second, fromBackend)

	// `veloflux detach`, as the Dockerfile documents it, with no
	// capability at all.
	c.stop(t)
	out, err := pm.run(t, time.Minute, append(append([]string{"run", "--rm", "--network", "none", "--cap-drop", "ALL"}, pm.limits()...),
		"-v", c.bpffs+":/sys/fs/bpf", imageName, "detach")...)
	t.Logf("veloflux detach: %s", out)
	if err != nil {
		t.Fatalf("veloflux detach in a container: %v", err)
	}
	if entries, err := os.ReadDir(filepath.Join(c.bpffs, "veloflux")); err == nil || !errors.Is(err, os.ErrNotExist) {
		t.Errorf("pins left after detach: %v %v", entries, err)
	}
	if id := xdpProgID(t, l.Balancer.IfName); id != 0 {
		t.Errorf("XDP program %d still attached to %s after detach", id, l.Balancer.IfName)
	}
}

// ---------------------------------------------------------------------------
// podman, on a private storage

// imageName is the tag the test gives its image, in its own storage.
const imageName = "localhost/veloflux-deploytest:latest"

type podman struct {
	bin string
	// global flags: storage, run state and temporary files of its own, so
	// the test neither sees nor leaves anything in the host's podman.
	global []string
	// runtime is "--runtime X" when the default runtime cannot start
	// containers here.
	runtime []string
	dir     string
	seccomp string // the Docker-like seccomp profile, once written
}

func newPodman(t *testing.T, bin string) *podman {
	dir := t.TempDir()
	p := &podman{bin: bin, dir: dir, global: []string{
		"--root", filepath.Join(dir, "root"),
		"--runroot", filepath.Join(dir, "runroot"),
		"--tmpdir", filepath.Join(dir, "tmp"),
	}}
	t.Cleanup(func() {
		for _, args := range [][]string{{"rm", "--all", "--force", "--time", "5"}, {"rmi", "--all", "--force"}} {
			if out, err := p.run(t, 2*time.Minute, args...); err != nil {
				t.Errorf("podman %s: %v\n%s", strings.Join(args, " "), err, out)
			}
		}
		// The storage driver may keep mounts under its root; they would
		// make the temp dir impossible to remove.
		for _, m := range mountsUnder(t, dir) {
			if err := unix.Unmount(m, unix.MNT_DETACH); err != nil {
				t.Errorf("unmount %s: %v", m, err)
			}
		}
	})
	return p
}

// run runs podman with the private storage and the chosen runtime.
func (p *podman) run(t testing.TB, timeout time.Duration, args ...string) (string, error) {
	t.Helper()
	all := append(append(slices.Clone(p.global), p.runtime...), args...)
	out, err := run(t, "", timeout, p.bin, all...)
	if err != nil {
		err = fmt.Errorf("podman %s: %w", strings.Join(args, " "), err)
	}
	return out, err
}

// buildImage builds static binaries and deploy/Dockerfile's host variant.
func (p *podman) buildImage(t *testing.T) {
	root := repoPath(t, ".")
	ctxDir := t.TempDir()
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Fatalf("the go command: %v", err)
	}
	start := time.Now()
	build := exec.CommandContext(t.Context(), goBin, "build", "-trimpath", "-o",
		filepath.Join(ctxDir, "bin", "container")+string(filepath.Separator), "./cmd/veloflux", "./cmd/vfctl")
	build.Dir = root
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("CGO_ENABLED=0 go build ./cmd/veloflux ./cmd/vfctl: %v\n%s", err, out)
	}
	df, err := os.ReadFile(filepath.Join(root, "deploy", "Dockerfile"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(ctxDir, "Dockerfile"), df, 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := p.run(t, 5*time.Minute, "build", "--build-arg", "BINARIES=host", "-t", imageName,
		"-f", filepath.Join(ctxDir, "Dockerfile"), ctxDir)
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	t.Logf("built static binaries and %s in %s", imageName, time.Since(start).Round(time.Millisecond))
}

// limits are the --ulimit flags of every container. Podman asks the
// runtime for nofile and nproc 1048576 by default, which a host whose hard
// limits are lower refuses ("setrlimit RLIMIT_NOFILE: operation not
// permitted") unless the runtime holds CAP_SYS_RESOURCE. Podman lowers its
// own nproc to 32768, and the runtime inherits podman's limits, so ask for
// no more than that. (uid 0 is exempt from nproc anyway.)
func (p *podman) limits() []string {
	lim := func(res int, ceiling uint64) uint64 {
		var r unix.Rlimit
		if err := unix.Getrlimit(res, &r); err != nil || r.Max > ceiling {
			return ceiling
		}
		return r.Max
	}
	nofile, nproc := lim(unix.RLIMIT_NOFILE, 1<<20), lim(unix.RLIMIT_NPROC, 32768)
	return []string{"--ulimit", fmt.Sprintf("nofile=%d:%d", nofile, nofile),
		"--ulimit", fmt.Sprintf("nproc=%d:%d", nproc, nproc)}
}

// pickRuntime runs `veloflux version` in the image, with podman's default
// OCI runtime and, if that fails, with runc. crun (Debian's default) refuses
// hosts whose cgroup v2 hierarchy holds controllers while v1 is in use
// ("cgroups in hybrid mode not supported"); runc does not mind.
func (p *podman) pickRuntime(t *testing.T) {
	args := append(append([]string{"run", "--rm", "--network", "host"}, p.limits()...), imageName, "version")
	out, err := p.run(t, time.Minute, args...)
	if err != nil {
		// Whether this host can run containers at all is not the image's
		// doing: like a missing podman, that is a skip, with the reason.
		// Everything after this point is about the image, and fails.
		runc, lerr := exec.LookPath("runc")
		if lerr != nil {
			t.Skipf("podman cannot run containers here with its default runtime, and runc is not installed: %v\n%s", err, out)
		}
		t.Logf("podman's default runtime cannot run containers here (%v: %s); trying runc", err, out)
		p.runtime = []string{"--runtime", runc}
		var rerr error
		if out, rerr = p.run(t, time.Minute, args...); rerr != nil {
			t.Skipf("podman cannot run containers here, with its default runtime (%v) nor with runc: %v\n%s", err, rerr, out)
		}
	}
	if !strings.HasPrefix(out, "veloflux ") {
		t.Fatalf("veloflux version in the image printed %q", out)
	}
}

// dockerSeccomp writes podman's default seccomp profile changed as
// Docker's current default profile is: bpf() allowed with CAP_BPF and
// perf_event_open() with CAP_PERFMON, not only with CAP_SYS_ADMIN as in
// the profile Debian 12's podman ships. Without it, no container could
// load BPF without CAP_SYS_ADMIN here, whatever its other capabilities.
func (p *podman) dockerSeccomp(t *testing.T) string {
	if p.seccomp != "" {
		return p.seccomp
	}
	path, err := p.run(t, time.Minute, "info", "--format", "{{.Host.Security.SECCOMPProfilePath}}")
	if err != nil || path == "" {
		t.Fatalf("podman's seccomp profile path: %q %v", path, err)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var profile map[string]any
	if err := json.Unmarshal(data, &profile); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	calls, ok := profile["syscalls"].([]any)
	if !ok {
		t.Fatalf("%s: no syscalls list", path)
	}
	moved := []string{"bpf", "perf_event_open"}
	var out []any
	for _, c := range calls {
		rule, ok := c.(map[string]any)
		if !ok {
			t.Fatalf("%s: syscall rule %v is not an object", path, c)
		}
		names, _ := rule["names"].([]any)
		names = slices.DeleteFunc(names, func(n any) bool {
			name, _ := n.(string)
			return slices.Contains(moved, name)
		})
		if len(names) == 0 {
			continue
		}
		rule["names"] = names
		out = append(out, rule)
	}
	allow := func(name string, caps ...string) map[string]any {
		return map[string]any{"names": []string{name}, "action": "SCMP_ACT_ALLOW",
			"includes": map[string]any{"caps": caps}}
	}
	out = append(out, allow("bpf", "CAP_BPF"), allow("bpf", "CAP_SYS_ADMIN"),
		allow("perf_event_open", "CAP_PERFMON"), allow("perf_event_open", "CAP_SYS_ADMIN"))
	profile["syscalls"] = out
	data, err = json.Marshal(profile)
	if err != nil {
		t.Fatal(err)
	}
	p.seccomp = filepath.Join(p.dir, "seccomp-docker-like.json")
	if err := os.WriteFile(p.seccomp, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return p.seccomp
}

// ---------------------------------------------------------------------------
// One agent container

type agentContainer struct {
	pm   *podman
	name string
	dir  string // holds etc/, state/ and the bpffs mount
	// bpffs is the private BPF filesystem mounted on /sys/fs/bpf.
	bpffs                string
	caps                 []string
	seccomp              string
	apiPort, metricsPort int
	proxyPort            int // below 1024, so binding it needs CAP_NET_BIND_SERVICE
	hc                   *http.Client
	stopped              bool
}

// runOpts are the settings of an agent container that vary between runs.
type runOpts struct {
	caps    []string // all others are dropped
	seccomp string   // profile file; "" keeps the runtime's own
}

// start writes a configuration for the lab's balancer veth and runs the
// image with exactly o.caps, the root read-only and no tmpfs, a private
// bpffs on /sys/fs/bpf, and etc/ and state/ mounted as compose.yaml
// mounts them.
func (p *podman) start(t *testing.T, l *lab.Lab, o runOpts) *agentContainer {
	dir := t.TempDir()
	pin := agenttest.MountBPFFS(t, dir) // dir/bpffs/veloflux: the image's default pin path
	c := &agentContainer{pm: p, dir: dir, bpffs: filepath.Dir(pin), caps: o.caps, seccomp: o.seccomp,
		hc: &http.Client{Timeout: 5 * time.Second}}
	c.name = fmt.Sprintf("vfdeploy-%d", time.Now().UnixNano())
	c.apiPort, c.metricsPort = freePort(t), freePort(t)
	c.proxyPort = freePrivilegedPort(t)
	for _, d := range []string{"etc", "state"} {
		if err := os.Mkdir(filepath.Join(dir, d), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	loopback := func(port int) string { return fmt.Sprintf("127.0.0.1:%d", port) }
	cfg := agentConfig(agentSpec{name: "deploytest-" + l.Prefix, lab: l, vip: containerVIP,
		api: loopback(c.apiPort), metrics: loopback(c.metricsPort), proxy: loopback(c.proxyPort)})
	if err := os.WriteFile(filepath.Join(dir, "etc", "veloflux.yaml"), []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	c.create(t)
	return c
}

// create runs a new container from c's settings; the image's entry point
// and command are the ones tested, so none are given.
func (c *agentContainer) create(t *testing.T) {
	args := []string{"run", "--detach", "--name", c.name, "--network", "host",
		"--read-only", "--read-only-tmpfs=false", "--cap-drop", "ALL"}
	for _, cp := range c.caps {
		args = append(args, "--cap-add", cp)
	}
	if c.seccomp != "" {
		args = append(args, "--security-opt", "seccomp="+c.seccomp)
	}
	args = append(args, c.pm.limits()...)
	args = append(args,
		"-v", c.bpffs+":/sys/fs/bpf",
		"-v", filepath.Join(c.dir, "etc")+":/etc/veloflux",
		"-v", filepath.Join(c.dir, "state")+":/var/lib/veloflux",
		imageName)
	if out, err := c.pm.run(t, time.Minute, args...); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	c.stopped = false
	name := c.name
	t.Cleanup(func() {
		if out, err := c.pm.run(t, time.Minute, "logs", name); err == nil {
			t.Logf("%s log:\n%s", name, out)
		}
		if out, err := c.pm.run(t, time.Minute, "rm", "--force", "--time", "15", name); err != nil {
			t.Errorf("%v\n%s", err, out)
		}
	})
}

// stop stops the container with SIGTERM; the agent must exit 0.
func (c *agentContainer) stop(t *testing.T) {
	if out, err := c.pm.run(t, time.Minute, "stop", "--time", "20", c.name); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	out, err := c.pm.run(t, time.Minute, "inspect", "--format", "{{.State.ExitCode}}", c.name)
	if err != nil || out != "0" {
		t.Errorf("%s after SIGTERM: exit code %q %v; want 0", c.name, out, err)
	}
	c.stopped = true
}

// recreate stops and removes c's container and runs a new one with the
// same settings and mounts, as `docker compose up` does after a change.
func (c *agentContainer) recreate(t *testing.T) *agentContainer {
	if !c.stopped {
		c.stop(t)
	}
	n := *c
	n.name = c.name + "-2"
	n.create(t)
	return &n
}

// logs returns the container's output so far.
func (c *agentContainer) logs(t *testing.T) string {
	out, err := c.pm.run(t, time.Minute, "logs", c.name)
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	return out
}

// waitHealthy waits until /health answers 200, failing early when the
// container exits.
func (c *agentContainer) waitHealthy(t *testing.T) {
	t.Helper()
	url := fmt.Sprintf("http://127.0.0.1:%d/health", c.apiPort)
	deadline := time.Now().Add(30 * time.Second)
	var last string
	for time.Now().Before(deadline) {
		if state, err := c.pm.run(t, time.Minute, "inspect", "--format", "{{.State.Status}}", c.name); err == nil && state == "exited" {
			t.Fatalf("%s exited before /health answered:\n%s", c.name, c.logs(t))
		}
		resp, err := c.hc.Get(url)
		if err == nil {
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
			last = fmt.Sprintf("%d %s", resp.StatusCode, body)
		} else {
			last = err.Error()
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Fatalf("%s: /health not 200 within 30s (last: %s)\n%s", c.name, last, c.logs(t))
}

// waitExit waits for the container to exit and returns its exit code and
// log.
func (c *agentContainer) waitExit(t *testing.T, timeout time.Duration) (int, string) {
	out, err := c.pm.run(t, timeout, "wait", c.name)
	if err != nil {
		t.Fatalf("%s did not exit within %s: %v\n%s", c.name, timeout, err, c.logs(t))
	}
	code, err := strconv.Atoi(strings.TrimSpace(out))
	if err != nil {
		t.Fatalf("podman wait %s printed %q", c.name, out)
	}
	c.stopped = true
	return code, c.logs(t)
}

// waitLog waits until the container's log contains s, and returns the log.
func (c *agentContainer) waitLog(t *testing.T, s string, timeout time.Duration) string {
	deadline := time.Now().Add(timeout)
	for {
		logs := c.logs(t)
		if strings.Contains(logs, s) {
			return logs
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: no %q in the log within %s:\n%s", c.name, s, timeout, logs)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

type statusView struct {
	Status     string `json:"status"`
	Interfaces []struct {
		Name      string `json:"name"`
		Attached  bool   `json:"attached"`
		ProgramID uint32 `json:"program_id"`
	} `json:"interfaces"`
	LastReconcile struct {
		Error string `json:"error"`
	} `json:"last_reconcile"`
}

// status is GET /api/status.
func (c *agentContainer) status(t *testing.T) statusView {
	var st statusView
	if err := json.Unmarshal(c.api(t, http.MethodGet, "/api/status", "", false), &st); err != nil {
		t.Fatalf("GET /api/status: %v", err)
	}
	return st
}

// scrape parses the agent's /metrics.
func (c *agentContainer) scrape(t *testing.T) map[string]*dto.MetricFamily {
	t.Helper()
	return scrape(t, c.hc, fmt.Sprintf("http://127.0.0.1:%d/metrics", c.metricsPort))
}

// api makes one API request and returns the body of a 2xx answer.
func (c *agentContainer) api(t *testing.T, method, path, body string, auth bool) []byte {
	t.Helper()
	req, err := http.NewRequest(method, fmt.Sprintf("http://127.0.0.1:%d%s", c.apiPort, path), strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	if auth {
		tok, err := os.ReadFile(filepath.Join(c.dir, "state", "api.token"))
		if err != nil {
			t.Fatalf("read the API token: %v", err)
		}
		req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(tok)))
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode/100 != 2 {
		t.Fatalf("%s %s: %d %s %v", method, path, resp.StatusCode, data, err)
	}
	return data
}

// checkAttached checks, through the API and independently through netlink
// and the pins, that XDP is attached to the lab's balancer veth.
func (c *agentContainer) checkAttached(t *testing.T, l *lab.Lab) {
	t.Helper()
	st := c.status(t)
	var apiProg uint32
	for _, i := range st.Interfaces {
		if i.Name == l.Balancer.IfName && i.Attached {
			apiProg = i.ProgramID
		}
	}
	if apiProg == 0 {
		t.Errorf("GET /api/status: %s not attached: %+v", l.Balancer.IfName, st.Interfaces)
	}
	if id := xdpProgID(t, l.Balancer.IfName); id == 0 || id != apiProg {
		t.Errorf("netlink: XDP program %d on %s; the API says %d", id, l.Balancer.IfName, apiProg)
	}
	pins := filepath.Join(c.bpffs, "veloflux")
	for _, name := range []string{"link_xdp_" + l.Balancer.IfName, "vf_vips", "vf_rings", "vf_reals",
		"vf_ct4", "vf_ct6", "vf_counters", "vf_settings"} {
		if _, err := os.Stat(filepath.Join(pins, name)); err != nil {
			t.Errorf("pin %s: %v", name, err)
		}
	}
}

// xdpProgID returns the id of the XDP program attached to ifName, or 0.
func xdpProgID(t testing.TB, ifName string) uint32 {
	t.Helper()
	link, err := netlink.LinkByName(ifName)
	if err != nil {
		t.Fatalf("netlink: %s: %v", ifName, err)
	}
	if x := link.Attrs().Xdp; x != nil && x.Attached {
		return x.ProgId
	}
	return 0
}

// logLine returns the first line of logs that contains s, shortened.
func logLine(logs, s string) string {
	for _, line := range strings.Split(logs, "\n") {
		if strings.Contains(line, s) {
			if len(line) > 400 {
				line = line[:400] + "..."
			}
			return line
		}
	}
	return ""
}

// freePort returns a TCP port nothing listens on at 127.0.0.1 here.
func freePort(t testing.TB) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("find a free port: %v", err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// freePrivilegedPort returns a port below 1024 nothing listens on at
// 127.0.0.1, for the proxy: binding it is what CAP_NET_BIND_SERVICE is for.
func freePrivilegedPort(t testing.TB) int {
	t.Helper()
	for p := 1023; p >= 600; p-- {
		ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", p))
		if err == nil {
			ln.Close()
			return p
		}
	}
	t.Fatal("no free port in 600..1023 at 127.0.0.1")
	return 0
}

// mountsUnder returns the mount points at or below dir, deepest first.
func mountsUnder(t testing.TB, dir string) []string {
	t.Helper()
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Errorf("read mountinfo: %v", err)
		return nil
	}
	var out []string
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && (f[4] == dir || strings.HasPrefix(f[4], dir+"/")) {
			out = append(out, f[4])
		}
	}
	slices.SortFunc(out, func(a, b string) int { return len(b) - len(a) })
	return out
}
