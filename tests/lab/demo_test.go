package lab

import (
	"strings"
	"testing"
)

func TestDemoContextHonoursDemoSeconds(t *testing.T) {
	t.Setenv("DEMO_SECONDS", "30")
	ctx, stop, err := DemoContext()
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := ctx.Deadline(); !ok {
		t.Error("DEMO_SECONDS=30 gave a context without a deadline")
	}
	stop()
	if ctx.Err() == nil {
		t.Error("stop did not end the context")
	}

	t.Setenv("DEMO_SECONDS", "soon")
	if _, _, err := DemoContext(); err == nil || !strings.Contains(err.Error(), "DEMO_SECONDS") {
		t.Errorf("DEMO_SECONDS=soon: %v, want an error naming it", err)
	}
	t.Setenv("DEMO_SECONDS", "")
	ctx, stop, err = DemoContext()
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	if _, ok := ctx.Deadline(); ok {
		t.Error("without DEMO_SECONDS the demo has a deadline")
	}
}
