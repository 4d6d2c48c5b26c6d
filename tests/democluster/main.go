// Command democluster runs the lab of tests/cluster for `make
// demo-cluster`: a router namespace running BIRD 2 with ECMP over three
// VeloFlux nodes that announce the VIP over BGP, three backends, and a
// client keeping long-lived TCP streams to the VIP. It prints every few
// seconds how the streams fare and which next hops the router has, and how
// to kill, silence or drain a node to watch the streams survive. It runs
// until SIGINT/SIGTERM, or for DEMO_SECONDS, and removes what it created.
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/veloflux/veloflux/tests/cluster"
	"github.com/veloflux/veloflux/tests/lab"
)

const (
	labPrefix = "vfcdemo"
	labSubnet = 68
	streams   = 30
)

var (
	vip     = netip.MustParseAddr("198.51.100.77") // dsr
	ipipVIP = netip.MustParseAddr("198.51.100.78")
)

func main() {
	agentBin := flag.String("agent", "bin/veloflux", "the veloflux binary")
	vfctlBin := flag.String("vfctl", "bin/vfctl", "the vfctl binary (for the hints)")
	flag.Parse()
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	if err := run(log, *agentBin, *vfctlBin); err != nil {
		log.Error("demo failed", "err", err)
		os.Exit(1)
	}
}

// node is one VeloFlux node of the demo.
type node struct {
	name, cfg, pin, token, api string
	host                       *lab.Host
	cmd                        *exec.Cmd
}

