package bench

// BenchmarkL7 compares three reverse proxies in HTTP mode, each in front of
// the same three backends with round robin and keep-alive to the backends:
// the VeloFlux agent's L7 proxy (agent/proxy, whose HTTP/1.1 engine this
// load exercises), HAProxy and nginx. It loads each with wrk over
// keep-alive connections, in plain HTTP and with TLS on the client side,
// and reports requests/s, requests per core (requests per second of the
// proxy's own CPU time: the client cannot saturate a pinned core, so this,
// not requests/s, says what one core serves), p50/p99 latency, and the
// proxy's CPU time and system calls (perf) per request, with same-round
// ratios to HAProxy and the load average. With VF_L7_AGENT_B set to another
// build of the agent, that build runs as "veloflux-b" right after
// "veloflux" in every round: an A/B of two builds in the same rounds, with
// the same-round ratio of B to A. With VF_L7_REFS=1
// three net/http references from tests/bench/refproxy run in the same
// rounds (a bare httputil.ReverseProxy, the same over a synchronous
// RoundTripper, and net/http's server answering by itself): what the
// net/http stack costs. Each run's line is followed by one with the
// proxy's user and system time per request (the kernel's tick accounting),
// the kernel's TCP segment counters per request, and, per request, any perf
// events that VF_L7_EVENTS names (counted on the proxy's process, e.g.
// sched:sched_switch,syscalls:sys_enter_epoll_pwait) or that
// VF_L7_CPU_EVENTS names (counted per CPU on both CPUs, e.g.
// irq_vectors:reschedule_entry). docs/BENCHMARKS.md records the figures.
//
//	go test -run '^$' -bench BenchmarkL7 -benchtime 1x ./tests/bench/ -v
//
// BenchmarkProfileL7 runs the same agent in the test process (agent.New and
// Run with the same configuration) under the same load, for a CPU profile
// per sub-benchmark (plain, tls, plain-accesslog, plain-accesslog-buffered)
// written to $VF_L7_PROFILE_DIR:
//
//	mkdir -p /tmp/l7prof && VF_L7_PROFILE_DIR=/tmp/l7prof go test -run '^$' -bench BenchmarkProfileL7 -benchtime 1x ./tests/bench/ -v
//	go tool pprof -top /tmp/l7prof/l7-plain.cpu
//
// Everything here runs on loopback (127.0.0.1, free ports picked at start)
// and is private to this file: identifiers start with l7. Only the agent
// binary (agenttest.BuildAgent with $VF_BENCH_AGENT, as BenchmarkL4) and
// the private bpffs for its pins (agenttest.MountBPFFS) are shared.
//
// CPU layout: every proxy is pinned to CPU 1 with one worker (HAProxy
// nbthread 1, nginx one worker process, the agent GOMAXPROCS=1); wrk (one
// thread) and the backends (one nginx worker answering from memory) are
// pinned to CPU 0.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"runtime"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/veloflux/veloflux/agent"
	"github.com/veloflux/veloflux/tests/agenttest"
)

const (
	// The load, the same for every proxy and mode.
	l7WrkThreads  = 1
	l7WrkConns    = 64
	l7WrkDuration = 8 * time.Second
	l7WrkTimeout  = 2 * time.Second // slower requests count as timeout errors
	l7WarmUp      = 2 * time.Second // per proxy and mode, not recorded
	l7DirectRun   = 5 * time.Second // wrk straight to backend 0, once
	l7Rounds      = 4

	l7BodySize = 1024 // the backends' fixed answer
	l7Path     = "/1k"

	// CPUs: every proxy runs alone on l7ProxyCPU; wrk and the backends
	// share l7LoadCPU.
	l7ProxyCPU = 1
	l7LoadCPU  = 0

	// A run during which processes foreign to the benchmark used more than
	// this share of one CPU is repeated, at most l7MaxRetries times in all.
	l7ForeignLimit = 0.10
	l7MaxRetries   = 4
	// Before each run, wait until the machine is quiet (less than
	// l7QuietBusy of all CPUs busy over a second), at most l7QuietWait per
	// run and l7QuietBudget in all; then measure anyway, and say so.
	l7QuietBusy   = 0.10
	l7QuietWait   = 10 * time.Second
	l7QuietBudget = 60 * time.Second

	// TLS on the client side: the same suite for everyone (HAProxy and
	// nginx are told; Go's server picks it by itself on AES-NI hardware).
	l7TLSSuite = "TLS_AES_128_GCM_SHA256"
)

var l7Modes = []string{"plain", "tls"}

// l7Proxies in the order of every round: the three proxies compared, then,
// with VF_L7_REFS=1, the net/http references built from tests/bench/refproxy
// (l7RefModes), which measure what net/http and httputil.ReverseProxy cost
// (VeloFlux's HTTP/2 engine; its HTTP/1.1 engine, which this load uses, is
// fasthttp's).
var l7Proxies = func() []string {
	names := []string{"haproxy", "nginx", "veloflux"}
	if os.Getenv(l7AgentBEnv) != "" {
		names = append(names, "veloflux-b")
	}
	if os.Getenv("VF_L7_REFS") == "1" {
		names = append(names, "go-rp", "go-rpsync", "go-static")
	}
	return names
}()

// l7AgentBEnv names a second agent binary for an A/B of two builds.
const l7AgentBEnv = "VF_L7_AGENT_B"

// l7Agents are the proxies that are builds of the agent.
var l7Agents = []string{"veloflux", "veloflux-b"}

// l7RefModes maps a reference's name to its refproxy -mode.
var l7RefModes = map[string]string{"go-rp": "rp", "go-rpsync": "rp-sync", "go-static": "static"}

// l7Want is what l7WaitReady must see through a proxy: every backend, or
// nothing for go-static, which answers by itself.
func l7Want(name string) map[string]bool {
	if name == "go-static" {
		return nil
	}
	return l7AllBackends
}

// ---- processes ----

// l7Spawner starts every child process from one goroutine locked to an OS
// thread that lives as long as the test process, so that Pdeathsig (sent
// when the thread that forked the child exits) fires only when the test
// process dies: a test binary killed by -timeout or a signal leaves no
// proxy, backend or wrk behind. Every child is a single process (nginx with
// master_process off, HAProxy -db, the agent, wrk), so the signal covers all.
var l7Spawner struct {
	once sync.Once
	reqs chan l7SpawnReq
}

type l7SpawnReq struct {
	cmd *exec.Cmd
	err chan error
}

func l7Start(cmd *exec.Cmd) error {
	l7Spawner.once.Do(func() {
		l7Spawner.reqs = make(chan l7SpawnReq)
		go func() {
			runtime.LockOSThread() // never unlocked: the thread lives on
			for r := range l7Spawner.reqs {
				r.err <- r.cmd.Start()
			}
		}()
	})
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	// Its own process group, so a Ctrl-C at the terminal reaches the test
	// only, which then stops the children itself.
	cmd.SysProcAttr.Setpgid = true
	cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
	r := l7SpawnReq{cmd: cmd, err: make(chan error, 1)}
	l7Spawner.reqs <- r
	return <-r.err
}

// l7Pinned is the command line that runs argv on one CPU.
func l7Pinned(cpu int, argv ...string) []string {
	return append([]string{"taskset", "-c", strconv.Itoa(cpu)}, argv...)
}

// l7StartProc starts a long-running child (a proxy or the backends).
func l7StartProc(tb testing.TB, name, logPath string, env []string, argv ...string) (*process, error) {
	cmd := exec.Command(argv[0], argv[1:]...) // stopped by stop, never by a context
	if env != nil {
		cmd.Env = append(os.Environ(), env...)
	}
	return runProcess(tb, name, cmd, logPath, l7Start)
}

// ---- set-up shared by both benchmarks ----

// l7Env is one benchmark's scratch directory, ports, certificate and
// backends.
type l7Env struct {
	tb        testing.TB
	dir       string
	backends  [3]int // ports on 127.0.0.1
	certFile  string
	keyFile   string
	pemFile   string // certificate and key, for HAProxy
	certPool  *x509.CertPool
	ports     map[string][2]int // proxy -> http, https port
	ctlPorts  map[string][2]int // agent build -> API, metrics port
	pinPath   string
	agentBin  string
	refBin    string // tests/bench/refproxy
	backendsP *process
}

