package dataplane

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"runtime"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/gopacket/gopacket/layers"
	"github.com/veloflux/veloflux/agent/maglev"
	"golang.org/x/sys/unix"
)

// The per-packet cost is the kernel's own measurement from BPF_PROG_RUN
// (docs/ARCHITECTURE.md, "Measuring"). Paths that leave the packet as it is run
// with Repeat; paths that rewrite it (encapsulation) or need a new packet
// per call (new flows) run many Repeat=1 calls and average the kernel's
// durations, because a repeated run would process its own output. The
// non-VIP path is measured both ways, since the two are not comparable: a
// Repeat=1 call runs with caches the syscall has just cooled. A trivial
// XDP_PASS program, measured the same way in the same sub-benchmark, is the
// floor, and every result is also reported as ns above that floor.
//
// Everything runs on one CPU, the conntrack fill included: with
// BPF_F_NO_COMMON_LRU each CPU evicts from its own list of max/ncpu
// entries, so a fill from another CPU would leave the measured CPU's list
// half empty and the "full table" would not be full where it is measured.

const benchRealsPerVIP = 100

// benchGUEPort is the VIP port (not the GUE port) of the measured VIP's gue service.
const benchGUEPort = 6081

type benchFixture struct {
	h     *harness
	floor *ebpf.Program
	vips  int
	cpu   int // where the fill ran, and where every measurement must run
	nat   bool
}

// benchSNAT is the SNAT address of the nat VIPs addNAT adds.
var benchSNAT = netip.MustParseAddr("10.0.0.100")

// addNAT makes VIP v serve nat on :8000 too (id 2*vips+v, the same ring)
// and sets the port range. It is not part of newBenchFixture, so that the
// other classes (and whoever reuses the fixture) measure the program with
// nat off, as a balancer without nat VIPs runs it.
func (f *benchFixture) addNAT(b *testing.B) {
	b.Helper()
	if f.nat {
		return
	}
	s, err := f.h.dp.Settings()
	f.h.must(err)
	s.NAT = NATSettings{PortMin: 1024, PortMax: 65535, ClosingTimeoutNs: 10e9}
	f.h.must(f.h.dp.SetSettings(s))
	for v := 0; v < f.vips; v++ {
		ring, err := f.h.dp.Ring(uint32(2 * v))
		f.h.must(err)
		id := uint32(2*f.vips + v)
		f.h.must(f.h.dp.SetRing(id, ring))
		addr := netip.AddrFrom4([4]byte{10, 200, byte(v >> 8), byte(v)})
		f.h.must(f.h.dp.SetVIP(VIP{addr, 8000, ProtoTCP}, VIPMeta{ID: id, Mode: ModeNAT,
			NAT: NATTarget{SNAT: benchSNAT, RealPort: 9000}}))
	}
	f.nat = true
}

// newBenchFixture pins the calling goroutine to one CPU before it fills
// conntrack: the CPU its thread is already confined to, if one, else the
// lowest it may use. Sub-benchmarks run in goroutines of their own and
// call pin to join it.
func newBenchFixture(b *testing.B, vips int, ctSize uint32, prefill bool) *benchFixture {
	b.Helper()
	cpu := pinBenchThread(b, -1)
	h := newHarness(b, Options{
		RingSize:      maglev.DefaultTableSize,
		ConntrackSize: ctSize,
		MaxVIPs:       uint32(vips*3 + 8),
		MaxReals:      uint32(vips*benchRealsPerVIP + 8),
	})
	// The reals share the balancer's MAC. A Repeat run feeds the program
	// its own output, so with the real's MAC as the destination every run
	// after the first would be another host's frame (pass_not_our_mac);
	// this way each run is a frame to us and does the work of the first.
	realID := uint32(1)
	for v := 0; v < vips; v++ {
		backends := make([]maglev.Backend, benchRealsPerVIP)
		for r := range backends {
			addr := netip.AddrFrom4([4]byte{10, byte(1 + v>>8), byte(v), byte(1 + r)})
			h.must(h.dp.SetReal(realID, Real{Addr: addr, MAC: lbMAC, State: RealUp}))
			backends[r] = maglev.Backend{ID: realID, Key: addr.String(), Weight: 1}
			realID++
		}
		ring, err := maglev.Build(backends, h.dp.RingSize())
		h.must(err)
		// VIP v serves dsr on :80 and ipip on :8080 with the same ring.
		addr := netip.AddrFrom4([4]byte{10, 200, byte(v >> 8), byte(v)})
		h.must(h.dp.SetRing(uint32(2*v), ring))
		h.must(h.dp.SetRing(uint32(2*v+1), ring))
		h.must(h.dp.SetVIP(VIP{addr, 80, ProtoTCP}, VIPMeta{ID: uint32(2 * v), Mode: ModeDSR}))
		h.must(h.dp.SetVIP(VIP{addr, 8080, ProtoTCP}, VIPMeta{ID: uint32(2*v + 1), Mode: ModeIPIP}))
		if v == vips/2 {
			// The measured VIP (vipAddr) also serves gue on :6081, with
			// the first id past the pairs.
			h.must(h.dp.SetRing(uint32(2*vips), ring))
			h.must(h.dp.SetVIP(VIP{addr, benchGUEPort, ProtoTCP}, VIPMeta{ID: uint32(2 * vips), Mode: ModeGUE}))
		}
	}
	if prefill {
		fillConntrack(b, h.dp, int(ctSize))
	}
	floor, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:         ebpf.XDP,
		License:      "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 2), asm.Return()},
	})
	h.must(err)
	b.Cleanup(func() { floor.Close() })
	return &benchFixture{h: h, floor: floor, vips: vips, cpu: cpu}
}

