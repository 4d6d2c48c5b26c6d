package dataplane

import (
	"bufio"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"golang.org/x/sys/unix"
)

// kernelClock reads the kernel's jiffies, the clock conntrack is stamped
// with (bpf_jiffies64 is inlined by the verifier; a clock read would be a
// helper call on every packet). Its tick rate (CONFIG_HZ) is read from the
// kernel's build configuration where the distribution ships it, and
// measured otherwise.
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
		c.hz = configuredHZ()
	}
	if c.hz == 0 {
		if c.hz, err = c.measureHZ(100*time.Millisecond, hzAttempts); err != nil {
			prog.Close()
			return nil, err
		}
	}
	return c, nil
}

// hzAttempts bounds the measurements: a loaded host, or a guest under
// emulation, can stall a window long enough to skew one of them.
const hzAttempts = 5

// configuredHZ reads CONFIG_HZ from the running kernel's build
// configuration where the distribution ships it (/boot/config-<release>,
// as Debian does); 0 when it is not there or names no known rate.
func configuredHZ() uint32 {
	var uts unix.Utsname
	if err := unix.Uname(&uts); err != nil {
		return 0
	}
	f, err := os.Open("/boot/config-" + unix.ByteSliceToString(uts.Release[:]))
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		v, ok := strings.CutPrefix(sc.Text(), "CONFIG_HZ=")
		if !ok {
			continue
		}
		hz, err := strconv.ParseUint(v, 10, 32)
		if err == nil && slices.Contains(knownHZ[:], uint32(hz)) {
			return uint32(hz)
		}
		return 0
	}
	return 0
}

// now returns the low 32 bits of jiffies (the program's return value).
func (c *kernelClock) now() (uint32, error) {
	ret, _, err := c.prog.Test(make([]byte, 14))
	if err != nil {
		return 0, fmt.Errorf("read jiffies: %w", err)
	}
	return ret, nil
}

// measureHZ measures the tick rate over windows until one is within 15% of
// a rate Linux can be built with, at most attempts times.
func (c *kernelClock) measureHZ(window time.Duration, attempts int) (uint32, error) {
	var err error
	for range attempts {
		var hz uint32
		if hz, err = c.measureOnce(window); err == nil {
			return hz, nil
		}
	}
	return 0, fmt.Errorf("%w (%d measurements)", err, attempts)
}

func (c *kernelClock) measureOnce(window time.Duration) (uint32, error) {
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
