package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"

	"github.com/veloflux/veloflux/agent/config"
	"github.com/veloflux/veloflux/agent/dataplane"
	"github.com/veloflux/veloflux/agent/decap"
)

// listFlag collects a flag that may repeat and takes comma-separated lists.
type listFlag []string

func (l *listFlag) String() string { return strings.Join(*l, ",") }

func (l *listFlag) Set(s string) error {
	items := config.SplitList(s)
	if len(items) == 0 {
		return errors.New("empty list")
	}
	*l = append(*l, items...)
	return nil
}

// decapFlags are the command line's own settings, which a --config file's
// decap section replaces as a whole.
var decapFlags = []string{"interface", "local", "gue-port", "xdp-mode"}

// runDecap runs the backend-side decapsulator of ipip and gue VIPs until
// SIGTERM or SIGINT, reloading --config on SIGHUP:
//
//	veloflux decap --interface IF[,IF] --local ADDR[,ADDR]... [--gue-port N] [--xdp-mode M]
//	veloflux decap --config F        (its decap: section)
//	veloflux decap detach [--pin-path P]
//
// The program and its maps are pinned under --pin-path, so decapsulation
// goes on while the command is stopped and a restart adopts them without
// a gap; `veloflux decap detach` removes them. --pin-path "" pins nothing:
// the decapsulator then stops with the process.
func runDecap(args []string, stdout, stderr io.Writer) int {
	if len(args) > 0 && args[0] == "detach" {
		return decapDetach(args[1:], stdout, stderr)
	}
	fs := flag.NewFlagSet("veloflux decap", flag.ContinueOnError)
	fs.SetOutput(stderr)
	cfgPath := fs.String("config", "", "configuration file whose decap: section says what to do (instead of the flags below)")
	var ifaces, locals listFlag
	fs.Var(&ifaces, "interface", "interface the tunnel packets arrive on (comma-separated, repeatable)")
	fs.Var(&locals, "local", "this backend's address the balancer sends tunnel packets to (comma-separated, repeatable)")
	guePort := fs.String("gue-port", strconv.Itoa(config.DefaultGUEPort), "UDP port of GUE packets; 0 decapsulates no GUE")
	mode := fs.String("xdp-mode", string(dataplane.XDPAuto), "native, generic or auto")
	pinPath := fs.String("pin-path", dataplane.DefaultDecapPinPath, `BPF filesystem directory for the maps and links ("" pins nothing)`)
	level := fs.String("log-level", "info", "debug, info, warn or error")
	format := fs.String("log-format", "json", "json or text")
	if err := fs.Parse(args); err != nil {
		return exitConfig
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "veloflux decap: unexpected argument %q\n", fs.Arg(0))
		return exitConfig
	}
	log, err := newLogger(stderr, *level, *format)
	if err != nil {
		fmt.Fprintln(stderr, "veloflux decap:", err)
		return exitConfig
	}
	load := func() (decap.Settings, error) { return decapFromFile(*cfgPath) }
	if *cfgPath == "" {
		load = func() (decap.Settings, error) { return decapFromFlags(ifaces, locals, *guePort, *mode) }
	} else {
		var both []string
		fs.Visit(func(f *flag.Flag) {
			for _, name := range decapFlags {
				if f.Name == name {
					both = append(both, "--"+name)
				}
			}
		})
		if len(both) > 0 {
			fmt.Fprintf(stderr, "veloflux decap: --config and %s exclude each other: the file's decap: section says it all\n",
				strings.Join(both, ", "))
			return exitConfig
		}
	}
	settings, err := load()
	if err != nil {
		printDecapError(stderr, *cfgPath, err)
		return exitConfig
	}

	svc, err := decap.Start(log, *pinPath, settings)
	if err != nil {
		log.Error("decap: cannot start", "err", err)
		return 1
	}
	defer svc.Close()
	kinds := "IPIP/IP6IP6 and GUE"
	if settings.GUEPort == 0 {
		kinds = "IPIP/IP6IP6 (GUE off)"
	}
	log.Info("decapsulating "+kinds+" until SIGTERM", "interfaces", settings.Interfaces,
		"local", settings.Local, "gue_port", settings.GUEPort, "pin_path", *pinPath)

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	reload := make(chan struct{})
	go func() {
		for {
			select {
			case <-ctx.Done():
				return
			case <-hup:
				if *cfgPath == "" {
					log.Info("SIGHUP: nothing to reload (the settings came from the command line)")
					continue
				}
				log.Info("SIGHUP: reloading the decap section", "config", *cfgPath)
				select {
				case reload <- struct{}{}:
				case <-ctx.Done():
					return
				}
			}
		}
	}()
	if err := svc.Run(ctx, reload, load); errors.Is(err, decap.ErrDetached) {
		log.Info("decap: detached (its pins were removed); exiting", "pin_path", *pinPath)
		return 0
	}
	if *pinPath == "" {
		log.Info("decap: stopped; nothing was pinned, so the decapsulator is gone")
	} else {
		log.Info("decap: stopped; the decapsulator stays attached (`veloflux decap detach` removes it)", "pin_path", *pinPath)
	}
	return 0
}

// decapFromFile reads the decap section of a configuration file, which
// must validate as a whole.
func decapFromFile(path string) (decap.Settings, error) {
	cfg, err := config.Load(path)
	if err != nil {
		return decap.Settings{}, err
	}
	if cfg.Decap == nil {
		return decap.Settings{}, fmt.Errorf("%s has no decap: section", path)
	}
	return decap.FromConfig(*cfg.Decap, "decap.")
}

// decapFromFlags checks the command line's settings as a decap section.
func decapFromFlags(ifaces, locals []string, guePort, mode string) (decap.Settings, error) {
	c := config.DefaultDecap()
	c.Interfaces, c.Local, c.XDPMode = ifaces, locals, config.XDPMode(mode)
	port, err := strconv.Atoi(guePort)
	if err != nil {
		// Listed with every other problem, so that one run shows them all.
		problems := append([]config.FieldError{{Path: "gue_port", Message: fmt.Sprintf("want a port number, got %q", guePort)}},
			c.Problems("")...)
		return decap.Settings{}, &config.ValidationError{Errors: problems}
	}
	c.GUEPort = port
	return decap.FromConfig(c, "")
}

// printDecapError prints every problem of the settings, each located in
// the file (cfgPath) or by its flag (interfaces[1] is --interface).
func printDecapError(w io.Writer, cfgPath string, err error) {
	var verr *config.ValidationError
	if !errors.As(err, &verr) {
		fmt.Fprintln(w, "veloflux decap:", err)
		return
	}
	for _, fe := range verr.Errors {
		if cfgPath != "" {
			fmt.Fprintf(w, "veloflux decap: %s: %s\n", cfgPath, fe.Error())
			continue
		}
		name, _, _ := strings.Cut(fe.Path, "[")
		name = strings.ReplaceAll(strings.TrimSuffix(name, "s"), "_", "-")
		fmt.Fprintf(w, "veloflux decap: --%s: %s\n", name, fe.Message)
	}
}

// decapDetach removes the decapsulator's links and maps.
func decapDetach(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("veloflux decap detach", flag.ContinueOnError)
	fs.SetOutput(stderr)
	pinPath := fs.String("pin-path", dataplane.DefaultDecapPinPath, "BPF filesystem directory of the decapsulator's maps and links")
	if err := fs.Parse(args); err != nil {
		return exitConfig
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "veloflux decap detach: unexpected argument %q\n", fs.Arg(0))
		return exitConfig
	}
	return removePins(*pinPath, "veloflux decap detach", "the decapsulator's links and maps", stdout, stderr)
}