func l7Require(b *testing.B, tools ...string) {
	if os.Geteuid() != 0 {
		b.Skip("needs root: the agent loads its BPF maps even without VIPs, and a private bpffs is mounted for its pins")
	}
	for _, t := range tools {
		if _, err := exec.LookPath(t); err != nil {
			b.Skipf("%s is not installed (apt-get install -y wrk haproxy nginx; taskset is in util-linux): %v", t, err)
		}
	}
	if runtime.NumCPU() < 2 {
		b.Skipf("needs 2 CPUs (one for the proxy, one for wrk and the backends); this machine has %d", runtime.NumCPU())
	}
}

// l7FreePorts returns n distinct free TCP ports on 127.0.0.1.
func l7FreePorts(n int) ([]int, error) {
	var lns []net.Listener
	defer func() {
		for _, l := range lns {
			l.Close()
		}
	}()
	var ports []int
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		lns = append(lns, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

func newL7Env(b *testing.B) *l7Env {
	e := &l7Env{tb: b, dir: b.TempDir(), ports: map[string][2]int{}, ctlPorts: map[string][2]int{}}
	ports, err := l7FreePorts(3 + 2*len(l7Proxies) + 2*len(l7Agents))
	if err != nil {
		b.Fatal(err)
	}
	copy(e.backends[:], ports[:3])
	for i, name := range l7Proxies {
		e.ports[name] = [2]int{ports[3+2*i], ports[4+2*i]}
	}
	for i, name := range l7Agents {
		e.ctlPorts[name] = [2]int{ports[3+2*len(l7Proxies)+2*i], ports[4+2*len(l7Proxies)+2*i]}
	}
	if err := e.writeCert(); err != nil {
		b.Fatal(err)
	}
	return e
}

// writeCert makes a self-signed ECDSA P-256 certificate for 127.0.0.1 and
// localhost.
func (e *l7Env) writeCert() error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(now.UnixNano()),
		Subject:               pkix.Name{CommonName: "localhost", Organization: []string{"VeloFlux L7 benchmark"}},
		DNSNames:              []string{"localhost"},
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1)},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return err
	}
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})
	e.certFile = filepath.Join(e.dir, "cert.pem")
	e.keyFile = filepath.Join(e.dir, "key.pem")
	e.pemFile = filepath.Join(e.dir, "haproxy.pem")
	for path, data := range map[string][]byte{e.certFile: certPEM, e.keyFile: keyPEM, e.pemFile: append(slices.Clone(certPEM), keyPEM...)} {
		if err := os.WriteFile(path, data, 0o600); err != nil {
			return err
		}
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return err
	}
	e.certPool = x509.NewCertPool()
	e.certPool.AddCert(leaf)
	return nil
}

// l7NginxHead starts the configuration of one of the benchmark's nginx
// instances (name: "backends" or "nginx-proxy"): one worker in
// single-process mode, its pid file in e.dir, and the http block opened with
// no access log, long keep-alive and its temporary directories (by default
// under /var/lib/nginx) created below e.dir.
func (e *l7Env) l7NginxHead(name, what string) (string, error) {
	var b strings.Builder
	fmt.Fprintf(&b, `# written by tests/bench/l7_test.go: %s
user root;
worker_processes 1;
master_process off;
daemon off;
pid %s;
worker_rlimit_nofile 16384;
events { worker_connections 8192; }
http {
	access_log off;
	keepalive_requests 10000000;
`, what, filepath.Join(e.dir, name+".pid"))
	temp := filepath.Join(e.dir, name+"-tmp")
	for _, d := range []string{"client_body", "proxy", "fastcgi", "uwsgi", "scgi"} {
		if err := os.MkdirAll(filepath.Join(temp, d), 0o700); err != nil {
			return "", err
		}
		fmt.Fprintf(&b, "\t%s_temp_path %s;\n", d, filepath.Join(temp, d))
	}
	return b.String(), nil
}

// startBackends runs the three backends: one nginx instance, one worker
// (single-process mode) on l7LoadCPU, listening on three ports, each
// answering GET /1k with the same 1 KiB body from its configuration (no
// file to open or read: the backends share their CPU with wrk, and every
// cycle they save is load the proxies can be given) and an X-Backend
// header naming it, and /healthz with 200.
func (e *l7Env) startBackends(ctx context.Context) error {
	head, err := e.l7NginxHead("backends", "the backends")
	if err != nil {
		return err
	}
	var b strings.Builder
	b.WriteString(head)
	b.WriteString(`	keepalive_timeout 120s;
	default_type text/plain;
`)
	body := strings.Repeat("x", l7BodySize)
	for i, port := range e.backends {
		fmt.Fprintf(&b, `	server {
		listen 127.0.0.1:%d;
		add_header X-Backend b%d;
		location = %s { return 200 "%s"; }
		location = /healthz { return 200 "ok\n"; }
	}
`, port, i, l7Path, body)
	}
	b.WriteString("}\n")
	cfg := filepath.Join(e.dir, "backends.conf")
	if err := os.WriteFile(cfg, []byte(b.String()), 0o600); err != nil {
		return err
	}
	log := filepath.Join(e.dir, "backends.log")
	p, err := l7StartProc(e.tb, "nginx backends", log, nil,
		l7Pinned(l7LoadCPU, "nginx", "-p", e.dir, "-c", cfg, "-e", "stderr")...)
	if err != nil {
		return err
	}
	e.backendsP = p
	for i, port := range e.backends {
		url := fmt.Sprintf("http://127.0.0.1:%d%s", port, l7Path)
		if err := l7WaitReady(ctx, url, nil, p, map[string]bool{fmt.Sprintf("b%d", i): true}); err != nil {
			return fmt.Errorf("backend %d: %w\n%s", i, err, logTail(log, 10))
		}
	}
	return nil
}

// agentYAML is the agent's configuration: no VIPs and no interfaces (no XDP
// program is attached), the proxy on two loopback ports, one route "/" to a
// round-robin pool of the three backends with an http health check.
func (e *l7Env) agentYAML(name string) string {
	var b strings.Builder
	p, ctl := e.ports[name], e.ctlPorts[name]
	fmt.Fprintf(&b, `# written by tests/bench/l7_test.go
node:
  name: vf-bench-l7
api:
  listen: 127.0.0.1:%d
  token_file: %s
metrics:
  listen: 127.0.0.1:%d
dataplane:
  conntrack_size: 65536
proxy:
  enabled: true
  http_listen: 127.0.0.1:%d
  https_listen: 127.0.0.1:%d
  tls:
    - {cert_file: %s, key_file: %s}
  drain_timeout: 2s
pools:
  - name: web
    algorithm: round_robin
    health_check: {type: http, path: /healthz, interval: 2s, timeout: 1s, rise: 1, fall: 3}
    backends:
`, ctl[0], filepath.Join(e.dir, "api.token"), ctl[1], p[0], p[1], e.certFile, e.keyFile)
	for _, port := range e.backends {
		fmt.Fprintf(&b, "      - {address: 127.0.0.1, port: %d}\n", port)
	}
	b.WriteString("routes:\n  - {path_prefix: /, pool: web}\n")
	return b.String()
}

func (e *l7Env) writeAgentConfig(name string) (string, error) {
	path := filepath.Join(e.dir, name+".yaml")
	return path, os.WriteFile(path, []byte(e.agentYAML(name)), 0o600)
}

// ---- the proxies ----

// startHAProxy: HTTP mode, one thread, keep-alive on both sides with
// connection reuse to the backends ("http-reuse always"), round robin, the
// same health check as the agent, X-Forwarded-For added.
func (e *l7Env) startHAProxy() (*process, error) {
	p := e.ports["haproxy"]
	var b strings.Builder
	fmt.Fprintf(&b, `# written by tests/bench/l7_test.go
global
	nbthread 1
	maxconn 8192
	ssl-default-bind-options ssl-min-ver TLSv1.2
	ssl-default-bind-ciphersuites %s

defaults
	mode http
	option http-keep-alive
	timeout connect 2s
	timeout client 90s
	timeout server 15s
	timeout http-keep-alive 90s

frontend fe
	bind 127.0.0.1:%d
	bind 127.0.0.1:%d ssl crt %s
	option forwardfor
	default_backend web

backend web
	balance roundrobin
	http-reuse always
	option httpchk GET /healthz
`, l7TLSSuite, p[0], p[1], e.pemFile)
	for i, port := range e.backends {
		fmt.Fprintf(&b, "\tserver b%d 127.0.0.1:%d check inter 2s rise 1 fall 3\n", i, port)
	}
	cfg := filepath.Join(e.dir, "haproxy.cfg")
	if err := os.WriteFile(cfg, []byte(b.String()), 0o600); err != nil {
		return nil, err
	}
	// -db: foreground, no master process.
	return l7StartProc(e.tb, "haproxy", filepath.Join(e.dir, "haproxy.log"), nil,
		l7Pinned(l7ProxyCPU, "haproxy", "-db", "-f", cfg)...)
}

