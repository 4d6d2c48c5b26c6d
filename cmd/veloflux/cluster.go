package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/veloflux/veloflux/agent"
	"github.com/veloflux/veloflux/agent/config"
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
