package bench

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"reflect"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/veloflux/veloflux/tests/lab"
)

// The load: the same for every peer and mode. One wrk thread, because the
// machine has two CPUs and the backends and the balancer need the rest.
const (
	wrkThreads  = 1
	wrkConns    = 32
	wrkDuration = 4 * time.Second
	wrkTimeout  = 2 * time.Second // a request slower than this counts as a timeout error
)

// wrkArgs is the wrk command line for one run; closeConns sends
// "Connection: close", so every request is a new TCP connection.
func wrkArgs(url string, closeConns bool) []string {
	args := []string{
		"-t", strconv.Itoa(wrkThreads), "-c", strconv.Itoa(wrkConns),
		"-d", fmt.Sprintf("%ds", int(wrkDuration/time.Second)),
		"--timeout", fmt.Sprintf("%ds", int(wrkTimeout/time.Second)), "--latency",
	}
	if closeConns {
		args = append(args, "-H", "Connection: close")
	}
	return append(args, url)
}

// wrkResult is what one wrk run reported, plus where the CPU time went
// while it ran.
type wrkResult struct {
	Requests  int64
	Elapsed   time.Duration // as wrk reports it
	ReqPerSec float64
	P50, P99  time.Duration
	// Socket errors by kind and non-2xx/3xx answers.
	Connect, Read, Write, Timeout, Non2xx int64
	CPU                                   cpuUse
}

func (r wrkResult) errors() int64 { return r.Connect + r.Read + r.Write + r.Timeout + r.Non2xx }

var (
	reqsRE    = regexp.MustCompile(`(?m)^\s*(\d+) requests in ([0-9.]+\w+),`)
	rpsRE     = regexp.MustCompile(`(?m)^Requests/sec:\s+([0-9.]+)`)
	pctRE     = regexp.MustCompile(`(?m)^\s+(50|99)%\s+([0-9.]+)(us|ms|s|m)\s*$`)
	sockErrRE = regexp.MustCompile(`Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)`)
	non2xxRE  = regexp.MustCompile(`Non-2xx or 3xx responses: (\d+)`)
)

// parseWrk reads wrk 4.x's report (with --latency).
func parseWrk(out string) (wrkResult, error) {
	var r wrkResult
	m := reqsRE.FindStringSubmatch(out)
	if m == nil {
		return r, errors.New("no \"N requests in T\" line")
	}
	r.Requests, _ = strconv.ParseInt(m[1], 10, 64)
	el, err := time.ParseDuration(m[2])
	if err != nil {
		return r, fmt.Errorf("elapsed %q: %w", m[2], err)
	}
	r.Elapsed = el
	m = rpsRE.FindStringSubmatch(out)
	if m == nil {
		return r, errors.New("no Requests/sec line")
	}
	r.ReqPerSec, _ = strconv.ParseFloat(m[1], 64)
	for _, m := range pctRE.FindAllStringSubmatch(out, -1) {
		d, err := time.ParseDuration(m[2] + m[3])
		if err != nil {
			return r, fmt.Errorf("latency %s%%: %w", m[1], err)
		}
		if m[1] == "50" {
			r.P50 = d
		} else {
			r.P99 = d
		}
	}
	if r.P50 == 0 || r.P99 == 0 {
		return r, errors.New("no latency distribution (50% and 99%)")
	}
	if m := sockErrRE.FindStringSubmatch(out); m != nil {
		for i, dst := range []*int64{&r.Connect, &r.Read, &r.Write, &r.Timeout} {
			*dst, _ = strconv.ParseInt(m[i+1], 10, 64)
		}
	}
	if m := non2xxRE.FindStringSubmatch(out); m != nil {
		r.Non2xx, _ = strconv.ParseInt(m[1], 10, 64)
	}
	return r, nil
}