func run(log *slog.Logger, agentBin, vfctlBin string) error {
	if os.Geteuid() != 0 {
		return errors.New("the demo builds network namespaces and loads XDP: run it as root (sudo make demo-cluster)")
	}
	for _, tool := range []string{"bird", "birdc", "ip"} {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Errorf("%s not found (apt-get install bird2 iproute2): %w", tool, err)
		}
	}
	agentBin, err := filepath.Abs(agentBin)
	if err != nil {
		return err
	}
	ctx, stop, err := lab.DemoContext()
	if err != nil {
		return err
	}
	defer stop()

	// A demo killed earlier may have left its lab behind.
	if err := lab.Purge(labPrefix); err != nil {
		log.Warn("purge leftovers of an earlier demo", "err", err)
	}
	l, err := lab.New(ctx, lab.Options{Prefix: labPrefix, Subnet: labSubnet, Backends: 3, VIPs: []netip.Addr{vip, ipipVIP}, Logger: log})
	if err != nil {
		return err
	}
	defer func() {
		if err := l.Close(); err != nil {
			log.Error("remove the lab", "err", err)
		}
	}()
	topo, err := cluster.Build(l)
	if err != nil {
		return err
	}
	stopServers, err := topo.StartStreamServers(ctx)
	if err != nil {
		return err
	}
	defer stopServers()

	dir, err := os.MkdirTemp("", "veloflux-democluster-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	// A private BPF filesystem: `ip netns exec` mounts its own /sys, which
	// would hide /sys/fs/bpf from the agents.
	bpffs := filepath.Join(dir, "bpffs")
	if err := os.Mkdir(bpffs, 0o700); err != nil {
		return err
	}
	if err := unix.Mount("bpf", bpffs, "bpf", 0, "mode=0700"); err != nil {
		return fmt.Errorf("mount a BPF filesystem on %s: %w", bpffs, err)
	}
	defer unix.Unmount(bpffs, unix.MNT_DETACH)

	// The ipip VIP's backends strip the tunnel with the decapsulator,
	// pinning nothing, so that it goes with the demo.
	for _, b := range l.Backends {
		decap := b.Command(context.Background(), agentBin, "decap", "--interface", b.IfName, "--local", b.Addr4.String(),
			"--pin-path=")
		decapLog, err := os.Create(filepath.Join(dir, "decap-"+b.Name+".log"))
		if err != nil {
			return err
		}
		defer decapLog.Close()
		decap.Stdout, decap.Stderr = decapLog, decapLog
		if err := decap.Start(); err != nil {
			return fmt.Errorf("start the decapsulator on %s: %w", b.Name, err)
		}
		defer func() {
			decap.Process.Signal(syscall.SIGTERM)
			decap.Wait()
		}()
	}

	var nodes []*node
	// The nodes stop before BIRD does, so that their detach reaches it.
	stopNodes := sync.OnceFunc(func() {
		for _, n := range nodes {
			stopNode(log, agentBin, n)
		}
	})
	defer stopNodes()
	for i, h := range topo.Nodes {
		n := &node{name: cluster.NodeName(i), host: h, pin: filepath.Join(bpffs, cluster.NodeName(i)),
			cfg: filepath.Join(dir, cluster.NodeName(i)+".yaml"), token: filepath.Join(dir, cluster.NodeName(i)+".token"),
			api: fmt.Sprintf("127.0.0.1:%d", 19090+i)}
		cfg := topo.NodeConfig(i, n.api, fmt.Sprintf("127.0.0.1:%d", 18080+i), n.token, l.Backends)
		if err := os.WriteFile(n.cfg, []byte(cfg), 0o600); err != nil {
			return err
		}
		logFile, err := os.Create(filepath.Join(dir, n.name+".log"))
		if err != nil {
			return err
		}
		defer logFile.Close()
		n.cmd = h.Command(context.Background(), agentBin, "--config", n.cfg, "--pin-path", n.pin,
			"--state-dir", filepath.Join(dir, n.name+"-state"), "--log-format", "text")
		n.cmd.Stdout, n.cmd.Stderr = logFile, logFile
		if err := n.cmd.Start(); err != nil {
			return fmt.Errorf("start %s's agent: %w", n.name, err)
		}
		nodes = append(nodes, n)
	}

	birdConf, birdSock := filepath.Join(dir, "bird.conf"), filepath.Join(dir, "bird.ctl")
	if err := os.WriteFile(birdConf, []byte(topo.BIRDConfig()), 0o600); err != nil {
		return err
	}
	birdLog, err := os.Create(filepath.Join(dir, "bird.log"))
	if err != nil {
		return err
	}
	defer birdLog.Close()
	bird := topo.Router.Command(context.Background(), "bird", "-f", "-c", birdConf, "-s", birdSock)
	bird.Stdout, bird.Stderr = birdLog, birdLog
	if err := bird.Start(); err != nil {
		return fmt.Errorf("start BIRD: %w", err)
	}
	defer func() {
		bird.Process.Signal(syscall.SIGTERM)
		bird.Wait()
	}()
	defer stopNodes()

	log.Info("waiting for the router's route to have three next hops")
	deadline := time.Now().Add(30 * time.Second)
	for hops, _ := nextHops(topo); hops < 3; hops, _ = nextHops(topo) {
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("the router's route to %s has %d next hops after 30s; see %s", vip, hops, dir)
		}
		time.Sleep(200 * time.Millisecond)
	}
	printHints(topo, nodes, vfctlBin, agentBin, birdSock, dir)

	var broken atomic.Int64
	var wg sync.WaitGroup
	for i := range streams {
		wg.Go(func() { keepStream(ctx, topo, i, &broken) })
	}
	tick := time.NewTicker(3 * time.Second)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			wg.Wait()
			fmt.Printf("demo over: %d stream breaks in all\n", broken.Load())
			return nil
		case <-tick.C:
			hops, via := nextHops(topo)
			fmt.Printf("%s  router next hops to %s: %d (%s)  streams broken so far: %d of %d kept open\n",
				time.Now().Format("15:04:05"), vip, hops, via, broken.Load(), streams)
		}
	}
}

// keepStream keeps one stream to the VIP exchanging a line every 50 ms,
// counting a break (an error, or an answer from another backend) and
// opening a new stream after one.
func keepStream(ctx context.Context, topo *cluster.Topology, id int, broken *atomic.Int64) {
	for ctx.Err() == nil {
		conn, err := topo.Client.DialContext(ctx, "tcp4", netip.AddrPortFrom(vip, cluster.StreamPort).String())
		if err != nil {
			time.Sleep(200 * time.Millisecond)
			continue
		}
		if exchange(ctx, conn, id) {
			broken.Add(1)
		}
		conn.Close()
	}
}

