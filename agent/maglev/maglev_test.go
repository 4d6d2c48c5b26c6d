package maglev

import (
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"
)

// makeBackends returns n backends with ids 1..n, keys "10.0.x.y:80" and the
// weight given by weight(i).
func makeBackends(n int, weight func(i int) uint32) []Backend {
	bs := make([]Backend, n)
	for i := range bs {
		bs[i] = Backend{
			ID:     uint32(i + 1),
			Key:    fmt.Sprintf("10.0.%d.%d:80", i/250, i%250+1),
			Weight: weight(i),
		}
	}
	return bs
}

func equalWeight(int) uint32 { return 1 }

func mustBuild(t testing.TB, bs []Backend, m uint32) []uint32 {
	t.Helper()
	table, err := Build(bs, m)
	if err != nil {
		t.Fatalf("Build: %v", err)
	}
	if len(table) != int(m) {
		t.Fatalf("table has %d slots, want %d", len(table), m)
	}
	return table
}

func counts(table []uint32) map[uint32]int {
	c := make(map[uint32]int)
	for _, id := range table {
		c[id]++
	}
	return c
}

func TestEqualWeightsShare(t *testing.T) {
	const n = 100
	m := uint32(DefaultTableSize)
	table := mustBuild(t, makeBackends(n, equalWeight), m)
	c := counts(table)
	if len(c) != n {
		t.Fatalf("table holds %d distinct ids, want %d", len(c), n)
	}
	ideal := float64(m) / n
	worst := 0.0
	for id, got := range c {
		dev := math.Abs(float64(got)-ideal) / ideal
		worst = max(worst, dev)
		if dev > 0.01 {
			t.Errorf("id %d owns %d slots, ideal %.1f (deviation %.3f%%)", id, got, ideal, 100*dev)
		}
	}
	t.Logf("N=%d M=%d: worst share deviation %.3f%% of M/N=%.1f", n, m, 100*worst, ideal)
}

func TestRemovalDisruption(t *testing.T) {
	const n = 100
	m := uint32(DefaultTableSize)
	all := makeBackends(n, equalWeight)
	before := mustBuild(t, all, m)
	limit := 1.5 * float64(m) / n

	worst, worstID := 0, uint32(0)
	total := 0
	for i := range all {
		rest := slices.Delete(slices.Clone(all), i, i+1)
		after := mustBuild(t, rest, m)
		changed := 0
		for s := range before {
			if before[s] != after[s] {
				changed++
			}
			if after[s] == all[i].ID {
				t.Fatalf("removed id %d still owns slot %d", all[i].ID, s)
			}
		}
		total += changed
		if changed > worst {
			worst, worstID = changed, all[i].ID
		}
		if float64(changed) > limit {
			t.Errorf("removing id %d changed %d slots, limit %.0f", all[i].ID, changed, limit)
		}
	}
	t.Logf("N=%d M=%d: removing one backend changes at worst %d slots (%.3f/N, id %d), mean %.1f (%.3f/N); M/N=%.1f",
		n, m, worst, float64(worst)*n/float64(m), worstID,
		float64(total)/n, float64(total)/float64(m), float64(m)/n)
}

func TestWeightedShares(t *testing.T) {
	m := uint32(DefaultTableSize)
	rng := rand.New(rand.NewPCG(1, 2))
	sets := []struct {
		name string
		bs   []Backend
	}{
		{"4 backends 1..4", makeBackends(4, func(i int) uint32 { return uint32(i + 1) })},
		{"40 backends cycling 1..4", makeBackends(40, func(i int) uint32 { return uint32(i%4 + 1) })},
		{"100 backends cycling 4..1", makeBackends(100, func(i int) uint32 { return uint32(4 - i%4) })},
		{"100 backends random 1..4", makeBackends(100, func(int) uint32 { return uint32(rng.IntN(4) + 1) })},
		{"100 backends cycling 10..40", makeBackends(100, func(i int) uint32 { return uint32(10 * (i%4 + 1)) })},
	}
	for _, set := range sets {
		t.Run(set.name, func(t *testing.T) {
			var sum uint64
			for _, b := range set.bs {
				sum += uint64(b.Weight)
			}
			c := counts(mustBuild(t, set.bs, m))
			worst := 0.0
			for _, b := range set.bs {
				ideal := float64(b.Weight) / float64(sum) * float64(m)
				dev := math.Abs(float64(c[b.ID])-ideal) / ideal
				worst = max(worst, dev)
				if dev > 0.02 || math.Abs(float64(c[b.ID])-ideal) >= 1 {
					t.Errorf("id %d weight %d owns %d slots, ideal %.1f (deviation %.3f%%)",
						b.ID, b.Weight, c[b.ID], ideal, 100*dev)
				}
			}
			t.Logf("worst weighted share deviation %.3f%%", 100*worst)
		})
	}
}

