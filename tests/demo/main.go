// Command demo runs VeloFlux on the namespace lab for `make demo`: it builds
// the lab with the balancer's end in this host's namespace, starts the agent
// with a copy of deploy/demo.yaml in a temporary directory (API writes change
// the copy, never the repository's file), drives light and bounded client
// traffic through the VIP, and prints what to look at. It runs until
// SIGINT/SIGTERM, or for DEMO_SECONDS when that is set, and then removes
// everything it created.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/veloflux/veloflux/agent/config"
	"github.com/veloflux/veloflux/tests/lab"
)

// The lab's fixed identity, matching deploy/demo.yaml.
const (
	labPrefix = "vfdemo"
	labSubnet = 66
	vipAddr   = "10.67.0.100"
	pinPath   = "/sys/fs/bpf/veloflux-demo"
)

func main() {
	agentBin := flag.String("agent", "bin/veloflux", "the veloflux binary")
	vfctlBin := flag.String("vfctl", "bin/vfctl", "the vfctl binary (for the hints)")
	cfgPath := flag.String("config", "deploy/demo.yaml", "agent configuration")
	flag.Parse()
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	if err := run(log, *agentBin, *vfctlBin, *cfgPath); err != nil {
		log.Error("demo failed", "err", err)
		os.Exit(1)
	}
}

func run(log *slog.Logger, agentBin, vfctlBin, cfgPath string) error {
	if os.Geteuid() != 0 {
		return errors.New("the demo builds network namespaces and loads XDP: run it as root (sudo make demo)")
	}
	ctx, stop, err := lab.DemoContext()
	if err != nil {
		return err
	}
	defer stop()

	cfg, err := config.Load(cfgPath)
	if err != nil {
		return err
	}
	// The agent creates its API token file when it is missing; one the
	// demo made goes with it, one that was there before stays.
	if _, err := os.Stat(cfg.API.TokenFile); errors.Is(err, os.ErrNotExist) {
		defer removeCreated(log, cfg.API.TokenFile)
	}

	// A demo killed earlier may have left its lab and pins behind.
	if err := lab.Purge(labPrefix); err != nil {
		log.Warn("purge leftovers of an earlier demo", "err", err)
	}
	detach(agentBin)

	vip := netip.MustParseAddr(vipAddr)
	l, err := lab.New(ctx, lab.Options{Prefix: labPrefix, Subnet: labSubnet, Backends: 3,
		VIPs: []netip.Addr{vip}, BalancerInRoot: true, Logger: log})
	if err != nil {
		return err
	}
	defer func() {
		if err := l.Close(); err != nil {
			log.Error("remove the lab", "err", err)
		}
	}()
	if err := l.StartBackendServers(ctx); err != nil {
		return err
	}

	// The agent saves API changes into its configuration file (and a .bak
	// beside it): it gets a copy, so the repository's file stays as it is.
	rd, err := prepareRunDir(cfgPath)
	if err != nil {
		return err
	}
	defer func() {
		if err := rd.remove(); err != nil {
			log.Warn("remove the demo's run directory", "dir", rd.root, "err", err)
		}
	}()
	agent := exec.Command(agentBin, "--config", rd.config, "--pin-path", pinPath,
		"--state-dir", rd.state, "--log-format", "text")
	agent.Stdout, agent.Stderr = os.Stderr, os.Stderr
	if err := agent.Start(); err != nil {
		return fmt.Errorf("start the agent %s: %w", agentBin, err)
	}
	agentDone := make(chan error, 1)
	go func() { agentDone <- agent.Wait() }()
	defer func() {
		agent.Process.Signal(syscall.SIGTERM)
		select {
		case <-agentDone:
		case <-time.After(10 * time.Second):
			agent.Process.Kill()
			<-agentDone
		}
		detach(agentBin) // the agent leaves its pins on SIGTERM by design
	}()

	printHints(vfctlBin, l, cfg.API.TokenFile)
	traffic := &trafficStats{perBackend: map[string]int{}}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); drive(ctx, l.Client, vip, traffic) }()

	report := time.NewTicker(5 * time.Second)
	defer report.Stop()
	for {
		select {
		case <-ctx.Done():
			wg.Wait()
			log.Info("demo over", "requests", traffic.snapshot())
			return nil
		case err := <-agentDone:
			agentDone <- err // for the deferred stop
			return fmt.Errorf("the agent exited: %v", err)
		case <-report.C:
			log.Info("client traffic through the VIP", "vip", vipAddr, "answers", traffic.snapshot())
		}
	}
}

// runDir is the demo agent's own directory: a copy of the configuration,
// which API writes may change, and the state directory.
type runDir struct {
	root, config, state string
}