// pin puts the calling goroutine on the fixture's CPU.
func (f *benchFixture) pin(b *testing.B) { pinBenchThread(b, f.cpu) }

// pinBenchThread locks the goroutine to its thread and the thread to cpu,
// or, with cpu < 0, to the lowest CPU it may run on (the harness of a
// caller that pinned the thread already keeps its CPU). It returns the CPU. The thread is never unlocked: it ends with
// the goroutine instead of serving others with a narrowed affinity.
func pinBenchThread(b *testing.B, cpu int) int {
	b.Helper()
	runtime.LockOSThread()
	if cpu < 0 {
		var set unix.CPUSet
		if err := unix.SchedGetaffinity(0, &set); err != nil {
			b.Fatalf("read CPU affinity: %v", err)
		}
		for i := 0; i < len(set)*64 && cpu < 0; i++ {
			if set.IsSet(i) {
				cpu = i
			}
		}
		if set.Count() == 1 {
			return cpu
		}
	}
	var set unix.CPUSet
	set.Set(cpu)
	if err := unix.SchedSetaffinity(0, &set); err != nil {
		b.Fatalf("pin to CPU %d: %v", cpu, err)
	}
	return cpu
}

// fillConntrack fills the table with n unrelated flows, so lookups walk a
// full hash table and every new flow evicts. The inserts go to the LRU
// list of the CPU the caller runs on (newBenchFixture pins it first); n is
// the table's total size, so that list is filled twice over.
func fillConntrack(b *testing.B, dp *Dataplane, n int) {
	b.Helper()
	const chunk = 1 << 13
	rng := rand.New(rand.NewPCG(1, 2))
	sets := int(ct4Sets(uint32(n)))
	keys := make([]uint32, 0, chunk)
	vals := make([]balancerVfCt4Set, 0, chunk)
	for i := 0; i < sets; i++ {
		var set balancerVfCt4Set
		for w := range set.Way {
			set.Way[w].Key = balancerVfFlow4Key{
				Src: rng.Uint32(), Dst: rng.Uint32(), Sport: uint16(rng.Uint32()), Dport: htons(80), Proto: 6,
			}
			set.Way[w].Entry = balancerVfCtEntry{RealId: 1, LastSeen: 1}
			set.Way[w].Key.Pad = ct4Check(flowHash4(set.Way[w].Key), set.Way[w].Entry)
		}
		keys, vals = append(keys, uint32(i)), append(vals, set)
		if len(keys) == chunk || i == sets-1 {
			if _, err := dp.objs.VfCt4.BatchUpdate(keys, vals, nil); err != nil {
				b.Fatalf("prefill conntrack: %v", err)
			}
			keys, vals = keys[:0], vals[:0]
		}
	}
}

func (f *benchFixture) vipAddr() string {
	v := f.vips / 2 // a VIP from the middle of the table
	return netip.AddrFrom4([4]byte{10, 200, byte(v >> 8), byte(v)}).String()
}

// repeated measures with Repeat = b.N; singles averages b.N Repeat=1 runs,
// with next giving the packet of each run.
func repeated(b *testing.B, prog *ebpf.Program, pkt []byte) float64 {
	_, d, err := prog.Benchmark(pkt, b.N, nil)
	if err != nil {
		b.Fatal(err)
	}
	return float64(d.Nanoseconds())
}