// TestRandomSets checks the documented invariants on many small random
// configurations, where m close to the backend count and uneven weights reach
// the corner cases (rounding slots, zero quotas raised to one, long hunts for
// the last free slots).
func TestRandomSets(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	primes := []uint32{2, 3, 5, 7, 11, 13, 31, 97, 251, 1009, 4099}
	for iter := range 500 {
		m := primes[rng.IntN(len(primes))]
		n := 1 + rng.IntN(int(min(m, 60)))
		bs := makeBackends(n, func(int) uint32 {
			switch rng.IntN(4) {
			case 0:
				return 0
			case 1:
				return uint32(rng.IntN(5)) + 1
			case 2:
				return rng.Uint32()
			default:
				return uint32(rng.IntN(1000)) + 1
			}
		})
		table := mustBuild(t, bs, m)
		c := counts(table)
		var sum float64
		weighted := 0
		for _, b := range bs {
			sum += float64(b.Weight)
			if b.Weight > 0 {
				weighted++
			}
		}
		if weighted == 0 {
			if len(c) != 1 || c[0] != int(m) {
				t.Fatalf("iter %d: all-zero weights gave %v", iter, c)
			}
			continue
		}
		if c[0] != 0 {
			t.Fatalf("iter %d: %d empty slots", iter, c[0])
		}
		// Shares are exact to within one slot, unless some share was below
		// one slot and was raised to one at the expense of the largest
		// quotas, one slot each.
		slack := 1.0
		for _, b := range bs {
			if b.Weight > 0 && float64(b.Weight)/sum*float64(m) < 1 {
				slack += 1
			}
		}
		for _, b := range bs {
			got := c[b.ID]
			if b.Weight == 0 {
				if got != 0 {
					t.Fatalf("iter %d: zero-weight id %d owns %d slots", iter, b.ID, got)
				}
				continue
			}
			exact := float64(b.Weight) / sum * float64(m)
			if got == 0 || math.Abs(float64(got)-exact) >= slack {
				t.Fatalf("iter %d: id %d weight %d owns %d slots of %d, exact share %.2f",
					iter, b.ID, b.Weight, got, m, exact)
			}
		}
		shuffled := slices.Clone(bs)
		rng.Shuffle(len(shuffled), func(i, j int) { shuffled[i], shuffled[j] = shuffled[j], shuffled[i] })
		if !slices.Equal(mustBuild(t, shuffled, m), table) {
			t.Fatalf("iter %d: shuffled input gives a different table", iter)
		}
	}
}

func TestZeroWeightExcluded(t *testing.T) {
	m := uint32(DefaultTableSize)
	bs := makeBackends(20, func(i int) uint32 { return uint32(i%4 + 1) })
	drained := bs[7]
	bs[7].Weight = 0
	table := mustBuild(t, bs, m)
	if slices.Contains(table, drained.ID) {
		t.Fatalf("zero-weight id %d appears in the table", drained.ID)
	}
	// A zero-weight backend must be indistinguishable from an absent one, or
	// draining a real would reshuffle the others.
	without := mustBuild(t, slices.Delete(slices.Clone(bs), 7, 8), m)
	if !slices.Equal(table, without) {
		t.Fatal("table with a zero-weight backend differs from the table without it")
	}
}