// exchange runs one stream until ctx ends (false) or it breaks (true).
func exchange(ctx context.Context, conn net.Conn, id int) bool {
	r := bufio.NewReader(conn)
	backend := ""
	for n := 0; ; n++ {
		select {
		case <-ctx.Done():
			return false
		case <-time.After(50 * time.Millisecond):
		}
		conn.SetDeadline(time.Now().Add(10 * time.Second))
		msg := fmt.Sprintf("stream %d exchange %d\n", id, n)
		if _, err := io.WriteString(conn, msg); err != nil {
			return ctx.Err() == nil
		}
		line, err := r.ReadString('\n')
		if err != nil {
			return ctx.Err() == nil
		}
		name, _, _ := strings.Cut(line, " ")
		if backend != "" && name != backend {
			return true
		}
		backend = name
	}
}

// nextHops reads the router's route to the VIP.
func nextHops(topo *cluster.Topology) (int, string) {
	out, err := exec.Command("ip", "-n", topo.Router.NetNS, "route", "show", vip.String()+"/32").Output()
	if err != nil {
		return 0, err.Error()
	}
	var via []string
	for _, f := range strings.Fields(string(out)) {
		if a, err := netip.ParseAddr(f); err == nil && a != vip {
			via = append(via, a.String())
		}
	}
	slices.Sort(via)
	via = slices.Compact(via)
	return len(via), strings.Join(via, " ")
}

func printHints(topo *cluster.Topology, nodes []*node, vfctlBin, agentBin, birdSock, dir string) {
	fmt.Printf(`
VeloFlux cluster demo: %d streams from %s to %s:%d (dsr; %s is the ipip VIP, the backends run
veloflux decap), spread by the router (%s, BIRD with ECMP) over:
`, streams, topo.Client.NetNS, vip, cluster.StreamPort, topo.IPIPVIP, topo.Router.NetNS)
	for _, n := range nodes {
		fmt.Printf("  %s  netns %-18s %s  agent pid %d  API %s (token %s)\n", n.name, n.host.NetNS, n.host.Addr4,
			n.cmd.Process.Pid, n.api, n.token)
	}
	n2, n0 := nodes[2], nodes[0]
	fmt.Printf(`
Watch:
  ip -n %s route show %s                         # the router's ECMP route
  birdc -s %s show protocols                      # the BGP sessions
  ip netns exec %s %s bgp --api http://%s       # a node's sessions and VIPs
  ip netns exec %s %s --pin-path %s vips    # its ring fingerprint (the same on every node)
Break things (the streams should survive):
  kill -9 %d && ip netns exec %s %s detach --pin-path %s --config %s   # kill node2
  ip -n %s link set %s down                            # node1 goes silent (hold timer: 3 s)
  ip netns exec %s curl -s -XPOST -H "Authorization: Bearer $(cat %s)" http://%s/api/node/drain   # drain node0
Logs are in %s. Ctrl-C ends the demo and removes everything.

`, topo.Router.NetNS, vip, birdSock, n0.host.NetNS, vfctlBin, n0.api, n0.host.NetNS, vfctlBin, n0.pin,
		n2.cmd.Process.Pid, n2.host.NetNS, agentBin, n2.pin, n2.cfg,
		topo.Lab.Switch.NetNS, nodes[1].host.PeerName,
		n0.host.NetNS, n0.token, n0.api, dir)
}

// stopNode stops a node's agent and detaches its data path, withdrawing
// its routes first.
func stopNode(log *slog.Logger, agentBin string, n *node) {
	if n.cmd.ProcessState == nil {
		n.cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { n.cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			n.cmd.Process.Kill()
			<-done
		}
	}
	out, err := n.host.Command(context.Background(), agentBin, "detach", "--pin-path", n.pin, "--config", n.cfg).CombinedOutput()
	if err != nil {
		log.Warn("detach", "node", n.name, "err", err, "output", strings.TrimSpace(string(out)))
	}
}
