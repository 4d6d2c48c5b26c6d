// Package maglev computes the per-VIP lookup table that the XDP data path
// indexes with a flow hash to pick a real. Every node must derive the same
// table from the same backend set, so that a flow keeps its real whichever
// node (or ECMP path) it lands on, and a change to the set must move as few
// flows as possible.
//
// Each backend walks its own Maglev permutation of the slots (offset and skip
// derived from its key), as in the Maglev paper. The fill rule differs from
// the paper's: backends advance along their permutations at a speed
// proportional to their weight, the first to reach a free slot takes it, and a
// backend stops once it holds its quota (its weight's share of the table,
// rounded by largest remainder). In the paper a backend's k-th claim is its
// k-th free preference, so one extra or missing claim early on shifts every
// later claim of that backend and ripples through the rest of the fill;
// here where a backend is on its permutation depends only on elapsed time,
// so a change only perturbs who wins the slots the change freed or needs, and
// quotas make shares exact rather than approximate. For 100 equal backends in
// 65537 slots, removing one moves about 1.3/N of the table against about
// 1.57/N for the paper's rule (1/N is the unavoidable minimum).
package maglev

import (
	"cmp"
	"errors"
	"fmt"
	"hash/fnv"
	"net/netip"
	"slices"
	"strings"
)

// DefaultTableSize is prime because every skip must be coprime with the table
// size for a permutation to visit every slot. Larger tables bring the flows
// moved by a backend change closer to the 1/N minimum, at the cost of BPF map
// memory per VIP.
const DefaultTableSize = 65537

// Backend is one real as seen by the table builder.
type Backend struct {
	ID     uint32 // the real id written into the ring; never 0 (0 means "no real" to the data path)
	Key    string // stable identity, e.g. "10.0.0.1:80"; drives the permutation, so the table is identical on every node
	Weight uint32 // 0 = excluded from the table
}

// ErrNotPrime is returned when the table size is not prime.
var ErrNotPrime = errors.New("maglev: table size is not prime")

// backend is the builder's working state. pos is the backend's current place
// in its permutation rather than an index into it, so advancing costs an add
// and a compare instead of a multiply and a modulo.
type backend struct {
	key    string
	id     uint32
	pos    uint32
	skip   uint32
	quota  uint32
	weight uint64
	credit uint64
	rem    uint64 // remainder of the exact share, to hand out rounding slots
	tie    uint64 // breaks equal remainders without depending on the other backends
}