// startNginx: one worker (single-process mode), an upstream block with
// keepalive 64 over HTTP/1.1, the usual forwarding headers.
func (e *l7Env) startNginx() (*process, error) {
	p := e.ports["nginx"]
	head, err := e.l7NginxHead("nginx-proxy", "the nginx proxy")
	if err != nil {
		return nil, err
	}
	var ups strings.Builder
	for _, port := range e.backends {
		fmt.Fprintf(&ups, "\t\tserver 127.0.0.1:%d;\n", port)
	}
	conf := head + fmt.Sprintf(`	keepalive_timeout 90s;
	upstream web {
%s		keepalive 64;
		keepalive_requests 10000000;
		keepalive_timeout 90s;
	}
	server {
		listen 127.0.0.1:%d;
		listen 127.0.0.1:%d ssl;
		ssl_certificate %s;
		ssl_certificate_key %s;
		ssl_protocols TLSv1.2 TLSv1.3;
		ssl_conf_command Ciphersuites %s;
		location / {
			proxy_pass http://web;
			proxy_http_version 1.1;
			proxy_set_header Connection "";
			proxy_set_header Host $host;
			proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
			proxy_set_header X-Forwarded-Proto $scheme;
			proxy_set_header X-Real-IP $remote_addr;
		}
	}
}
`, ups.String(), p[0], p[1], e.certFile, e.keyFile, l7TLSSuite)
	cfg := filepath.Join(e.dir, "nginx-proxy.conf")
	if err := os.WriteFile(cfg, []byte(conf), 0o600); err != nil {
		return nil, err
	}
	log := filepath.Join(e.dir, "nginx-proxy.log")
	return l7StartProc(e.tb, "nginx proxy", log, nil, l7Pinned(l7ProxyCPU, "nginx", "-p", e.dir, "-c", cfg, "-e", "stderr")...)
}

// startVeloFlux runs the agent binary with GOMAXPROCS=1 on l7ProxyCPU, at
// log level warn: the per-request access log (an Info record) is off, as
// it is for HAProxy (no log line) and nginx (access_log off).
func (e *l7Env) startVeloFlux() (*process, error) {
	return e.startAgent("veloflux", e.agentBin, e.pinPath)
}

// startVeloFluxB runs the build named by $VF_L7_AGENT_B the same way, with
// its own ports, pins (a directory of the same bpffs) and state.
func (e *l7Env) startVeloFluxB() (*process, error) {
	bin, err := filepath.Abs(os.Getenv(l7AgentBEnv))
	if err != nil {
		return nil, err
	}
	if _, err := os.Stat(bin); err != nil {
		return nil, fmt.Errorf("%s: %w", l7AgentBEnv, err)
	}
	pins := filepath.Join(e.pinPath, "b")
	if err := os.MkdirAll(pins, 0o700); err != nil {
		return nil, err
	}
	return e.startAgent("veloflux-b", bin, pins)
}

func (e *l7Env) startAgent(name, bin, pins string) (*process, error) {
	cfg, err := e.writeAgentConfig(name)
	if err != nil {
		return nil, err
	}
	return l7StartProc(e.tb, name+" agent", filepath.Join(e.dir, name+".log"), []string{"GOMAXPROCS=1"},
		l7Pinned(l7ProxyCPU, bin, "run", "--config", cfg, "--pin-path", pins,
			"--state-dir", filepath.Join(e.dir, "state-"+name), "--log-level", "warn", "--log-format", "text")...)
}

// buildRef builds tests/bench/refproxy into the scratch directory.
func (e *l7Env) buildRef() error {
	root, err := agenttest.ModuleRoot()
	if err != nil {
		return err
	}
	e.refBin = filepath.Join(e.dir, "refproxy")
	return agenttest.GoBuild(root, "./tests/bench/refproxy", e.refBin)
}

// startRef runs one net/http reference on l7ProxyCPU with GOMAXPROCS=1,
// like the agent: HTTP and TLS (the same certificate) on its two ports,
// round robin over the three backends.
func (e *l7Env) startRef(name string) (*process, error) {
	p := e.ports[name]
	backends := make([]string, len(e.backends))
	for i, port := range e.backends {
		backends[i] = fmt.Sprintf("127.0.0.1:%d", port)
	}
	return l7StartProc(e.tb, name, filepath.Join(e.dir, name+".log"), []string{"GOMAXPROCS=1"},
		l7Pinned(l7ProxyCPU, e.refBin, "-mode", l7RefModes[name],
			"-listen", fmt.Sprintf("127.0.0.1:%d", p[0]), "-tls-listen", fmt.Sprintf("127.0.0.1:%d", p[1]),
			"-cert", e.certFile, "-key", e.keyFile, "-backends", strings.Join(backends, ","),
			"-body-size", strconv.Itoa(l7BodySize))...)
}

func (e *l7Env) url(name, mode string) string {
	p := e.ports[name]
	if mode == "tls" {
		return fmt.Sprintf("https://127.0.0.1:%d%s", p[1], l7Path)
	}
	return fmt.Sprintf("http://127.0.0.1:%d%s", p[0], l7Path)
}

