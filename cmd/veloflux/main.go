// Command veloflux is the VeloFlux agent: it loads the XDP balancer, keeps
// its maps in step with the configuration and the health checks, and leaves
// the data path running when it stops.
//
//	veloflux [run] [--config F] [--pin-path P] [--state-dir D] [--log-level L] [--log-format json|text]
//	veloflux validate --config F     exit 0, or 2 with every error listed
//	veloflux detach [--pin-path P] [--config F]
//	                                 withdraw the BGP routes, remove every VeloFlux attachment and pin
//	veloflux decap --interface IF[,IF] --local ADDR[,ADDR] [--gue-port N] [--pin-path P]
//	veloflux decap --config F        run a backend's IPIP/GUE decapsulator until SIGTERM
//	                                 (it stays pinned and attached after)
//	veloflux decap detach [--pin-path P]
//	                                 remove the decapsulator
//	veloflux version
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/veloflux/veloflux/agent"
	"github.com/veloflux/veloflux/agent/config"
	"github.com/veloflux/veloflux/agent/dataplane"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

const (
	defaultConfig   = "/etc/veloflux/veloflux.yaml"
	defaultStateDir = "/var/lib/veloflux"
	// exitConfig is the documented exit code for an invalid configuration.
	exitConfig = 2
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	cmd := "run"
	if len(args) > 0 && len(args[0]) > 0 && args[0][0] != '-' {
		cmd, args = args[0], args[1:]
	}
	switch cmd {
	case "run":
		return runAgent(args, stderr)
	case "validate":
		return validate(args, stdout, stderr)
	case "detach":
		return detach(args, stdout, stderr)
	case "decap":
		return runDecap(args, stdout, stderr)
	case "version":
		fmt.Fprintln(stdout, "veloflux", version)
		return 0
	}
	fmt.Fprintf(stderr, "veloflux: unknown command %q (want run, validate, detach, decap or version)\n", cmd)
	return exitConfig
}

// configDefault honours VFX_CONFIG, as the original agent did.
func configDefault() string {
	if p := os.Getenv("VFX_CONFIG"); p != "" {
		return p
	}
	return defaultConfig
}

func newLogger(w io.Writer, level, format string) (*slog.Logger, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("--log-level %q: want debug, info, warn or error", level)
	}
	opts := &slog.HandlerOptions{Level: lv}
	switch format {
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	}
	return nil, fmt.Errorf("--log-format %q: want json or text", format)
}

func runAgent(args []string, stderr io.Writer) int {
	fs := flag.NewFlagSet("veloflux run", flag.ContinueOnError)
	fs.SetOutput(stderr)
	cfgPath := fs.String("config", configDefault(), "configuration file (env VFX_CONFIG)")
	pinPath := fs.String("pin-path", dataplane.DefaultPinPath, "BPF filesystem directory for maps and links")
	stateDir := fs.String("state-dir", defaultStateDir, "directory for the agent's persistent state")
	level := fs.String("log-level", "info", "debug, info, warn or error")
	format := fs.String("log-format", "json", "json or text")
	if err := fs.Parse(args); err != nil {
		return exitConfig
	}
	logOut := newLogWriter(stderr)
	defer logOut.Flush()
	log, err := newLogger(logOut, *level, *format)
	if err != nil {
		fmt.Fprintln(stderr, "veloflux:", err)
		return exitConfig
	}
	flushCtx, stopFlush := context.WithCancel(context.Background())
	defer stopFlush()
	go logOut.flushUntil(flushCtx)
	a, err := agent.New(agent.Options{ConfigPath: *cfgPath, PinPath: *pinPath, StateDir: *stateDir,
		Version: version, Logger: log})
	if err != nil {
		logConfigError(log, *cfgPath, err)
		return exitConfig
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	go func() {
		for {
			select {
			case <-ctx.Done():
				return
			case <-hup:
				log.Info("SIGHUP: reloading configuration", "config", *cfgPath)
				if err := a.Reload(ctx); err != nil {
					logConfigError(log, *cfgPath, err)
					log.Error("reload rejected; the running configuration stays in force")
				}
			}
		}
	}()

	if err := a.Run(ctx); err != nil {
		log.Error("agent failed", "err", err)
		return 1
	}
	return 0
}

// logConfigError logs every problem of a configuration, one record each.
func logConfigError(log *slog.Logger, path string, err error) {
	var verr *config.ValidationError
	if errors.As(err, &verr) {
		for _, fe := range verr.Errors {
			log.Error("invalid configuration", "config", path, "error", fe.Error())
		}
		return
	}
	log.Error("invalid configuration", "config", path, "err", err)
}

func validate(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("veloflux validate", flag.ContinueOnError)
	fs.SetOutput(stderr)
	cfgPath := fs.String("config", configDefault(), "configuration file to check")
	if err := fs.Parse(args); err != nil {
		return exitConfig
	}
	cfg, err := config.Load(*cfgPath)
	if err != nil {
		var verr *config.ValidationError
		if errors.As(err, &verr) {
			for _, fe := range verr.Errors {
				fmt.Fprintf(stderr, "%s: %s\n", *cfgPath, fe.Error())
			}
		} else {
			fmt.Fprintf(stderr, "%s: %v\n", *cfgPath, err)
		}
		return exitConfig
	}
	fmt.Fprintf(stdout, "%s: valid (%d pools, %d VIPs, %d routes)\n", *cfgPath, len(cfg.Pools), len(cfg.VIPs), len(cfg.Routes))
	return 0
}

func detach(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("veloflux detach", flag.ContinueOnError)
	fs.SetOutput(stderr)
	pinPath := fs.String("pin-path", dataplane.DefaultPinPath, "BPF filesystem directory for maps and links")
	cfgPath := fs.String("config", configDefault(), "configuration whose BGP peers are told to drop this node's routes first")
	if err := fs.Parse(args); err != nil {
		return exitConfig
	}
	explicit := false
	fs.Visit(func(f *flag.Flag) { explicit = explicit || f.Name == "config" })
	withdrawBeforeDetach(*cfgPath, explicit, stdout, stderr)
	return removePins(*pinPath, "veloflux detach", "every link and map VeloFlux pinned", stdout, stderr)
}

// removePins removes what is pinned under pinPath for a detach command and
// reports it. Pins that others made beside ours are named but not an error:
// the data path is down, which is what detach is for, and what others pinned
// is theirs to remove.
func removePins(pinPath, command, what string, stdout, stderr io.Writer) int {
	err := dataplane.RemovePins(pinPath)
	var foreign *dataplane.ForeignPinsError
	if err != nil && !errors.As(err, &foreign) {
		fmt.Fprintf(stderr, "%s: %v\n", command, err)
		return 1
	}
	fmt.Fprintf(stdout, "detached: removed %s under %s\n", what, pinPath)
	if foreign != nil {
		fmt.Fprintf(stderr, "%s: %v\n", command, foreign)
	}
	return 0
}