func TestOrderIndependence(t *testing.T) {
	m := uint32(DefaultTableSize)
	bs := makeBackends(100, func(i int) uint32 { return uint32(i%5 + 1) })
	orig := slices.Clone(bs)
	want := mustBuild(t, bs, m)
	if !slices.Equal(bs, orig) {
		t.Fatal("Build modified its input")
	}
	rng := rand.New(rand.NewPCG(3, 4))
	for range 10 {
		shuffled := slices.Clone(bs)
		rng.Shuffle(len(shuffled), func(i, j int) { shuffled[i], shuffled[j] = shuffled[j], shuffled[i] })
		if got := mustBuild(t, shuffled, m); !slices.Equal(got, want) {
			t.Fatal("shuffled input gives a different table")
		}
	}
	slices.Reverse(bs)
	if got := mustBuild(t, bs, m); !slices.Equal(got, want) {
		t.Fatal("reversed input gives a different table")
	}
}

func TestAllSlotsFilled(t *testing.T) {
	cases := []struct {
		name string
		bs   []Backend
		m    uint32
	}{
		{"one backend", makeBackends(1, equalWeight), DefaultTableSize},
		{"100 equal", makeBackends(100, equalWeight), DefaultTableSize},
		{"1000 equal", makeBackends(1000, equalWeight), DefaultTableSize},
		{"mostly zero", makeBackends(50, func(i int) uint32 { return uint32(min(i%10, 1)) * 3 }), DefaultTableSize},
		{"extreme weights", makeBackends(3, func(i int) uint32 { return []uint32{1, math.MaxUint32, 7}[i] }), DefaultTableSize},
		{"m equals backends", makeBackends(7, func(i int) uint32 { return uint32(i + 1) }), 7},
		{"m=2", makeBackends(2, equalWeight), 2},
		{"m=2 one backend", makeBackends(1, equalWeight), 2},
		{"small prime", makeBackends(5, func(i int) uint32 { return uint32(i*i + 1) }), 13},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			table := mustBuild(t, tc.bs, tc.m)
			if i := slices.Index(table, 0); i >= 0 {
				t.Fatalf("slot %d is empty", i)
			}
			// Every weighted backend owns at least one slot.
			c := counts(table)
			for _, b := range tc.bs {
				if b.Weight > 0 && c[b.ID] == 0 {
					t.Errorf("weighted id %d owns no slot", b.ID)
				}
			}
		})
	}
}

func TestEveryBackendOnceWhenMEqualsN(t *testing.T) {
	bs := makeBackends(11, func(i int) uint32 { return uint32(1 + 100*i) })
	c := counts(mustBuild(t, bs, 11))
	for _, b := range bs {
		if c[b.ID] != 1 {
			t.Errorf("id %d owns %d slots, want 1", b.ID, c[b.ID])
		}
	}
}

func TestAllZeroWeights(t *testing.T) {
	for _, bs := range [][]Backend{nil, {}, makeBackends(10, func(int) uint32 { return 0 })} {
		table := mustBuild(t, bs, DefaultTableSize)
		if slices.ContainsFunc(table, func(id uint32) bool { return id != 0 }) {
			t.Fatalf("%d zero-weight backends gave a non-zero slot", len(bs))
		}
	}
}

func TestBuildErrors(t *testing.T) {
	good := makeBackends(3, equalWeight)
	cases := []struct {
		name string
		bs   []Backend
		m    uint32
	}{
		{"m zero", good, 0},
		{"m one", good, 1},
		{"m not prime", good, 65536},
		{"m not prime no backends", nil, 100},
		{"m smaller than backends", makeBackends(5, equalWeight), 3},
		{"id zero", []Backend{{ID: 1, Key: "a", Weight: 1}, {ID: 0, Key: "b", Weight: 1}}, 7},
		{"id zero with zero weight", []Backend{{ID: 1, Key: "a", Weight: 1}, {ID: 0, Key: "b"}}, 7},
		{"duplicate key", []Backend{{ID: 1, Key: "a", Weight: 1}, {ID: 2, Key: "a", Weight: 1}}, 7},
		{"duplicate id", []Backend{{ID: 1, Key: "a", Weight: 1}, {ID: 1, Key: "b", Weight: 2}}, 7},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			table, err := Build(tc.bs, tc.m)
			if err == nil {
				t.Fatalf("Build succeeded with a %d-slot table, want an error", len(table))
			}
			t.Log(err)
		})
	}
	if _, err := Build(good, 100); !errors.Is(err, ErrNotPrime) {
		t.Errorf("non-prime m: got %v, want ErrNotPrime", err)
	}
	// Zero-weight backends do not count towards the m >= backends limit.
	bs := makeBackends(5, func(i int) uint32 { return uint32(i % 2) })
	if _, err := Build(bs, 3); err != nil {
		t.Errorf("2 weighted backends in 3 slots: %v", err)
	}
}