// l7WaitReady waits until url answers 200 with the 1 KiB body and every
// backend in want (X-Backend) has answered through it. proc must keep
// running meanwhile.
func l7WaitReady(ctx context.Context, url string, pool *x509.CertPool, proc *process, want map[string]bool) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}, DisableCompression: true}
	defer tr.CloseIdleConnections()
	hc := &http.Client{Timeout: 2 * time.Second, Transport: tr}
	seen := map[string]bool{}
	answers := 0
	var lastErr error
	for {
		if proc.exited() {
			return fmt.Errorf("%s exited: %v\n%s", proc.name, proc.err, logTail(proc.logPath, 10))
		}
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		resp, err := hc.Do(req)
		if err == nil {
			body, rerr := io.ReadAll(resp.Body)
			resp.Body.Close()
			switch {
			case rerr != nil:
				err = rerr
			case resp.StatusCode != http.StatusOK || len(body) != l7BodySize:
				err = fmt.Errorf("status %d, %d bytes", resp.StatusCode, len(body))
			default:
				seen[resp.Header.Get("X-Backend")] = true
				done := true
				for k := range want {
					done = done && seen[k]
				}
				if done {
					return nil
				}
				if answers++; answers > 30 {
					return fmt.Errorf("%s: answers from %v, want %v", url, seen, want)
				}
				continue
			}
		}
		lastErr = err
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s not ready (seen %v): %v", url, seen, lastErr)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

var l7AllBackends = map[string]bool{"b0": true, "b1": true, "b2": true}

// l7TLSInfo asks openssl s_client (an OpenSSL client like wrk's) what the
// server negotiates: "TLSv1.3 TLS_AES_128_GCM_SHA256".
func l7TLSInfo(ctx context.Context, port int) string {
	if _, err := exec.LookPath("openssl"); err != nil {
		return "unchecked (no openssl)"
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "openssl", "s_client", "-connect", fmt.Sprintf("127.0.0.1:%d", port), "-servername", "localhost")
	cmd.Stdin = strings.NewReader("")
	out, _ := cmd.CombinedOutput()
	m := regexp.MustCompile(`New, (TLSv[0-9.]+), Cipher is (\S+)`).FindSubmatch(out)
	if m == nil {
		return "unknown"
	}
	return string(m[1]) + " " + string(m[2])
}

// ---- wrk ----

type l7Result struct {
	Requests  int64
	ReqPerSec float64
	P50, P99  time.Duration
	Errors    int64 // socket errors and non-2xx/3xx answers

	Wall     time.Duration
	ProxyCPU time.Duration // the proxy's process (0 for direct)
	// ProxyUser is the part of ProxyCPU spent in user space (the
	// kernel's tick accounting: a sample, not an exact figure).
	ProxyUser time.Duration
	Syscalls  int64 // system calls the proxy's process made (0: not counted)
	// ClientSleeps is how many times wrk went to sleep for want of a
	// response (its voluntary context switches): each is a wake-up that
	// the proxy's next write pays for, and a proxy that writes in bursts
	// causes fewer.
	ClientSleeps int64
	// BackendSleeps is the same for the backends' nginx worker, whom the
	// proxy's requests wake.
	BackendSleeps int64
	// Events are counts over the run: the kernel's TCP counters
	// ("tcp:OutSegs"...) and the perf events of l7ExtraEvents.
	Events    map[string]int64
	CPUBusy   [2]float64    // share busy of l7LoadCPU, l7ProxyCPU (user+system+irq+softirq)
	Steal     float64       // share of the two CPUs stolen by the hypervisor
	Foreign   time.Duration // CPU time of processes foreign to the benchmark
	Load      [2]float64    // the 1-minute load average before and after the run (uptime's first figure)
	Retried   bool          // a first attempt was disturbed and repeated
	QuietWait time.Duration // waited for a quiet machine before the run
	Quiet     bool          // the machine was quiet when the run started
}

// l7ParseWrk reads wrk's report with the package's parser (wrk_test.go).
func l7ParseWrk(out string) (l7Result, error) {
	w, err := parseWrk(out)
	if err != nil {
		return l7Result{}, err
	}
	return l7Result{Requests: w.Requests, ReqPerSec: w.ReqPerSec, P50: w.P50, P99: w.P99, Errors: w.errors()}, nil
}

func l7WrkArgs(url string, d time.Duration) []string {
	return l7Pinned(l7LoadCPU, "wrk", "-t", strconv.Itoa(l7WrkThreads), "-c", strconv.Itoa(l7WrkConns),
		"-d", fmt.Sprintf("%ds", int(d/time.Second)), "--timeout", fmt.Sprintf("%ds", int(l7WrkTimeout/time.Second)),
		"--latency", url)
}

// l7RunWrk runs wrk on l7LoadCPU against url and accounts the CPU time
// spent meanwhile; proxyPID (0: none) is the proxy's process.
func l7RunWrk(ctx context.Context, url string, d time.Duration, proxyPID int) (l7Result, string, error) {
	ctx, cancel := context.WithTimeout(ctx, d+20*time.Second)
	defer cancel()
	argv := l7WrkArgs(url, d)
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	load0 := l7LoadAvg()
	before := l7SampleCPU(proxyPID)
	count := l7CountSyscalls(proxyPID)
	countExtra := func() map[string]int64 { return map[string]int64{} }
	if proxyPID != 0 {
		countExtra = l7CountEvents([]string{"-p", strconv.Itoa(proxyPID)}, l7ExtraEvents("VF_L7_EVENTS"))
	}
	countCPUs := l7CountEvents([]string{"-a", "-A", "-C", fmt.Sprintf("%d,%d", l7LoadCPU, l7ProxyCPU)}, l7ExtraEvents("VF_L7_CPU_EVENTS"))
	tcp0 := l7TCPCounters()
	if err := l7Start(cmd); err != nil {
		count()
		countExtra()
		countCPUs()
		return l7Result{}, "", err
	}
	err := cmd.Wait()
	tcp1 := l7TCPCounters()
	syscalls := count()
	extra, cpus := countExtra(), countCPUs()
	after := l7SampleCPU(proxyPID)
	if err != nil {
		return l7Result{}, out.String(), fmt.Errorf("wrk %s: %w", url, err)
	}
	r, err := l7ParseWrk(out.String())
	if err != nil {
		return r, out.String(), fmt.Errorf("wrk %s: %w", url, err)
	}
	after.into(&r, before)
	r.Syscalls = syscalls
	r.Events = map[string]int64{}
	for k, v := range tcp1 {
		r.Events["tcp:"+k] = v - tcp0[k]
	}
	for k, v := range extra {
		r.Events[k] = v
	}
	for k, v := range cpus {
		r.Events["cpus:"+k] = v
	}
	if ru, ok := cmd.ProcessState.SysUsage().(*syscall.Rusage); ok {
		r.ClientSleeps = ru.Nvcsw
	}
	r.Load = [2]float64{load0, l7LoadAvg()}
	return r, out.String(), nil
}

// l7CompareBuilds is the A/B line of two agent builds measured in the same
// rounds: the same-round ratios of B to A, per core and p99, their medians,
// and B's CPU and system calls per request against A's.
func l7CompareBuilds(mode string, a, b []l7Result) string {
	var perCore, p99, cpuA, cpuB, sysA, sysB []float64
	var per []string
	for i := range min(len(a), len(b)) {
		pc, lat := l7PerCore(b[i])/l7PerCore(a[i]), float64(b[i].P99)/float64(a[i].P99)
		perCore, p99 = append(perCore, pc), append(p99, lat)
		cpuA, cpuB = append(cpuA, l7PerReq(a[i].ProxyCPU, a[i].Requests)), append(cpuB, l7PerReq(b[i].ProxyCPU, b[i].Requests))
		sysA, sysB = append(sysA, l7SyscallsPerReq(a[i])), append(sysB, l7SyscallsPerReq(b[i]))
		per = append(per, fmt.Sprintf("x%.2f/x%.2f", pc, lat))
	}
	return fmt.Sprintf("A/B (%s): veloflux-b per core x%.2f of veloflux, p99 x%.2f (medians of same-round ratios; per round %s); CPU %.1f vs %.1f µs/req, %.1f vs %.1f syscalls/req (medians)",
		mode, median(perCore), median(p99), strings.Join(per, " "), median(cpuB), median(cpuA), median(sysB), median(sysA))
}

// l7CountSyscalls counts the system calls of process pid (0: none) with
// perf's raw_syscalls:sys_enter tracepoint, in counting mode (no
// sampling, no cost to the process) until the returned function is
// called, which returns the count (0 when perf is missing or failed).
func l7CountSyscalls(pid int) func() int64 {
	if pid == 0 {
		return func() int64 { return 0 }
	}
	stop := l7CountEvents([]string{"-p", strconv.Itoa(pid)}, []string{l7SyscallEvent})
	return func() int64 { return stop()[l7SyscallEvent] }
}

const l7SyscallEvent = "raw_syscalls:sys_enter"

// l7CountEvents counts perf events (perf stat in counting mode) over the
// target that scope gives (perf's -p or -a -C arguments) until the
// returned function is called, which returns the counts by event name
// (empty when perf is missing or failed).
func l7CountEvents(scope, events []string) func() map[string]int64 {
	none := func() map[string]int64 { return map[string]int64{} }
	if len(events) == 0 {
		return none
	}
	if _, err := exec.LookPath("perf"); err != nil {
		return none
	}
	args := append([]string{"stat", "-x", ",", "-e", strings.Join(events, ",")}, scope...)
	cmd := exec.Command("perf", args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		return none
	}
	time.Sleep(100 * time.Millisecond) // perf attaches
	return func() map[string]int64 {
		cmd.Process.Signal(os.Interrupt)
		cmd.Wait()
		counts := map[string]int64{}
		for line := range strings.SplitSeq(out.String(), "\n") {
			f := strings.Split(line, ",")
			cpu := ""
			if len(f) > 0 && strings.HasPrefix(f[0], "CPU") { // -A: one line per CPU
				cpu, f = "@"+strings.ToLower(f[0]), f[1:]
			}
			if len(f) < 3 {
				continue
			}
			if n, err := strconv.ParseInt(f[0], 10, 64); err == nil {
				counts[f[2]+cpu] += n
			}
		}
		return counts
	}
}

// l7ExtraEvents are perf events that VF_L7_EVENTS names (comma-separated),
// counted on the proxy's process, and that VF_L7_CPU_EVENTS names, counted
// on both CPUs: shown per request in each run's line, for finding where a
// proxy's time goes (scheduler switches, IPIs, system calls by kind).
func l7ExtraEvents(env string) []string {
	var events []string
	for ev := range strings.SplitSeq(os.Getenv(env), ",") {
		if ev = strings.TrimSpace(ev); ev != "" {
			events = append(events, ev)
		}
	}
	return events
}

// l7TCPCounters reads the kernel's TCP counters (/proc/net/snmp's Tcp and
// /proc/net/netstat's TcpExt lines) that say how many segments a request
// cost: segments sent, and among them ACKs without data and delayed ACKs.
// Loopback's traffic is all the benchmark's; the machine has little else.
func l7TCPCounters() map[string]int64 {
	counts := map[string]int64{}
	for _, file := range []string{"/proc/net/snmp", "/proc/net/netstat"} {
		b, err := os.ReadFile(file)
		if err != nil {
			continue
		}
		lines := strings.Split(string(b), "\n")
		for i := 0; i+1 < len(lines); i += 2 {
			names, values := strings.Fields(lines[i]), strings.Fields(lines[i+1])
			if len(names) != len(values) || len(names) == 0 || (names[0] != "Tcp:" && names[0] != "TcpExt:") {
				continue
			}
			for j := 1; j < len(names); j++ {
				switch names[j] {
				case "OutSegs", "InSegs", "DelayedACKs", "TCPPureAcks", "TCPHPAcks", "TCPAutoCorking", "TCPBacklogCoalesce":
					n, _ := strconv.ParseInt(values[j], 10, 64)
					counts[names[j]] = n
				}
			}
		}
	}
	return counts
}

// ---- CPU accounting ----

// l7LoadAvg is the 1-minute load average (/proc/loadavg), 0 if unreadable.
func l7LoadAvg() float64 {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return 0
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return 0
	}
	v, _ := strconv.ParseFloat(f[0], 64)
	return v
}

