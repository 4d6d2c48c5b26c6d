package dataplane

import (
	"fmt"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
)

// kernelClock reads the kernel's jiffies, the clock conntrack is stamped
// with (bpf_jiffies64 is inlined by the verifier; a clock read would be a
// helper call on every packet). Its tick rate (CONFIG_HZ) is not exported
// anywhere reliable, so it is measured.
type kernelClock struct {
	prog *ebpf.Program
	hz   uint32
}

// Kernel tick rates Linux can be built with.
var knownHZ = [...]uint32{100, 250, 300, 1000}

func newKernelClock(knownRate uint32) (*kernelClock, error) {
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Name:    "vf_jiffies",
		Type:    ebpf.XDP,
		License: "GPL",
		Instructions: asm.Instructions{
			asm.FnJiffies64.Call(),
			asm.Return(),
		},
	})
	if err != nil {
		return nil, fmt.Errorf("load jiffies probe: %w", err)
	}
	c := &kernelClock{prog: prog, hz: knownRate}
	if c.hz == 0 {
		if c.hz, err = c.measureHZ(100 * time.Millisecond); err != nil {
			prog.Close()
			return nil, err
		}
	}
	return c, nil
}

// now returns the low 32 bits of jiffies (the program's return value).
func (c *kernelClock) now() (uint32, error) {
	ret, _, err := c.prog.Test(make([]byte, 14))
	if err != nil {
		return 0, fmt.Errorf("read jiffies: %w", err)
	}
	return ret, nil
}

func (c *kernelClock) measureHZ(window time.Duration) (uint32, error) {
	j0, err := c.now()
	if err != nil {
		return 0, err
	}
	t0 := time.Now()
	time.Sleep(window)
	j1, err := c.now()
	if err != nil {
		return 0, err
	}
	rate := float64(j1-j0) / time.Since(t0).Seconds()
	best := knownHZ[0]
	for _, hz := range knownHZ {
		if abs(rate-float64(hz)) < abs(rate-float64(best)) {
			best = hz
		}
	}
	if abs(rate-float64(best)) > 0.15*float64(best) {
		return 0, fmt.Errorf("kernel tick rate measured at %.0f Hz, not one of %v", rate, knownHZ)
	}
	return best, nil
}

func abs(f float64) float64 {
	if f < 0 {
		return -f
	}
	return f
}

// toJiffies rounds up, so a timeout never expires early.
func (c *kernelClock) toJiffies(ns uint64) uint64 {
	return (ns*uint64(c.hz) + 1e9 - 1) / 1e9
}

func (c *kernelClock) toDuration(jiffies uint32) time.Duration {
	return time.Duration(uint64(jiffies) * 1e9 / uint64(c.hz))
}

func (c *kernelClock) close() error { return c.prog.Close() }