// runWrk runs wrk from the client namespace and accounts the CPU time spent
// meanwhile. balancerPID, if not 0, is the balancer's process (HAProxy, the
// VeloFlux agent) whose CPU time is accounted separately.
func runWrk(ctx context.Context, client *lab.Host, url string, closeConns bool, balancerPID int) (wrkResult, string, error) {
	ctx, cancel := context.WithTimeout(ctx, wrkDuration+30*time.Second)
	defer cancel()
	cmd := client.Command(ctx, "wrk", wrkArgs(url, closeConns)...)
	before, err := sampleCPU(balancerPID)
	if err != nil {
		return wrkResult{}, "", err
	}
	out, err := cmd.CombinedOutput()
	after, serr := sampleCPU(balancerPID)
	if err != nil {
		return wrkResult{}, string(out), fmt.Errorf("wrk %s: %w", url, err)
	}
	if serr != nil {
		return wrkResult{}, string(out), serr
	}
	r, err := parseWrk(string(out))
	if err != nil {
		return r, string(out), fmt.Errorf("wrk %s: %w", url, err)
	}
	r.CPU = after.sub(before)
	if ru, ok := cmd.ProcessState.SysUsage().(*syscall.Rusage); ok {
		r.CPU.Wrk = tvDur(ru.Utime) + tvDur(ru.Stime)
	}
	return r, string(out), nil
}

// cpuUse is CPU time over an interval: the whole machine from /proc/stat,
// the test process (which runs the Go backend servers) from getrusage, and
// a user-space balancer from /proc/<pid>/stat. Softirq work (XDP, netfilter,
// veth) is charged to whichever process it interrupted, or to "softirq" when
// the kernel accounts it separately.
type cpuUse struct {
	Wall                        time.Duration
	Busy, User, System, Softirq time.Duration // the machine, all CPUs
	Steal                       time.Duration
	TestProc, Balancer, Wrk     time.Duration
	// Foreign is the CPU time of user processes that are neither this
	// test process nor its children: other work on the machine that
	// competes with the measurement. Processes that both start and end
	// within the interval are missed.
	Foreign time.Duration
	// Ksoftirqd is the CPU time of the ksoftirqd threads: softirq work
	// (NAPI polls of the veths, XDP among them) the kernel deferred.
	Ksoftirqd time.Duration
	procs     map[int]time.Duration // for Foreign: CPU time by pid
	softirqd  time.Duration
}

func (c cpuUse) sub(o cpuUse) cpuUse {
	return cpuUse{
		Wall: c.Wall - o.Wall, Busy: c.Busy - o.Busy, User: c.User - o.User, System: c.System - o.System,
		Softirq: c.Softirq - o.Softirq, Steal: c.Steal - o.Steal,
		TestProc: c.TestProc - o.TestProc, Balancer: c.Balancer - o.Balancer,
		Foreign: foreignDelta(o.procs, c.procs), Ksoftirqd: c.softirqd - o.softirqd,
	}
}

func foreignDelta(before, after map[int]time.Duration) time.Duration {
	var d time.Duration
	for pid, t := range after {
		d += max(0, t-before[pid]) // a pid new since before counts whole
	}
	return d
}

// foreignProcs returns the CPU time of every user process (no kernel
// threads) other than this one and its children, and the total of the
// ksoftirqd threads.
func foreignProcs() (map[int]time.Duration, time.Duration) {
	self := os.Getpid()
	out := map[int]time.Duration{}
	var softirqd time.Duration
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return out, 0
	}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self {
			continue
		}
		st, err := readProcStat(pid)
		if err != nil {
			continue
		}
		switch {
		case st.kthread:
			if strings.HasPrefix(st.comm, "ksoftirqd/") {
				softirqd += st.cpu
			}
		case st.ppid != self:
			out[pid] = st.cpu
		}
	}
	return out, softirqd
}

var clkTck = time.Second / 100 // USER_HZ; 100 on every Linux architecture that matters here

func sampleCPU(balancerPID int) (cpuUse, error) {
	var c cpuUse
	c.procs, c.softirqd = foreignProcs()
	c.Wall = time.Duration(time.Now().UnixNano())
	f, err := os.Open("/proc/stat")
	if err != nil {
		return c, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 9 || fields[0] != "cpu" {
			continue
		}
		// user nice system idle iowait irq softirq steal
		v := make([]time.Duration, 8)
		for i := range v {
			n, _ := strconv.ParseInt(fields[i+1], 10, 64)
			v[i] = time.Duration(n) * clkTck
		}
		c.User, c.System, c.Softirq, c.Steal = v[0]+v[1], v[2]+v[5], v[6], v[7]
		c.Busy = c.User + c.System + c.Softirq
		break
	}
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		return c, err
	}
	c.TestProc = time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	if balancerPID != 0 {
		st, err := readProcStat(balancerPID)
		if err != nil {
			return c, err
		}
		c.Balancer = st.cpu
	}
	return c, nil
}