// l7PerCore is a run's requests per second of the proxy's CPU time:
// requests divided by the CPU seconds its process used (utime+stime). A
// proxy that saturates its one CPU serves this many requests per second; one
// that the client leaves partly idle is judged by the CPU it did use. 0 when
// the proxy's CPU time was not measured.
func l7PerCore(r l7Result) float64 {
	if r.ProxyCPU <= 0 {
		return 0
	}
	return float64(r.Requests) / r.ProxyCPU.Seconds()
}

type l7CPUSample struct {
	at        time.Time
	cpu       map[string][10]int64 // /proc/stat cpuN lines, ticks
	proxy     time.Duration
	proxyUser time.Duration
	foreign   map[int]time.Duration // user processes not descended from this one
}

func l7SampleCPU(proxyPID int) l7CPUSample {
	s := l7CPUSample{at: time.Now(), cpu: map[string][10]int64{}, foreign: map[int]time.Duration{}}
	if b, err := os.ReadFile("/proc/stat"); err == nil {
		for line := range strings.SplitSeq(string(b), "\n") {
			f := strings.Fields(line)
			if len(f) < 9 || !strings.HasPrefix(f[0], "cpu") {
				continue
			}
			var v [10]int64
			for i := 1; i < len(f) && i <= 10; i++ {
				v[i-1], _ = strconv.ParseInt(f[i], 10, 64)
			}
			s.cpu[f[0]] = v
		}
	}
	if proxyPID != 0 {
		if st, err := readProcStat(proxyPID); err == nil {
			s.proxy, s.proxyUser = st.cpu, st.user
		}
	}
	// Foreign: user processes that do not descend from this one.
	self := os.Getpid()
	ents, _ := os.ReadDir("/proc")
	parent := map[int]int{}
	cpu := map[int]time.Duration{}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		st, err := readProcStat(pid)
		if err != nil || st.kthread {
			continue
		}
		parent[pid], cpu[pid] = st.ppid, st.cpu
	}
	for pid, c := range cpu {
		ours := false
		for p, n := pid, 0; p > 1 && n < 64; p, n = parent[p], n+1 {
			if p == self {
				ours = true
				break
			}
		}
		if !ours {
			s.foreign[pid] = c
		}
	}
	return s
}

// into fills r's CPU fields with what happened between before and s.
func (s l7CPUSample) into(r *l7Result, before l7CPUSample) {
	r.Wall = s.at.Sub(before.at)
	r.ProxyCPU = s.proxy - before.proxy
	r.ProxyUser = s.proxyUser - before.proxyUser
	for i, name := range []string{fmt.Sprintf("cpu%d", l7LoadCPU), fmt.Sprintf("cpu%d", l7ProxyCPU)} {
		a, b := s.cpu[name], before.cpu[name]
		var d [10]int64
		var total int64
		for k := range d {
			d[k] = a[k] - b[k]
		}
		// user nice system idle iowait irq softirq steal (guest is in user)
		total = d[0] + d[1] + d[2] + d[3] + d[4] + d[5] + d[6] + d[7]
		if total > 0 {
			r.CPUBusy[i] = float64(d[0]+d[1]+d[2]+d[5]+d[6]) / float64(total)
		}
	}
	a, b := s.cpu["cpu"], before.cpu["cpu"]
	var total int64
	for k := range 8 {
		total += a[k] - b[k]
	}
	if total > 0 {
		r.Steal = float64(a[7]-b[7]) / float64(total)
	}
	for pid, c := range s.foreign {
		r.Foreign += max(0, c-before.foreign[pid]) // new since before: counted whole
	}
}

// l7MachineBusy is the share of all CPUs busy over d.
func l7MachineBusy(ctx context.Context, d time.Duration) (float64, error) {
	read := func() (busy, total int64) {
		b, err := os.ReadFile("/proc/stat")
		if err != nil {
			return 0, 0
		}
		line, _, _ := strings.Cut(string(b), "\n")
		f := strings.Fields(line)
		for i := 1; i < len(f) && i <= 8; i++ {
			v, _ := strconv.ParseInt(f[i], 10, 64)
			total += v
			if i != 4 && i != 5 { // idle, iowait
				busy += v
			}
		}
		return busy, total
	}
	b0, t0 := read()
	select {
	case <-ctx.Done():
		return 0, ctx.Err()
	case <-time.After(d):
	}
	b1, t1 := read()
	if t1 <= t0 {
		return 0, nil
	}
	return float64(b1-b0) / float64(t1-t0), nil
}

// l7Quiet waits until the machine is quiet, within max; it reports how long
// it waited and whether the machine was quiet in the end.
func l7Quiet(ctx context.Context, maxWait time.Duration) (time.Duration, bool, error) {
	start := time.Now()
	for {
		busy, err := l7MachineBusy(ctx, time.Second)
		if err != nil {
			return time.Since(start), false, err
		}
		if busy < l7QuietBusy {
			return time.Since(start), true, nil
		}
		if time.Since(start) >= maxWait {
			return time.Since(start), false, nil
		}
	}
}

// ---- BenchmarkL7 ----