// singles interleaves b.N Repeat=1 runs of the floor and of prog, so both
// see the same machine noise, and returns the two averages. next gives the
// packet of run i.
func singles(b *testing.B, floorProg, prog *ebpf.Program, next func(i int) []byte, wantRet uint32) (float64, float64) {
	var floorTotal, total time.Duration
	for i := 0; i < b.N; i++ {
		pkt := next(i)
		_, d, err := floorProg.Benchmark(pkt, 1, nil)
		if err != nil {
			b.Fatal(err)
		}
		floorTotal += d
		ret, d, err := prog.Benchmark(pkt, 1, nil)
		if err != nil {
			b.Fatal(err)
		}
		if wantRet != 0 && ret != wantRet {
			b.Fatalf("run %d returned %d, want %d", i, ret, wantRet)
		}
		total += d
	}
	n := float64(b.N)
	return float64(floorTotal.Nanoseconds()) / n, float64(total.Nanoseconds()) / n
}

func report(b *testing.B, ns, floor float64) {
	b.ReportMetric(ns, "ns/pkt")
	b.ReportMetric(floor, "floor-ns/pkt")
	b.ReportMetric(ns-floor, "ns-above-floor")
	b.ReportMetric(0, "ns/op") // wall time per op is syscall overhead, not the program's cost
}

