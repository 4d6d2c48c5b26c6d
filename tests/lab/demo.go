package lab

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"
)

// DemoContext is the lifetime of a demo (make demo, make demo-cluster):
// until SIGINT or SIGTERM, and at most DEMO_SECONDS seconds when that is
// set, so a headless run ends by itself. stop releases the signals.
func DemoContext() (ctx context.Context, stop context.CancelFunc, err error) {
	ctx, stopSignals := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	s := os.Getenv("DEMO_SECONDS")
	if s == "" {
		return ctx, stopSignals, nil
	}
	secs, err := strconv.Atoi(s)
	if err != nil || secs <= 0 {
		stopSignals()
		return nil, nil, fmt.Errorf("DEMO_SECONDS=%q: want a positive number of seconds", s)
	}
	ctx, cancel := context.WithTimeout(ctx, time.Duration(secs)*time.Second)
	return ctx, func() { cancel(); stopSignals() }, nil
}