// BenchmarkL7 measures HAProxy, nginx and VeloFlux's L7 proxy in
// interleaved rounds, plain HTTP and TLS, and reports the medians. The
// measurements happen once, in the parent; the sub-benchmarks only report
// them (run it with -benchtime 1x).
func BenchmarkL7(b *testing.B) {
	l7Require(b, "wrk", "haproxy", "nginx", "taskset")
	ctx, stopSignals := signal.NotifyContext(b.Context(), os.Interrupt, syscall.SIGTERM)
	defer stopSignals()
	began := time.Now()

	e := newL7Env(b)
	var err error
	e.agentBin = agenttest.BuildAgent(b, agentEnv)
	e.pinPath = agenttest.MountBPFFS(b, e.dir)
	if len(l7Proxies) > 3 {
		if err := e.buildRef(); err != nil {
			b.Fatal(err)
		}
	}
	if err := e.startBackends(ctx); err != nil {
		b.Fatal(err)
	}
	procs := map[string]*process{}
	for _, name := range l7Proxies {
		start := map[string]func() (*process, error){
			"haproxy": e.startHAProxy, "nginx": e.startNginx, "veloflux": e.startVeloFlux, "veloflux-b": e.startVeloFluxB,
		}[name]
		if start == nil {
			start = func() (*process, error) { return e.startRef(name) }
		}
		if procs[name], err = start(); err != nil {
			b.Fatal(err)
		}
	}
	tlsInfo := map[string]string{}
	for _, name := range l7Proxies {
		for _, mode := range l7Modes {
			if err := l7WaitReady(ctx, e.url(name, mode), e.certPool, procs[name], l7Want(name)); err != nil {
				b.Fatalf("%s, %s: %v", name, mode, err)
			}
		}
		tlsInfo[name] = l7TLSInfo(ctx, e.ports[name][1])
	}
	b.Logf("setup: %s, %d CPUs; proxies pinned to CPU %d, wrk and backends to CPU %d; %s; TLS: haproxy %s, nginx %s, veloflux %s",
		kernelRelease(), runtime.NumCPU(), l7ProxyCPU, l7LoadCPU, strings.Join(l7WrkArgs("URL", l7WrkDuration), " "),
		tlsInfo["haproxy"], tlsInfo["nginx"], tlsInfo["veloflux"])

	// Warm-up: connections to the backends, Go's heap, caches.
	for _, name := range l7Proxies {
		for _, mode := range l7Modes {
			if _, out, err := l7RunWrk(ctx, e.url(name, mode), l7WarmUp, 0); err != nil {
				b.Fatalf("warm-up %s %s: %v\n%s", name, mode, err, out)
			}
		}
	}

	results := map[string]map[string][]l7Result{}
	quietLeft := l7QuietBudget
	retriesLeft := l7MaxRetries
	measure := func(name, mode, url string, d time.Duration, pid int) l7Result {
		for attempt := 0; ; attempt++ {
			waited, quiet, err := l7Quiet(ctx, min(l7QuietWait, quietLeft))
			if err != nil {
				b.Fatal(err)
			}
			quietLeft = max(0, quietLeft-waited)
			backendSleeps := l7Sleeps(e.backendsP.cmd.Process.Pid)
			res, out, err := l7RunWrk(ctx, url, d, pid)
			if err != nil {
				b.Fatalf("%s %s: %v\n%s", name, mode, err, out)
			}
			res.BackendSleeps = l7Sleeps(e.backendsP.cmd.Process.Pid) - backendSleeps
			res.QuietWait, res.Quiet, res.Retried = waited, quiet, attempt > 0
			disturbed := res.Foreign.Seconds() > l7ForeignLimit*res.Wall.Seconds()
			if res.Errors > 0 && !disturbed && res.Quiet {
				// Requests slower than wrk's timeout, or failed, on a
				// machine to ourselves: the proxy's doing. (On a busy
				// machine, short-lived processes such as compilers
				// escape the foreign count; such errors are kept and
				// shown in the table.)
				b.Fatalf("%s %s: %d errors in %d requests\n%s", name, mode, res.Errors, res.Requests, out)
			}
			b.Logf("%-8s %-5s %8.0f req/s %8.0f per core  p50 %-9v p99 %-9v  proxy CPU %5.1f µs/req  %4.1f syscalls/req  sleeps %.3f wrk, %.3f backends /req  CPU%d %3.0f%% CPU%d %3.0f%%  foreign %4.1f%% of a CPU, steal %2.0f%%, load %.2f-%.2f%s%s",
				name, mode, res.ReqPerSec, l7PerCore(res), res.P50, res.P99, l7PerReq(res.ProxyCPU, res.Requests), l7SyscallsPerReq(res),
				l7PerReqOf(res.ClientSleeps, res), l7PerReqOf(res.BackendSleeps, res), l7LoadCPU, 100*res.CPUBusy[0], l7ProxyCPU, 100*res.CPUBusy[1],
				100*res.Foreign.Seconds()/res.Wall.Seconds(), 100*res.Steal, res.Load[0], res.Load[1], map[bool]string{true: "  DISTURBED", false: ""}[disturbed],
				map[bool]string{true: fmt.Sprintf("  %d ERRORS", res.Errors), false: ""}[res.Errors > 0])
			if line := l7EventsLine(res); line != "" {
				b.Logf("%-8s %-5s per request: %s", name, mode, line)
			}
			if !disturbed || retriesLeft == 0 {
				return res
			}
			retriesLeft--
		}
	}
	direct := measure("direct", "plain", fmt.Sprintf("http://127.0.0.1:%d%s", e.backends[0], l7Path), l7DirectRun, 0)
	results["direct"] = map[string][]l7Result{"plain": {direct}}
	for r := range l7Rounds {
		modes := slices.Clone(l7Modes)
		if r%2 == 1 {
			slices.Reverse(modes)
		}
		for _, mode := range modes {
			for _, name := range l7Proxies {
				if procs[name].exited() {
					b.Fatalf("%s exited: %v\n%s", name, procs[name].err, logTail(procs[name].logPath, 20))
				}
				if results[name] == nil {
					results[name] = map[string][]l7Result{}
				}
				res := measure(name, mode, e.url(name, mode), l7WrkDuration, procs[name].pid())
				results[name][mode] = append(results[name][mode], res)
			}
		}
	}
	b.Logf("measured in %s", time.Since(began).Round(time.Second))

	sum := l7Summarize(results)
	b.Log("\n" + sum.table(tlsInfo))
	for _, name := range l7Proxies {
		for _, mode := range l7Modes {
			b.Run("proxy="+name+"/mode="+mode, func(b *testing.B) {
				s := sum.by[name][mode]
				h := sum.by["haproxy"][mode]
				b.ReportMetric(0, "ns/op")
				b.ReportMetric(s.rps, "req/s")
				b.ReportMetric(s.perCore, "req/s-per-core")
				if h.perCore > 0 {
					b.ReportMetric(s.perCore/h.perCore, "per-core-x-haproxy")
				}
				b.ReportMetric(ms(s.p50), "p50-ms")
				b.ReportMetric(ms(s.p99), "p99-ms")
				b.ReportMetric(s.proxyCPU, "proxy-cpu-us/req")
				b.ReportMetric(s.syscalls, "proxy-syscalls/req")
				b.ReportMetric(s.clientSleeps, "wrk-sleeps/req")
				b.ReportMetric(s.backendSleeps, "backend-sleeps/req")
				b.ReportMetric(s.rps/h.rps, "req/s-x-haproxy")
				b.ReportMetric(float64(s.p99)/float64(h.p99), "p99-x-haproxy")
			})
		}
	}
}

// l7EventsLine is run r's events per request, by name.
func l7EventsLine(r l7Result) string {
	var parts []string
	if r.ProxyCPU > 0 {
		parts = append(parts, fmt.Sprintf("user %.1f µs, system %.1f µs", l7PerReq(r.ProxyUser, r.Requests), l7PerReq(r.ProxyCPU-r.ProxyUser, r.Requests)))
	}
	for _, k := range slices.Sorted(maps.Keys(r.Events)) {
		parts = append(parts, fmt.Sprintf("%s %.3f", k, l7PerReqOf(r.Events[k], r)))
	}
	return strings.Join(parts, ", ")
}

func l7SyscallsPerReq(r l7Result) float64 { return l7PerReqOf(r.Syscalls, r) }

// l7PerReqOf is n per request of run r.
func l7PerReqOf(n int64, r l7Result) float64 {
	if r.Requests == 0 {
		return 0
	}
	return float64(n) / float64(r.Requests)
}

// l7Sleeps is how many times process pid has gone to sleep (its voluntary
// context switches, all threads), 0 when it cannot be read.
func l7Sleeps(pid int) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "voluntary_ctxt_switches:"); ok {
			n, _ := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			return n
		}
	}
	return 0
}

func l7PerReq(d time.Duration, n int64) float64 {
	if n == 0 {
		return 0
	}
	return float64(d.Nanoseconds()) / 1e3 / float64(n)
}

// ---- summary ----

type l7Summary struct {
	rps, rpsMin, rpsMax float64
	// Requests per second of the proxy's CPU time (l7PerCore).
	perCore, perCoreMin, perCoreMax float64
	// Ratios to HAProxy's run of the same round and mode: per core and
	// p99, median and range (only for proxies other than HAProxy).
	perCoreX, perCoreXMin, perCoreXMax float64
	p99X, p99XMin, p99XMax             float64
	load                               [2]float64 // the lowest and highest 1-minute load average seen
	p50, p99                           time.Duration
	p99Min, p99Max                     time.Duration
	proxyCPU                           float64 // µs per request, the proxy's process
	syscalls                           float64 // system calls per request, the proxy's process
	clientSleeps                       float64 // wrk's sleeps per request
	backendSleeps                      float64 // the backends' nginx worker's sleeps per request
	busy                               [2]float64
	foreignMax                         float64 // share of one CPU, worst run
	retried, loud                      int     // runs repeated; runs started on a busy machine
	errors                             int64   // wrk's socket errors and non-2xx answers, all runs
	runs                               []l7Result
}

type l7Sum struct {
	by map[string]map[string]l7Summary
}