// BenchmarkXDP measures each class the way its Katran counterpart is
// measured (docs/BENCHMARKS.md): established and non-VIP frames are 118-byte
// TCP ACKs with 64 bytes of payload, new-flow frames 54-byte TCP SYNs of a
// new 5-tuple each. Katran always encapsulates, so ipip is its counterpart;
// dsr has none and is measured for itself. mode nat is measured last, in
// the same run, for its three paths (client to real, the real's reply, a
// new flow with its port allocation) and for what it adds to packets to
// no VIP.
func BenchmarkXDP(b *testing.B) {
	requirePrivileged(b)
	tcp := layers.IPProtocolTCP
	for _, nVIPs := range []int{1, 1000} {
		b.Run(fmt.Sprintf("vips=%d/ct=1M", nVIPs), func(b *testing.B) {
			f := newBenchFixture(b, nVIPs, 1<<20, true)
			prog := f.h.dp.objs.VfBalancer
			vip := f.vipAddr()
			dsr := pkt{src: client4, dst: vip, sport: 33000, dport: 80, proto: tcp, tcpFlags: "A", payload: make([]byte, 64)}.frame(b)
			ipip := pkt{src: client4, dst: vip, sport: 33001, dport: 8080, proto: tcp, tcpFlags: "A", payload: make([]byte, 64)}.frame(b)
			nonVIP := pkt{src: client4, dst: "10.250.0.1", sport: 33002, dport: 80, proto: tcp, tcpFlags: "A", payload: make([]byte, 64)}.frame(b)
			gue := pkt{src: client4, dst: vip, sport: 33003, dport: benchGUEPort, proto: tcp, tcpFlags: "A", payload: make([]byte, 64)}.frame(b)
			for _, p := range [][]byte{dsr, ipip, gue} { // establish the flows
				if ret, _, err := prog.Test(p); err != nil || Verdict(ret) != VerdictTx {
					b.Fatalf("setup packet: verdict %d, %v", ret, err)
				}
			}

			b.Run("established-dsr", func(b *testing.B) {
				f.pin(b)
				floor := repeated(b, f.floor, dsr)
				sent := f.h.counters()[ReasonTxDSR].Packets
				report(b, repeated(b, prog, dsr), floor)
				// Every repeat must have been forwarded, not only the first.
				if n := f.h.counters()[ReasonTxDSR].Packets - sent; n != uint64(b.N) {
					b.Fatalf("%d of %d runs were forwarded", n, b.N)
				}
			})
			b.Run("established-ipip", func(b *testing.B) {
				f.pin(b)
				floor, ns := singles(b, f.floor, prog, func(int) []byte { return ipip }, uint32(VerdictTx))
				report(b, ns, floor)
			})
			b.Run("established-gue", func(b *testing.B) {
				f.pin(b)
				floor, ns := singles(b, f.floor, prog, func(int) []byte { return gue }, uint32(VerdictTx))
				report(b, ns, floor)
			})
			b.Run("new-flow-ipip", func(b *testing.B) {
				f.pin(b)
				floor, ns := singles(b, f.floor, prog, newFlowSource(b, vip, 8080), uint32(VerdictTx))
				report(b, ns, floor)
			})
			b.Run("new-flow-dsr", func(b *testing.B) {
				f.pin(b)
				floor, ns := singles(b, f.floor, prog, newFlowSource(b, vip, 80), uint32(VerdictTx))
				report(b, ns, floor)
			})
			// The same new flows with the per-source limit on and never
			// reached: what the bucket lookup and refill add.
			b.Run("new-flow-ipip-limit-on", func(b *testing.B) {
				f.pin(b)
				s, err := f.h.dp.Settings()
				f.h.must(err)
				s.NewFlowLimit = NewFlowLimit{RatePerSecond: MaxNewFlowRate, Burst: MaxNewFlowBurst}
				f.h.must(f.h.dp.SetSettings(s))
				defer func() {
					s.NewFlowLimit = NewFlowLimit{}
					f.h.must(f.h.dp.SetSettings(s))
				}()
				floor, ns := singles(b, f.floor, prog, newFlowSource(b, vip, 8080), uint32(VerdictTx))
				report(b, ns, floor)
			})
			b.Run("non-vip", func(b *testing.B) {
				f.pin(b)
				floor := repeated(b, f.floor, nonVIP)
				report(b, repeated(b, prog, nonVIP), floor)
			})
			b.Run("non-vip-singles", func(b *testing.B) {
				f.pin(b)
				floor, ns := singles(b, f.floor, prog, func(int) []byte { return nonVIP }, uint32(VerdictPass))
				report(b, ns, floor)
			})

			// mode nat, next to the classes above and measured alike; the
			// nat VIPs are added only now, so the classes above ran with
			// nat off.
			natFlow := pkt{src: client4, dst: vip, sport: 33003, dport: 8000, proto: tcp, tcpFlags: "A", payload: make([]byte, 64)}
			var natIn, replyIn []byte
			setupNAT := func(b *testing.B) {
				f.addNAT(b)
				if natIn != nil {
					return
				}
				natIn = natFlow.frame(b)
				if ret, _, err := prog.Test(natIn); err != nil || Verdict(ret) != VerdictTx {
					b.Fatalf("nat setup packet: verdict %d, %v", ret, err)
				}
				flows, err := f.h.dp.NATFlows(0)
				f.h.must(err)
				for _, fl := range flows {
					if fl.Client.Port() == natFlow.sport {
						replyIn = pkt{src: fl.Real.Addr().String(), dst: fl.SNAT.Addr().String(), sport: fl.Real.Port(),
							dport: fl.SNAT.Port(), proto: tcp, tcpFlags: "A", payload: make([]byte, 64)}.frame(b)
					}
				}
				if replyIn == nil {
					b.Fatal("no nat flow after the setup packet")
				}
			}
			b.Run("established-nat", func(b *testing.B) {
				f.pin(b)
				setupNAT(b)
				floor, ns := singles(b, f.floor, prog, func(int) []byte { return natIn }, uint32(VerdictTx))
				report(b, ns, floor)
			})
			b.Run("reply-nat", func(b *testing.B) {
				f.pin(b)
				setupNAT(b)
				floor, ns := singles(b, f.floor, prog, func(int) []byte { return replyIn }, uint32(VerdictTx))
				report(b, ns, floor)
			})
			b.Run("new-flow-nat", func(b *testing.B) {
				f.pin(b)
				setupNAT(b)
				floor, ns := singles(b, f.floor, prog, newFlowSource(b, vip, 8000), uint32(VerdictTx))
				report(b, ns, floor)
			})
			// What the reverse-path hook costs every packet to no VIP
			// while some VIP is nat: a flag test and the SNAT address map.
			b.Run("non-vip-nat-on", func(b *testing.B) {
				f.pin(b)
				setupNAT(b)
				floor := repeated(b, f.floor, nonVIP)
				report(b, repeated(b, prog, nonVIP), floor)
			})
		})
	}
	// Katran's other new-flow figure: a 1k LRU that keeps evicting.
	b.Run("vips=1/ct=1k/new-flow-ipip", func(b *testing.B) {
		f := newBenchFixture(b, 1, 1024, true)
		floor, ns := singles(b, f.floor, f.h.dp.objs.VfBalancer, newFlowSource(b, f.vipAddr(), 8080), uint32(VerdictTx))
		report(b, ns, floor)
	})
}

// newFlowSource gives a 54-byte SYN of a flow never seen before on every
// call: the source port changes each time, the source address every 60,000
// ports. The sequence restarts with each call of newFlowSource, and the
// frame is one buffer rewritten in place.
func newFlowSource(b *testing.B, vip string, dport uint16) func(i int) []byte {
	base := pkt{src: client4, dst: vip, sport: 1024, dport: dport, proto: layers.IPProtocolTCP, tcpFlags: "S"}.frame(b)
	frame := append([]byte(nil), base...)
	const ipOff, tcpOff = 14, 14 + 20
	return func(i int) []byte {
		port := uint16(1024 + i%60000)
		frame[ipOff+14] = byte(i / 60000 >> 8) // source address, third octet
		frame[ipOff+15] = byte(i / 60000)      // source address, last octet
		frame[tcpOff] = byte(port >> 8)
		frame[tcpOff+1] = byte(port)
		return frame
	}
}