// Build returns a table of size m (m must be prime and > 0) in which each slot
// holds a backend ID.
//
// A table with no weighted backend is all zeros, which the data path treats as
// "no real". Otherwise every slot is filled, every weighted backend gets at
// least one slot, and each backend's slot count is its exact share of m
// rounded up or down (except that a share below one slot is raised to one).
//
// The result depends only on the set of backends, not on their order in the
// slice, and the slice is not modified.
func Build(backends []Backend, m uint32) ([]uint32, error) {
	if !IsPrime(m) {
		return nil, fmt.Errorf("%w: %d", ErrNotPrime, m)
	}

	bs := make([]backend, len(backends))
	ids := make([]uint32, len(backends))
	for i, b := range backends {
		if b.ID == 0 {
			return nil, fmt.Errorf("maglev: backend %q has id 0, which the data path reads as no real", b.Key)
		}
		bs[i] = backend{key: b.Key, id: b.ID, weight: uint64(b.Weight)}
		ids[i] = b.ID
	}

	// Sorting by key is what makes the table independent of input order: the
	// fill loop visits backends in slice order and that order decides who wins
	// a slot two backends reach in the same round.
	slices.SortFunc(bs, func(a, b backend) int { return strings.Compare(a.key, b.key) })
	for i := 1; i < len(bs); i++ {
		if bs[i].key == bs[i-1].key {
			return nil, fmt.Errorf("maglev: duplicate backend key %q", bs[i].key)
		}
	}
	slices.Sort(ids)
	for i := 1; i < len(ids); i++ {
		if ids[i] == ids[i-1] {
			return nil, fmt.Errorf("maglev: duplicate backend id %d", ids[i])
		}
	}

	// Zero-weight backends are validated above (a malformed one is still a
	// configuration error) but must leave no trace in the table, so that
	// draining a real is the same as removing it.
	bs = slices.DeleteFunc(bs, func(b backend) bool { return b.weight == 0 })
	if uint64(len(bs)) > uint64(m) {
		return nil, fmt.Errorf("maglev: table size %d is smaller than the %d weighted backends", m, len(bs))
	}

	table := make([]uint32, m)
	if len(bs) == 0 {
		return table, nil
	}

	for i := range bs {
		b := &bs[i]
		b.pos = uint32(hashKey(seedOffset, b.key) % uint64(m))
		// m is prime, so any skip in [1, m-1] is coprime with it and the
		// permutation visits every slot.
		b.skip = uint32(hashKey(seedSkip, b.key)%uint64(m-1)) + 1
		b.tie = hashKey(seedTie, b.key)
	}
	assignQuotas(bs, m)

	// The slowest backend examines one slot per round and the others
	// proportionally more, so the number of rounds does not grow with the
	// weight ratio, while the per-round bursts keep the fill interleaved.
	unit := bs[0].weight
	for _, b := range bs[1:] {
		unit = min(unit, b.weight)
	}

	// Quotas sum to m, so free slots remain exactly while some backend is
	// short of its quota. Such a backend finds one within a single pass over
	// its permutation: every slot it passed was either claimed by it or
	// already taken, and taken slots stay taken, so a fruitless full pass
	// would mean a full table. The loop therefore ends, with the table full.
	// Finished backends are dropped (keeping key order) so that the long tail
	// of rounds, in which a few backends hunt for the last free slots, costs
	// only those backends.
	for free := m; free > 0; {
		finished := false
		for i := range bs {
			b := &bs[i]
			for b.credit += b.weight; b.credit >= unit; b.credit -= unit {
				if table[b.pos] == 0 {
					table[b.pos] = b.id
					free--
					b.quota--
				}
				b.advance(m)
				if b.quota == 0 {
					finished = true
					break
				}
			}
		}
		if finished {
			bs = slices.DeleteFunc(bs, func(b backend) bool { return b.quota == 0 })
		}
	}
	return table, nil
}

// assignQuotas gives each backend its weight's share of m slots by the
// largest remainder method, so the quotas sum to m exactly and no backend is
// more than one slot from its exact share.
func assignQuotas(bs []backend, m uint32) {
	// Products fit in a uint64: weight and m are below 1<<32, and the sum
	// of at most m weights is too.
	var sum uint64
	for _, b := range bs {
		sum += b.weight
	}
	left := uint64(m)
	for i := range bs {
		b := &bs[i]
		share := uint64(m) * b.weight
		b.quota = uint32(share / sum)
		b.rem = share % sum
		left -= uint64(b.quota)
	}

	if left > 0 {
		// The tie hash, not key order, decides among equal remainders, so
		// that rounding slots do not systematically go to the keys that sort
		// first, which already win slots reached in the same round.
		order := make([]int, len(bs))
		for i := range order {
			order[i] = i
		}
		slices.SortFunc(order, func(i, j int) int {
			return cmp.Or(
				cmp.Compare(bs[j].rem, bs[i].rem),
				cmp.Compare(bs[i].tie, bs[j].tie),
				cmp.Compare(i, j),
			)
		})
		for _, i := range order[:left] {
			bs[i].quota++
		}
	}

	// A weighted backend must own at least one slot, or a real configured
	// to take traffic would silently take none. The slot comes from the
	// largest quota, which Build's m >= len(bs) check guarantees is above
	// one whenever some quota is zero.
	for i := range bs {
		if bs[i].quota > 0 {
			continue
		}
		largest := 0
		for j := range bs {
			if bs[j].quota > bs[largest].quota {
				largest = j
			}
		}
		bs[largest].quota--
		bs[i].quota = 1
	}
}

// advance moves to the next slot of the permutation, (pos+skip) mod m, written
// so that it cannot overflow even for m near 1<<32.
func (b *backend) advance(m uint32) {
	if b.pos >= m-b.skip {
		b.pos -= m - b.skip
	} else {
		b.pos += b.skip
	}
}