func l7Summarize(results map[string]map[string][]l7Result) l7Sum {
	s := l7Sum{by: map[string]map[string]l7Summary{}}
	for name, modes := range results {
		s.by[name] = map[string]l7Summary{}
		for mode, rs := range modes {
			var rps, perCore, cpu, sys, sleeps, beSleeps, busy0, busy1 []float64
			var p50, p99 []time.Duration
			var m l7Summary
			for _, r := range rs {
				rps = append(rps, r.ReqPerSec)
				perCore = append(perCore, l7PerCore(r))
				for _, l := range r.Load {
					if m.load[1] == 0 || l < m.load[0] {
						m.load[0] = l
					}
					m.load[1] = max(m.load[1], l)
				}
				p50, p99 = append(p50, r.P50), append(p99, r.P99)
				cpu = append(cpu, l7PerReq(r.ProxyCPU, r.Requests))
				sys = append(sys, l7SyscallsPerReq(r))
				sleeps = append(sleeps, l7PerReqOf(r.ClientSleeps, r))
				beSleeps = append(beSleeps, l7PerReqOf(r.BackendSleeps, r))
				busy0, busy1 = append(busy0, r.CPUBusy[0]), append(busy1, r.CPUBusy[1])
				m.foreignMax = max(m.foreignMax, r.Foreign.Seconds()/r.Wall.Seconds())
				m.errors += r.Errors
				if r.Retried {
					m.retried++
				}
				if !r.Quiet {
					m.loud++
				}
			}
			m.rps, m.rpsMin, m.rpsMax = median(rps), slices.Min(rps), slices.Max(rps)
			m.perCore, m.perCoreMin, m.perCoreMax = median(perCore), slices.Min(perCore), slices.Max(perCore)
			if h := results["haproxy"][mode]; name != "haproxy" && len(h) > 0 {
				var pcx, p99x []float64
				for i := range min(len(rs), len(h)) {
					if hp := l7PerCore(h[i]); hp > 0 {
						pcx = append(pcx, l7PerCore(rs[i])/hp)
					}
					if h[i].P99 > 0 {
						p99x = append(p99x, float64(rs[i].P99)/float64(h[i].P99))
					}
				}
				if len(pcx) > 0 {
					m.perCoreX, m.perCoreXMin, m.perCoreXMax = median(pcx), slices.Min(pcx), slices.Max(pcx)
				}
				if len(p99x) > 0 {
					m.p99X, m.p99XMin, m.p99XMax = median(p99x), slices.Min(p99x), slices.Max(p99x)
				}
			}
			m.p50, m.p99, m.p99Min, m.p99Max = median(p50), median(p99), slices.Min(p99), slices.Max(p99)
			m.proxyCPU = median(cpu)
			m.syscalls = median(sys)
			m.clientSleeps = median(sleeps)
			m.backendSleeps = median(beSleeps)
			m.busy = [2]float64{median(busy0), median(busy1)}
			m.runs = rs
			s.by[name][mode] = m
		}
	}
	return s
}

func (s l7Sum) table(tlsInfo map[string]string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "L7 keep-alive, %s; median of %d rounds (min-max)\n", strings.Join(l7WrkArgs("URL", l7WrkDuration), " "), l7Rounds)
	fmt.Fprintf(&b, "per core: requests per second of the proxy's own CPU time (requests / its utime+stime); x HAP: median (min-max) of the\n"+
		"same-round ratios to HAProxy; sleeps/r: times wrk / the backends went to sleep per request (each a wake-up the proxy's\n"+
		"next write pays for); load: 1-minute load average (min-max) over the runs\n")
	fmt.Fprintf(&b, "%-9s %-5s | %-24s | %-24s | %-19s | %-8s | %-19s | %-19s | %-9s | %-6s | %-9s | %-9s | %-9s\n",
		"proxy", "mode", "req/s", "per core", "x HAP", "p50 ms", "p99 ms", "x HAP", "CPU µs/r", "sys/r", "sleeps/r", "CPU0/CPU1", "load")
	goals := []string{}
	for _, mode := range l7Modes {
		h := s.by["haproxy"][mode]
		for _, name := range l7Proxies {
			m := s.by[name][mode]
			pcx, p99x := [3]float64{1, 1, 1}, [3]float64{1, 1, 1}
			if name != "haproxy" {
				pcx, p99x = [3]float64{m.perCoreX, m.perCoreXMin, m.perCoreXMax}, [3]float64{m.p99X, m.p99XMin, m.p99XMax}
			}
			fmt.Fprintf(&b, "%-9s %-5s | %7.0f (%7.0f-%7.0f) | %7.0f (%7.0f-%7.0f) | x%4.2f (%4.2f-%4.2f) | %8.2f | %5.2f (%5.2f-%5.2f) | x%4.2f (%4.2f-%4.2f) | %9.1f | %6.1f | %4.2f/%4.2f | %3.0f%%/%3.0f%% | %4.2f-%4.2f\n",
				name, mode, m.rps, m.rpsMin, m.rpsMax, m.perCore, m.perCoreMin, m.perCoreMax, pcx[0], pcx[1], pcx[2],
				ms(m.p50), ms(m.p99), ms(m.p99Min), ms(m.p99Max), p99x[0], p99x[1], p99x[2],
				m.proxyCPU, m.syscalls, m.clientSleeps, m.backendSleeps, 100*m.busy[0], 100*m.busy[1], m.load[0], m.load[1])
		}
		v := s.by["veloflux"][mode]
		rr, pr := v.perCoreX, v.p99X
		verdict := func(ok bool) string {
			if ok {
				return "holds"
			}
			return "does NOT hold"
		}
		goals = append(goals, fmt.Sprintf("%s: req/s per core x%.2f of HAProxy (goal >= x0.8: %s), p99 x%.2f (goal <= x1.5: %s); medians of same-round ratios",
			mode, rr, verdict(rr >= 0.8), pr, verdict(pr <= 1.5)))
		var per []string
		for i := range min(len(v.runs), len(h.runs)) {
			per = append(per, fmt.Sprintf("x%.2f/x%.2f/x%.2f", v.runs[i].ReqPerSec/h.runs[i].ReqPerSec,
				l7PerCore(v.runs[i])/l7PerCore(h.runs[i]), float64(v.runs[i].P99)/float64(h.runs[i].P99)))
		}
		goals = append(goals, fmt.Sprintf("  per round, VeloFlux/HAProxy req/s / per core / p99 (%s): %s", mode, strings.Join(per, " ")))
		if vb, ok := s.by["veloflux-b"][mode]; ok {
			goals = append(goals, l7CompareBuilds(mode, v.runs, vb.runs))
		}
		if g, ok := s.by["go-rp"][mode]; ok && g.rps > 0 && g.proxyCPU > 0 {
			goals = append(goals, fmt.Sprintf("  VeloFlux vs a bare httputil.ReverseProxy (go-rp), %s: req/s x%.2f, CPU per request x%.2f",
				mode, v.rps/g.rps, v.proxyCPU/g.proxyCPU))
		}
	}
	if d, ok := s.by["direct"]["plain"]; ok {
		fmt.Fprintf(&b, "%-9s %-5s | %7.0f %16s | %24s | %19s | %8.2f | %5.2f %13s | %19s | %9s | %6s | %3.0f%%/%3.0f%% | %4.2f-%4.2f  (one %s run, no proxy)\n",
			"direct", "plain", d.rps, "", "", "", ms(d.p50), ms(d.p99), "", "", "", "", 100*d.busy[0], 100*d.busy[1], d.load[0], d.load[1], l7DirectRun)
	}
	for _, g := range goals {
		b.WriteString(g + "\n")
	}
	fmt.Fprintf(&b, "TLS negotiated with an OpenSSL client: haproxy %s; nginx %s; veloflux %s\n",
		tlsInfo["haproxy"], tlsInfo["nginx"], tlsInfo["veloflux"])
	var foreign float64
	var retried, loud int
	var errs []string
	for _, name := range append([]string{"direct"}, l7Proxies...) {
		for _, mode := range l7Modes {
			m, ok := s.by[name][mode]
			if !ok {
				continue
			}
			foreign = max(foreign, m.foreignMax)
			retried += m.retried
			loud += m.loud
			if m.errors > 0 {
				errs = append(errs, fmt.Sprintf("%s %s %d", name, mode, m.errors))
			}
		}
	}
	if len(errs) > 0 {
		fmt.Fprintf(&b, "errors (socket errors and non-2xx answers, runs on a busy machine): %s\n", strings.Join(errs, ", "))
	}
	fmt.Fprintf(&b, "other processes: at most %.0f%% of a CPU during a kept run; %d runs repeated for being disturbed; %d runs started on a busy machine\n",
		100*foreign, retried, loud)
	return b.String()
}

// ---- BenchmarkProfileL7 ----

