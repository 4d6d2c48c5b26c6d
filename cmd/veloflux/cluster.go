package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/veloflux/veloflux/agent"
	"github.com/veloflux/veloflux/agent/config"
	"github.com/veloflux/veloflux/agent/dataplane"
)

// closeSessionsTimeout bounds how long detach tries to reach the routers.
const closeSessionsTimeout = 5 * time.Second

// withdrawBeforeDetach tells the routers of the configuration's bgp
// section to drop this node's routes, before detach takes the data path
// down. A missing configuration file is not an error (a node without one
// announces nothing); one that cannot be read or reached is reported, and
// detach goes on: the data path still has to go.
func withdrawBeforeDetach(cfgPath string, explicit bool, stdout, stderr io.Writer) {
	cfg, err := config.Load(cfgPath)
	if errors.Is(err, os.ErrNotExist) && !explicit {
		return
	}
	if err != nil {
		fmt.Fprintf(stderr, "veloflux detach: routes not withdrawn: %v\n", err)
		return
	}
	if cfg.BGP == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), closeSessionsTimeout)
	defer cancel()
	if err := agent.CloseBGPSessions(ctx, cfg); err != nil {
		fmt.Fprintf(stderr, "veloflux detach: routes not withdrawn (routers drop them after bgp.graceful_restart.restart_time): %v\n", err)
		return
	}
	fmt.Fprintf(stdout, "withdrawn: the %d BGP peers of %s dropped this node's routes\n", len(cfg.BGP.Peers), cfgPath)
}

// decap runs the backend-side decapsulator for ipip VIPs until SIGTERM or
// SIGINT: `veloflux decap --interface IF --local ADDR [--local ADDR]...`.
// It is not pinned, so it stops with the process.
func decap(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("veloflux decap", flag.ContinueOnError)
	fs.SetOutput(stderr)
	ifname := fs.String("interface", "", "interface the tunnel packets arrive on (required)")
	mode := fs.String("xdp-mode", string(dataplane.XDPAuto), "native, generic or auto")
	var locals []netip.Addr
	fs.Func("local", "an outer destination address to accept (this backend's address; repeatable, required)", func(s string) error {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return fmt.Errorf("want an IP address: %w", err)
		}
		locals = append(locals, a)
		return nil
	})
	if err := fs.Parse(args); err != nil {
		return exitConfig
	}
	if *ifname == "" || len(locals) == 0 {
		fmt.Fprintln(stderr, "veloflux decap: --interface and at least one --local are required")
		return exitConfig
	}
	d, err := dataplane.LoadDecap()
	if err != nil {
		fmt.Fprintln(stderr, "veloflux decap:", err)
		return 1
	}
	defer d.Close()
	for _, a := range locals {
		if err := d.AddLocal(a); err != nil {
			fmt.Fprintln(stderr, "veloflux decap:", err)
			return 1
		}
	}
	if err := d.Attach(*ifname, dataplane.XDPMode(*mode)); err != nil {
		fmt.Fprintln(stderr, "veloflux decap:", err)
		return 1
	}
	fmt.Fprintf(stdout, "decapsulating IPIP/IP6IP6 to %v on %s until SIGTERM\n", locals, *ifname)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	<-ctx.Done()
	return 0
}