func TestIsPrime(t *testing.T) {
	cases := []struct {
		n    uint32
		want bool
	}{
		{0, false}, {1, false}, {2, true}, {3, true}, {4, false}, {5, true},
		{9, false}, {25, false}, {49, false}, {97, true}, {121, false},
		{251, true}, {256, false}, {65521, true}, {65535, false}, {65536, false},
		{DefaultTableSize, true}, {65539, true}, {131071, true}, {655373, true},
		{65537 * 3, false}, {4294967291, true}, {4294967295, false},
		{65521 * 65521, false}, {65519 * 65521, false},
	}
	for _, tc := range cases {
		if got := IsPrime(tc.n); got != tc.want {
			t.Errorf("IsPrime(%d) = %v, want %v", tc.n, got, tc.want)
		}
	}
	// Cross-check the small range against a sieve.
	const limit = 10000
	composite := make([]bool, limit)
	for i := 2; i < limit; i++ {
		if !composite[i] {
			for j := i * i; j < limit; j += i {
				composite[j] = true
			}
		}
		if got := IsPrime(uint32(i)); got == composite[i] {
			t.Errorf("IsPrime(%d) = %v, sieve says %v", i, got, !composite[i])
		}
	}
}

func benchmarkBuild(b *testing.B, n int) {
	bs := makeBackends(n, equalWeight)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := Build(bs, DefaultTableSize); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkBuild1000(b *testing.B) { benchmarkBuild(b, 1000) }
func BenchmarkBuild100(b *testing.B)  { benchmarkBuild(b, 100) }

// BenchmarkBuild1000Skewed is the slow shape for the credit rounds: one heavy
// backend makes most rounds claim a single slot while all 1000 earn credit.
func BenchmarkBuild1000Skewed(b *testing.B) {
	bs := makeBackends(1000, func(i int) uint32 {
		if i == 0 {
			return 1000
		}
		return 1
	})
	b.ReportAllocs()
	for b.Loop() {
		if _, err := Build(bs, DefaultTableSize); err != nil {
			b.Fatal(err)
		}
	}
}

// Two nodes that number their reals differently but send every slot to
// the same address have the same fingerprint; another backend set differs.
func TestFingerprintIgnoresRealIDs(t *testing.T) {
	addrs := []netip.Addr{netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("10.0.0.2"), netip.MustParseAddr("2001:db8::3")}
	build := func(firstID uint32, n int) uint64 {
		byID := map[uint32]netip.Addr{}
		var bs []Backend
		for i, a := range addrs[:n] {
			id := firstID + uint32(i)*7
			byID[id] = a
			bs = append(bs, Backend{ID: id, Key: a.String() + ":80", Weight: 1})
		}
		table, err := Build(bs, 257)
		if err != nil {
			t.Fatal(err)
		}
		return Fingerprint(table, func(id uint32) netip.Addr { return byID[id] })
	}
	a, b := build(1, 3), build(40, 3)
	if a != b {
		t.Errorf("same backends, other real ids: fingerprints %x and %x", a, b)
	}
	if c := build(1, 2); c == a {
		t.Errorf("a different backend set has the same fingerprint %x", c)
	}
	if a >= 1<<52 {
		t.Errorf("fingerprint %x does not fit 52 bits", a)
	}
}
