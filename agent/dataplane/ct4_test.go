package dataplane

import (
	"encoding/binary"
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/gopacket/gopacket/layers"
)

// The agent finds an IPv4 flow in the set the program put it in: its
// hash and set index are the program's.
func TestLookupFlow4FindsTheProgramsEntry(t *testing.T) {
	h := standardHarness(t)
	for port := uint16(40000); port < 40200; port++ {
		p := pkt{src: client4, dst: vip4, sport: port, dport: 80, proto: layers.IPProtocolTCP, tcpFlags: "S"}
		real := flowReal(t, h, p)
		k := flow4Key(p)
		e, err := h.dp.lookupFlow4(k)
		if err != nil {
			t.Fatalf("port %d: %v", port, err)
		}
		if e.RealId != real {
			t.Fatalf("port %d: entry names real %d, the flow went to %d", port, e.RealId, real)
		}
	}
}

// flow4Key is the conntrack key of an IPv4 test flow.
func flow4Key(p pkt) balancerVfFlow4Key {
	src, dst := netip.MustParseAddr(p.src).As4(), netip.MustParseAddr(p.dst).As4()
	var sp, dp [2]byte
	binary.BigEndian.PutUint16(sp[:], p.sport)
	binary.BigEndian.PutUint16(dp[:], p.dport)
	return balancerVfFlow4Key{Src: binary.LittleEndian.Uint32(src[:]), Dst: binary.LittleEndian.Uint32(dst[:]),
		Sport: binary.LittleEndian.Uint16(sp[:]), Dport: binary.LittleEndian.Uint16(dp[:]), Proto: uint8(p.proto)}
}

// A slot whose entry does not match its check (what a CPU reads while
// another one rewrites the slot) is a miss: the packet is balanced again,
// not sent to the real the torn entry names.
func TestTornConntrackSlotIsAMiss(t *testing.T) {
	h := newHarness(t, Options{})
	flow := flowOnReal1(t, h)
	// Real 2 written over the entry, the check left as it was.
	k := flow4Key(flow)
	idx := ct4SetIndex(k, h.dp.objs.VfCt4.MaxEntries())
	var set balancerVfCt4Set
	h.must(h.dp.objs.VfCt4.Lookup(idx, &set))
	torn := false
	for w := range set.Way {
		key := set.Way[w].Key
		key.Pad = [3]uint8{}
		if key == k {
			set.Way[w].Entry.RealId = 2
			torn = true
		}
	}
	if !torn {
		t.Fatal("the flow's slot is not in its set")
	}
	h.must(h.dp.objs.VfCt4.Update(idx, &set, ebpf.UpdateExist))
	flow.tcpFlags = "A"
	if got := flowReal(t, h, flow); got != 1 {
		t.Fatalf("a packet of the flow went to real %d, which only the torn entry names", got)
	}
	if e, err := h.dp.lookupFlow4(k); err != nil || e.RealId != 1 {
		t.Fatalf("after the miss, the flow's entry is %+v (%v), want real 1 again", e, err)
	}
}

// A set that is full gives a new flow the slot seen least recently; the
// other flows keep theirs.
func TestFullConntrackSetEvictsTheOldest(t *testing.T) {
	h := newHarness(t, Options{ConntrackSize: 1024})
	h.real(1, real4a)
	h.vip(vip4, 80, ProtoTCP, VIPMeta{ID: 1, Mode: ModeDSR}, 1)
	sets := h.dp.objs.VfCt4.MaxEntries()
	// Flows of one set, found by the set index the program uses.
	var same []pkt
	for port := uint16(1024); len(same) < int(ct4Ways)+1; port++ {
		p := pkt{src: client4, dst: vip4, sport: port, dport: 80, proto: layers.IPProtocolTCP, tcpFlags: "S"}
		if ct4SetIndex(flow4Key(p), sets) == ct4SetIndex(flow4Key(pkt{src: client4, dst: vip4, sport: 1024, dport: 80, proto: layers.IPProtocolTCP}), sets) {
			same = append(same, p)
		}
	}
	for _, p := range same[:ct4Ways] {
		flowReal(t, h, p)
	}
	// Make the first flow the oldest.
	k0 := flow4Key(same[0])
	idx := ct4SetIndex(k0, sets)
	var set balancerVfCt4Set
	h.must(h.dp.objs.VfCt4.Lookup(idx, &set))
	for w := range set.Way {
		key := set.Way[w].Key
		key.Pad = [3]uint8{}
		if key == k0 {
			set.Way[w].Entry.LastSeen--
		}
	}
	h.must(h.dp.objs.VfCt4.Update(idx, &set, ebpf.UpdateExist))
	flowReal(t, h, same[ct4Ways])
	if _, err := h.dp.lookupFlow4(k0); err == nil {
		t.Fatal("the oldest flow of the full set is still there")
	}
	for _, p := range same[1:] {
		if _, err := h.dp.lookupFlow4(flow4Key(p)); err != nil {
			t.Fatalf("flow from port %d: %v", p.sport, err)
		}
	}
}

// Flows lists every IPv4 flow, read from the table of sets in batches.
func TestFlowsListsEverySet(t *testing.T) {
	h := newHarness(t, Options{ConntrackSize: 1 << 16}) // 8,192 sets: two batches
	h.real(1, real4a)
	h.vip(vip4, 80, ProtoTCP, VIPMeta{ID: 1, Mode: ModeDSR}, 1)
	sets := h.dp.objs.VfCt4.MaxEntries()
	const n = 300
	inSecondHalf := 0
	for port := uint16(20000); port < 20000+n; port++ {
		p := pkt{src: client4, dst: vip4, sport: port, dport: 80, proto: layers.IPProtocolTCP, tcpFlags: "S"}
		flowReal(t, h, p)
		if ct4SetIndex(flow4Key(p), sets) >= sets/2 {
			inSecondHalf++
		}
	}
	if inSecondHalf == 0 {
		t.Fatal("no flow landed in the second batch of sets: the test proves nothing")
	}
	flows, err := h.dp.Flows(0)
	h.must(err)
	if len(flows) != n {
		t.Fatalf("Flows lists %d flows, want %d", len(flows), n)
	}
	if limited, err := h.dp.Flows(10); err != nil || len(limited) != 10 {
		t.Fatalf("Flows(10) = %d flows, %v", len(limited), err)
	}
}