// The hash is part of the contract between nodes: every node running the same
// backend set must produce the same table, so these constants and the mixing
// must never change (a change would make nodes of different versions send the
// same flow to different reals during an upgrade). It is defined here rather
// than taken from hash/maphash, whose output is deliberately random per
// process. The offset and skip seeds must differ, or offset and skip would be
// correlated and backends with nearby offsets would walk the table in
// lockstep, colliding far more often.
const (
	fnvOffset  = 0xcbf29ce484222325
	fnvPrime   = 0x100000001b3
	seedOffset = 0x6d61676c65762d31 // "maglev-1"
	seedSkip   = 0x6d61676c65762d32 // "maglev-2"
	seedTie    = 0x6d61676c65762d33 // "maglev-3"
)

// hashKey is FNV-1a over the seed bytes followed by the key, finished with a
// strong mixer. FNV alone is weak in its low bits, which are exactly the bits
// a modulo by a ~16-bit table size keeps; the mixer spreads every input bit
// over the whole word.
func hashKey(seed uint64, key string) uint64 {
	h := uint64(fnvOffset)
	for i := 0; i < 8; i++ {
		h ^= (seed >> (8 * i)) & 0xff
		h *= fnvPrime
	}
	for i := 0; i < len(key); i++ {
		h ^= uint64(key[i])
		h *= fnvPrime
	}
	return mix64(h)
}

// HashAddr is a fixed (unseeded) hash of an address for picking a slot in a
// table by client, as the L7 proxy's ip_hash does: FNV-1a over the 16-byte
// form of the address, finished with mix64. Being fixed, it sends a client
// to the same slot on every node and after every restart.
func HashAddr(a netip.Addr) uint64 {
	b := a.Unmap().As16()
	h := uint64(fnvOffset)
	for _, x := range b {
		h ^= uint64(x)
		h *= fnvPrime
	}
	return mix64(h)
}

// mix64 is an xor-shift-multiply finalizer (the murmur3 fmix64 constants),
// chosen for full avalanche: every input bit flips each output bit with
// probability close to 1/2.
func mix64(h uint64) uint64 {
	h ^= h >> 33
	h *= 0xff51afd7ed558ccd
	h ^= h >> 33
	h *= 0xc4ceb9fe1a85ec53
	h ^= h >> 33
	return h
}

// IsPrime reports whether n is prime. Trial division is enough: the largest
// divisor to try for a uint32 is 65535, and table sizes are checked only when
// a table is rebuilt.
func IsPrime(n uint32) bool {
	switch {
	case n < 2:
		return false
	case n < 4:
		return true
	case n%2 == 0 || n%3 == 0:
		return false
	}
	// Every prime above 3 is 6k±1. d is uint64 so d*d cannot overflow.
	for d := uint64(5); d*d <= uint64(n); d += 6 {
		if uint64(n)%d == 0 || uint64(n)%(d+2) == 0 {
			return false
		}
	}
	return true
}

// fingerprintBits keeps fingerprints exact as Prometheus sample values
// (a float64 holds integers up to 2^53 exactly).
const fingerprintBits = 52

// Fingerprint hashes a table by content: slot by slot, the address of the
// real it sends flows to (addrOf of the slot's id; the zero Addr for an
// empty slot). Real ids are left out, since every node numbers its reals
// itself: two nodes whose tables send every slot to the same address have
// the same fingerprint, and a difference in the backend set, the weights,
// the table size or the algorithm shows as another one.
func Fingerprint(table []uint32, addrOf func(id uint32) netip.Addr) uint64 {
	h := fnv.New64a()
	var zero [17]byte
	for _, id := range table {
		b := zero
		if a := addrOf(id); a.IsValid() {
			a16 := a.As16()
			copy(b[:16], a16[:])
			b[16] = byte(a.BitLen()) // 32 or 128, so ::ffff:a.b.c.d and a.b.c.d differ
		}
		h.Write(b[:])
	}
	return h.Sum64() & (1<<fingerprintBits - 1)
}