// BenchmarkProfileL7 runs the agent in this process, with the same
// configuration as BenchmarkL7 and the same backends and load, so that
// -cpuprofile (or $VF_L7_PROFILE_DIR, one profile per sub-benchmark) shows
// where its time goes. The process is pinned to l7ProxyCPU with GOMAXPROCS
// 1, like the agent binary in BenchmarkL7. plain-accesslog turns the JSON
// access log on (log level info, one write(2) per record to a file, as the
// agent binary writes it to stderr); plain-accesslog-buffered writes the
// same records through a 64 KiB buffer flushed every 100 ms.
func BenchmarkProfileL7(b *testing.B) {
	l7Require(b, "wrk", "nginx", "taskset")
	ctx, stopSignals := signal.NotifyContext(b.Context(), os.Interrupt, syscall.SIGTERM)
	defer stopSignals()
	e := newL7Env(b)
	e.pinPath = agenttest.MountBPFFS(b, e.dir)
	if err := e.startBackends(ctx); err != nil {
		b.Fatal(err)
	}
	cfg, err := e.writeAgentConfig("veloflux")
	if err != nil {
		b.Fatal(err)
	}

	// This process on l7ProxyCPU, one P: every thread now, and the
	// threads to come inherit the mask.
	restore, err := l7PinSelf(l7ProxyCPU)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(restore)
	prevProcs := runtime.GOMAXPROCS(1)
	b.Cleanup(func() { runtime.GOMAXPROCS(prevProcs) })

	logf, err := os.Create(filepath.Join(e.dir, "agent.log"))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { logf.Close() })
	logw := &l7LogWriter{f: logf, bw: bufio.NewWriterSize(logf, 64<<10)}
	var level slog.LevelVar
	level.Set(slog.LevelWarn)
	a, err := agent.New(agent.Options{ConfigPath: cfg, PinPath: e.pinPath, StateDir: filepath.Join(e.dir, "state"),
		Version: "bench", Logger: slog.New(slog.NewJSONHandler(logw, &slog.HandlerOptions{Level: &level}))})
	if err != nil {
		b.Fatal(err)
	}
	runCtx, stopAgent := context.WithCancel(context.Background())
	runErr := make(chan error, 1)
	go func() { runErr <- a.Run(runCtx) }()
	b.Cleanup(func() {
		stopAgent()
		select {
		case err := <-runErr:
			if err != nil {
				b.Errorf("agent: %v", err)
			}
		case <-time.After(30 * time.Second):
			b.Errorf("the in-process agent did not stop within 30s")
		}
	})
	// A fake process for l7WaitReady: the agent is not a child.
	self := &process{name: "in-process agent", done: make(chan struct{}), logPath: logf.Name()}
	for _, mode := range l7Modes {
		if err := l7WaitReady(ctx, e.url("veloflux", mode), e.certPool, self, l7AllBackends); err != nil {
			select {
			case err2 := <-runErr:
				err = errors.Join(err, fmt.Errorf("agent: %v", err2))
				runErr <- err2
			default:
			}
			b.Fatal(err)
		}
		if _, out, err := l7RunWrk(ctx, e.url("veloflux", mode), l7WarmUp, 0); err != nil {
			b.Fatalf("warm-up %s: %v\n%s", mode, err, out)
		}
	}
	profDir := os.Getenv("VF_L7_PROFILE_DIR")
	for _, m := range []struct {
		name                string
		mode                string
		accessLog, buffered bool
	}{
		{"plain", "plain", false, false},
		{"tls", "tls", false, false},
		{"plain-accesslog", "plain", true, false},
		{"plain-accesslog-buffered", "plain", true, true},
	} {
		b.Run("mode="+m.name, func(b *testing.B) {
			if m.accessLog {
				level.Set(slog.LevelInfo)
				defer level.Set(slog.LevelWarn)
			}
			if m.buffered {
				stop := logw.buffer(100 * time.Millisecond)
				defer stop()
			}
			if profDir != "" {
				f, err := os.Create(filepath.Join(profDir, "l7-"+m.name+".cpu"))
				if err != nil {
					b.Fatal(err)
				}
				defer f.Close()
				if err := pprof.StartCPUProfile(f); err != nil {
					b.Fatal(err)
				}
				defer pprof.StopCPUProfile()
			}
			if _, quiet, err := l7Quiet(ctx, l7QuietWait); err != nil {
				b.Fatal(err)
			} else if !quiet {
				b.Logf("the machine is busy (other processes); measuring anyway")
			}
			var ru0, ru1 unix.Rusage
			unix.Getrusage(unix.RUSAGE_SELF, &ru0)
			res, out, err := l7RunWrk(ctx, e.url("veloflux", m.mode), l7WrkDuration, 0)
			unix.Getrusage(unix.RUSAGE_SELF, &ru1)
			if err == nil && res.Errors > 0 {
				err = fmt.Errorf("%d errors in %d requests", res.Errors, res.Requests)
			}
			if err != nil {
				b.Fatalf("%v\n%s", err, out)
			}
			cpu := time.Duration(ru1.Utime.Nano()+ru1.Stime.Nano()-ru0.Utime.Nano()-ru0.Stime.Nano()) * time.Nanosecond
			b.Logf("%s: %.0f req/s, p50 %v, p99 %v, this process %.1f µs CPU per request, CPU%d %.0f%% CPU%d %.0f%%, foreign %.1f%% of a CPU",
				m.name, res.ReqPerSec, res.P50, res.P99, l7PerReq(cpu, res.Requests), l7LoadCPU, 100*res.CPUBusy[0],
				l7ProxyCPU, 100*res.CPUBusy[1], 100*res.Foreign.Seconds()/res.Wall.Seconds())
			b.ReportMetric(0, "ns/op")
			b.ReportMetric(res.ReqPerSec, "req/s")
			b.ReportMetric(ms(res.P50), "p50-ms")
			b.ReportMetric(ms(res.P99), "p99-ms")
			b.ReportMetric(l7PerReq(cpu, res.Requests), "cpu-us/req")
		})
	}
}

// l7LogWriter is the in-process agent's log destination: the file itself,
// one write(2) per record as the agent binary writes to stderr, or, while
// buffer is on, a 64 KiB buffer flushed when full and every period (a
// model of a buffered access log).
type l7LogWriter struct {
	mu       sync.Mutex
	f        *os.File
	bw       *bufio.Writer
	buffered bool
}

func (w *l7LogWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.buffered {
		return w.bw.Write(p)
	}
	return w.f.Write(p)
}

// buffer turns buffering on until the returned function is called.
func (w *l7LogWriter) buffer(period time.Duration) func() {
	w.mu.Lock()
	w.buffered = true
	w.mu.Unlock()
	done, stopped := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(stopped)
		t := time.NewTicker(period)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				w.mu.Lock()
				w.bw.Flush()
				w.mu.Unlock()
			}
		}
	}()
	return func() {
		close(done)
		<-stopped
		w.mu.Lock()
		w.bw.Flush()
		w.buffered = false
		w.mu.Unlock()
	}
}

// l7PinSelf sets the CPU affinity of every thread of this process to cpu
// and returns a function that restores each thread's previous mask (threads
// created meanwhile get the full mask of the first thread).
func l7PinSelf(cpu int) (func(), error) {
	var orig unix.CPUSet
	if err := unix.SchedGetaffinity(0, &orig); err != nil {
		return nil, err
	}
	var set unix.CPUSet
	set.Set(cpu)
	apply := func(s *unix.CPUSet) error {
		ents, err := os.ReadDir("/proc/self/task")
		if err != nil {
			return err
		}
		var errs []error
		for _, e := range ents {
			tid, err := strconv.Atoi(e.Name())
			if err != nil {
				continue
			}
			if err := unix.SchedSetaffinity(tid, s); err != nil && !errors.Is(err, unix.ESRCH) {
				errs = append(errs, fmt.Errorf("thread %d: %w", tid, err))
			}
		}
		return errors.Join(errs...)
	}
	if err := apply(&set); err != nil {
		apply(&orig)
		return nil, err
	}
	return func() { apply(&orig) }, nil
}

// TestL7ParseWrk checks the wrk parser on wrk 4.1's report; no root needed.
func TestL7ParseWrk(t *testing.T) {
	r, err := l7ParseWrk(wrkReport)
	if err != nil {
		t.Fatal(err)
	}
	if r.Requests != 68712 || r.ReqPerSec != 13739.52 || r.P50 != 2170*time.Microsecond || r.P99 != 512*time.Microsecond || r.Errors != 6 {
		t.Errorf("l7ParseWrk = %+v", r)
	}
	if _, err := l7ParseWrk("unable to connect to 127.0.0.1:1 Connection refused\n"); err == nil {
		t.Error("l7ParseWrk accepted a failed run")
	}
}