// prepareRunDir makes a fresh temporary directory holding a copy of the
// configuration at cfgPath (mode 0600, as the agent would create it) and an
// empty state directory.
func prepareRunDir(cfgPath string) (rd *runDir, err error) {
	data, err := os.ReadFile(cfgPath)
	if err != nil {
		return nil, fmt.Errorf("read the demo configuration: %w", err)
	}
	root, err := os.MkdirTemp("", "veloflux-demo-")
	if err != nil {
		return nil, fmt.Errorf("create the demo's run directory: %w", err)
	}
	rd = &runDir{root: root, config: filepath.Join(root, filepath.Base(cfgPath)), state: filepath.Join(root, "state")}
	defer func() {
		if err != nil {
			_ = rd.remove()
		}
	}()
	if err := os.WriteFile(rd.config, data, 0o600); err != nil {
		return nil, fmt.Errorf("copy the demo configuration: %w", err)
	}
	if err := os.Mkdir(rd.state, 0o700); err != nil {
		return nil, fmt.Errorf("create the demo's state directory: %w", err)
	}
	return rd, nil
}

func (rd *runDir) remove() error { return os.RemoveAll(rd.root) }

func detach(agentBin string) {
	exec.Command(agentBin, "detach", "--pin-path", pinPath).Run()
}

type trafficStats struct {
	mu         sync.Mutex
	perBackend map[string]int
	failures   int
}

func (s *trafficStats) add(backend string, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err != nil {
		s.failures++
		return
	}
	s.perBackend[backend]++
}

func (s *trafficStats) snapshot() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var b strings.Builder
	for _, name := range []string{"backend-0", "backend-1", "backend-2"} {
		fmt.Fprintf(&b, "%s=%d ", name, s.perBackend[name])
	}
	fmt.Fprintf(&b, "failed=%d", s.failures)
	return b.String()
}

// drive sends five HTTP requests a second, each on a new connection so that
// every one is a new flow for the balancer, from the client namespace.
func drive(ctx context.Context, client *lab.Host, vip netip.Addr, stats *trafficStats) {
	httpClient := &http.Client{
		Timeout: 2 * time.Second,
		Transport: &http.Transport{
			DisableKeepAlives: true,
			DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
				return client.DialContext(ctx, network, addr)
			},
		},
	}
	url := "http://" + vip.String() + "/"
	// The backends are down until their health checks rise; until the VIP
	// first answers, failures say nothing about the balancer.
	for ready := false; !ready; {
		select {
		case <-ctx.Done():
			return
		case <-time.After(200 * time.Millisecond):
		}
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if resp, err := httpClient.Do(req); err == nil {
			resp.Body.Close()
			ready = true
		}
	}
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		resp, err := httpClient.Do(req)
		if err != nil {
			if ctx.Err() == nil {
				stats.add("", err)
			}
			continue
		}
		body, err := io.ReadAll(io.LimitReader(resp.Body, 256))
		resp.Body.Close()
		stats.add(strings.TrimSpace(string(body)), err)
	}
}

// removeCreated removes a file the demo's agent created, and its directory
// when that is left empty.
func removeCreated(log *slog.Logger, path string) {
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		log.Warn("remove the demo's API token", "file", path, "err", err)
	}
	os.Remove(filepath.Dir(path)) // fails, as it should, unless empty
}

func printHints(vfctlBin string, l *lab.Lab, tokenFile string) {
	fmt.Fprintf(os.Stderr, `
VeloFlux demo is running. The XDP balancer is attached to %s; the client sends 5 requests/s to %s.
Look at it from another terminal:

  sudo %s --pin-path %s status
  sudo %s --pin-path %s vips
  sudo %s --pin-path %s reals
  sudo %s --pin-path %s flows -n 10
  sudo %s --pin-path %s counters
  sudo bpftool net show dev %s
  sudo bpftool map dump pinned %s/vf_vips
  sudo ip netns exec %s curl -s http://%s/
  curl -s http://localhost/             # the L7 proxy on :80, round robin over the same backends

Dashboard: http://localhost:9090/dashboard   API token (for actions): %s
Prometheus: http://localhost:8080/metrics    OpenAPI: http://localhost:9090/api/openapi.json

Stop with Ctrl-C (or set DEMO_SECONDS); everything the demo created is removed.

`, l.Balancer.IfName, vipAddr,
		vfctlBin, pinPath, vfctlBin, pinPath, vfctlBin, pinPath, vfctlBin, pinPath, vfctlBin, pinPath,
		l.Balancer.IfName, pinPath, l.Client.NetNS, vipAddr, tokenFile)
}
