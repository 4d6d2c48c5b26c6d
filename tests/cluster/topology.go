package cluster

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"

	"github.com/vishvananda/netlink"

	"github.com/veloflux/veloflux/tests/lab"
)

// The cluster's fixed parts, shared by the tests and `make demo-cluster`.
const (
	// StreamPort is where the backends' stream servers listen, and the
	// VIP's port.
	StreamPort = 7100
	NodeASN    = 65001
	RouterASN  = 65000
)

// Topology is the cluster on a tests/lab lab with three backends and two
// VIPs, the first dsr and the second ipip: the lab's client namespace is
// the router (10.X.0.2), its balancer is node0 (.1), and Build adds node1
// (.3), node2 (.4) and the client (.5).
type Topology struct {
	Lab     *lab.Lab
	VIP     netip.Addr // dsr
	IPIPVIP netip.Addr // ipip: the backends run `veloflux decap`
	Router  *lab.Host
	Client  *lab.Host
	Nodes   []*lab.Host
}

// Build adds the two other nodes and the client to l, makes the lab's
// client the router (it forwards, hashes flows over ECMP next hops by their
// L4 5-tuple, and sends no redirects, since it forwards out the interface
// the packets came in on), and routes the VIP from the client via the
// router. The VIPs are l's first two.
func Build(l *lab.Lab) (*Topology, error) {
	if len(l.VIPs) < 2 || len(l.Backends) == 0 {
		return nil, errors.New("cluster: the lab needs two VIPs and backends")
	}
	tp := &Topology{Lab: l, VIP: l.VIPs[0], IPIPVIP: l.VIPs[1], Router: l.Client, Nodes: []*lab.Host{l.Balancer}}
	for i, byte := range []int{3, 4} {
		h, err := l.AddHost(fmt.Sprintf("n%d", i+1), byte)
		if err != nil {
			return nil, err
		}
		tp.Nodes = append(tp.Nodes, h)
	}
	var err error
	if tp.Client, err = l.AddHost("cl", 5); err != nil {
		return nil, err
	}
	var dsts []*net.IPNet
	for _, v := range []netip.Addr{tp.VIP, tp.IPIPVIP} {
		_, dst, _ := net.ParseCIDR(v.String() + "/32")
		dsts = append(dsts, dst)
	}
	ifname := tp.Router.IfName
	err = tp.Router.Do(func() error {
		for k, v := range map[string]string{
			"net/ipv4/ip_forward":                         "1",
			"net/ipv4/fib_multipath_hash_policy":          "3",
			"net/ipv4/fib_multipath_hash_fields":          "0x37",
			"net/ipv4/conf/all/send_redirects":            "0",
			"net/ipv4/conf/" + ifname + "/send_redirects": "0",
		} {
			if err := os.WriteFile("/proc/sys/"+k, []byte(v), 0o644); err != nil {
				return err
			}
		}
		// The lab routes the VIPs via its balancer; BIRD owns them here.
		for _, dst := range dsts {
			if err := netlink.RouteDel(&netlink.Route{Dst: dst}); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("cluster: set up the router: %w", err)
	}
	err = tp.Client.Do(func() error {
		if err := os.WriteFile("/proc/sys/net/ipv4/conf/all/accept_redirects", []byte("0"), 0o644); err != nil {
			return err
		}
		link, err := netlink.LinkByName(tp.Client.IfName)
		if err != nil {
			return err
		}
		for _, dst := range dsts {
			if err := netlink.RouteAdd(&netlink.Route{LinkIndex: link.Attrs().Index, Dst: dst, Gw: tp.Router.Addr4.AsSlice()}); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("cluster: set up the client: %w", err)
	}
	// ipip finds the next hop toward a backend with bpf_fib_lookup, which
	// answers only where forwarding is on.
	for _, n := range tp.Nodes {
		if err := n.Do(func() error { return os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("1"), 0o644) }); err != nil {
			return nil, fmt.Errorf("cluster: forwarding on %s: %w", n.Name, err)
		}
	}
	return tp, nil
}

// NodeName is node i's name, in its configuration and in BIRD's.
func NodeName(i int) string { return fmt.Sprintf("node%d", i) }

// NodeConfig is node i's agent configuration over the given backends: the
// dsr and the ipip VIP on the stream port, tcp health checks every 200 ms (fall 2), and
// one BGP peer, the router.
func (tp *Topology) NodeConfig(i int, api, metrics, tokenFile string, backends []*lab.Host) string {
	var b strings.Builder
	fmt.Fprintf(&b, "node:\n  name: %s\n", NodeName(i))
	fmt.Fprintf(&b, "dataplane:\n  interfaces: [%s]\n  xdp_mode: native\n  conntrack_size: 65536\n  encap_source_v4: %s\n",
		tp.Nodes[i].IfName, tp.Nodes[i].Addr4)
	fmt.Fprintf(&b, "api:\n  listen: %q\n  token_file: %s\n", api, tokenFile)
	fmt.Fprintf(&b, "metrics:\n  listen: %q\n", metrics)
	b.WriteString("pools:\n  - name: streams\n    backends:\n")
	for _, be := range backends {
		fmt.Fprintf(&b, "      - {address: %s, port: %d}\n", be.Addr4, StreamPort)
	}
	b.WriteString("    health_check: {type: tcp, interval: 200ms, timeout: 150ms, rise: 1, fall: 2}\n")
	fmt.Fprintf(&b, "vips:\n  - {address: %s, port: %d, protocol: tcp, mode: dsr, pool: streams}\n", tp.VIP, StreamPort)
	fmt.Fprintf(&b, "  - {address: %s, port: %d, protocol: tcp, mode: ipip, pool: streams}\n", tp.IPIPVIP, StreamPort)
	fmt.Fprintf(&b, "bgp:\n  asn: %d\n  peers:\n    - {address: %s, asn: %d}\n", NodeASN, tp.Router.Addr4, RouterASN)
	return b.String()
}

// BIRDConfig is the router's BIRD 2 configuration: passive sessions to the
// nodes, graceful restart helper, and the kernel protocol merging equal
// routes into one ECMP route.
func (tp *Topology) BIRDConfig() string {
	var b strings.Builder
	fmt.Fprintf(&b, "log stderr all;\nrouter id %s;\n", tp.Router.Addr4)
	b.WriteString("protocol device { scan time 10; }\n")
	b.WriteString("protocol kernel { ipv4 { import none; export all; }; merge paths on; }\n")
	fmt.Fprintf(&b, `template bgp vfnode {
  local %s as %d;
  passive on;
  hold time 3; keepalive time 1;
  error wait time 1, 2;
  graceful restart on;
  ipv4 { import all; export none; };
}
`, tp.Router.Addr4, RouterASN)
	for i, n := range tp.Nodes {
		fmt.Fprintf(&b, "protocol bgp %s from vfnode { neighbor %s as %d; }\n", NodeName(i), n.Addr4, NodeASN)
	}
	return b.String()
}

// StartStreamServers runs, in every backend, a server on the stream port
// that echoes each line it reads prefixed with the backend's name, so a
// client sees at every exchange which backend answered. stop closes the
// listeners and connections and waits for the servers.
func (tp *Topology) StartStreamServers(ctx context.Context) (stop func(), err error) {
	var wg sync.WaitGroup
	var conns sync.Map
	var listeners []net.Listener
	stop = func() {
		for _, ln := range listeners {
			ln.Close()
		}
		conns.Range(func(k, _ any) bool { k.(net.Conn).Close(); return true })
		wg.Wait()
	}
	for _, b := range tp.Lab.Backends {
		ln, err := b.Listen(ctx, "tcp4", fmt.Sprintf("0.0.0.0:%d", StreamPort))
		if err != nil {
			stop()
			return nil, fmt.Errorf("cluster: listen in %s: %w", b.Name, err)
		}
		listeners = append(listeners, ln)
		name := b.Name
		wg.Go(func() {
			for {
				conn, err := ln.Accept()
				if err != nil {
					return
				}
				conns.Store(conn, true)
				wg.Go(func() {
					defer conn.Close()
					defer conns.Delete(conn)
					r := bufio.NewReader(conn)
					for {
						line, err := r.ReadString('\n')
						if err != nil {
							return
						}
						if _, err := io.WriteString(conn, name+" "+line); err != nil {
							return
						}
					}
				})
			}
		})
	}
	return stop, nil
}