// procStat is what the benchmarks read of /proc/<pid>/stat.
type procStat struct {
	comm    string // the command name, without its parentheses
	ppid    int
	kthread bool          // PF_KTHREAD
	cpu     time.Duration // utime + stime
	user    time.Duration // utime
}

func readProcStat(pid int) (procStat, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return procStat{}, err
	}
	s := string(b)
	// Fields after the command name, which is in parentheses and may hold spaces.
	open, end := strings.IndexByte(s, '('), strings.LastIndexByte(s, ')')
	if open < 0 || end < open {
		return procStat{}, fmt.Errorf("/proc/%d/stat: unexpected format", pid)
	}
	f := strings.Fields(s[end+1:])
	if len(f) < 13 {
		return procStat{}, fmt.Errorf("/proc/%d/stat: too few fields", pid)
	}
	ppid, _ := strconv.Atoi(f[1])               // field 4
	flags, _ := strconv.ParseUint(f[6], 10, 64) // field 9
	ut, _ := strconv.ParseInt(f[11], 10, 64)    // field 14
	st, _ := strconv.ParseInt(f[12], 10, 64)    // field 15
	const pfKthread = 0x00200000
	return procStat{comm: s[open+1 : end], ppid: ppid, kthread: flags&pfKthread != 0,
		cpu: time.Duration(ut+st) * clkTck, user: time.Duration(ut) * clkTck}, nil
}

func tvDur(tv syscall.Timeval) time.Duration {
	return time.Duration(tv.Sec)*time.Second + time.Duration(tv.Usec)*time.Microsecond
}

// procStatus reads a "Key: value kB" field of /proc/<pid>/status in bytes.
func procStatus(pid int, key string) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		v, ok := strings.CutPrefix(line, key+":")
		if !ok {
			continue
		}
		f := strings.Fields(v)
		if len(f) != 2 || f[1] != "kB" {
			return 0, fmt.Errorf("/proc/%d/status: %s: unexpected %q", pid, key, v)
		}
		n, err := strconv.ParseInt(f[0], 10, 64)
		return n << 10, err
	}
	return 0, fmt.Errorf("/proc/%d/status: no %s", pid, key)
}

// wrkReport is wrk 4.1's report of a run, for the parser tests.
const wrkReport = `Running 5s test @ http://198.18.0.100/
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.31ms  812.44us  21.05ms   88.12%
    Req/Sec    13.81k   620.31    14.73k    82.00%
  Latency Distribution
     50%    2.17ms
     75%    2.52ms
     90%    3.01ms
     99%  512.00us
  68712 requests in 5.00s, 9.57MB read
  Socket errors: connect 0, read 3, write 0, timeout 1
  Non-2xx or 3xx responses: 2
Requests/sec:  13739.52
Transfer/sec:      1.91MB
`

// TestParseWrk checks the parser on wrk 4.1's report; it needs no root.
func TestParseWrk(t *testing.T) {
	out := wrkReport
	r, err := parseWrk(out)
	if err != nil {
		t.Fatal(err)
	}
	want := wrkResult{Requests: 68712, Elapsed: 5 * time.Second, ReqPerSec: 13739.52,
		P50: 2170 * time.Microsecond, P99: 512 * time.Microsecond, Read: 3, Timeout: 1, Non2xx: 2}
	if !reflect.DeepEqual(r, want) {
		t.Errorf("parseWrk:\n got %+v\nwant %+v", r, want)
	}
	if r.errors() != 6 {
		t.Errorf("errors() = %d, want 6", r.errors())
	}
	if _, err := parseWrk("unable to connect to 198.18.0.100:80 Connection refused\n"); err == nil {
		t.Error("parseWrk accepted a failed run")
	}
	args := strings.Join(wrkArgs("http://x/", true), " ")
	if args != "-t 1 -c 32 -d 4s --timeout 2s --latency -H Connection: close http://x/" {
		t.Errorf("wrkArgs = %q", args)
	}
}

// share is d as a percentage of all CPUs over the interval.
func (c cpuUse) share(d time.Duration) float64 {
	return 100 * d.Seconds() / (float64(runtime.NumCPU()) * c.Wall.Seconds())
}
