package reconcile

import (
	"hash/fnv"

	"github.com/veloflux/veloflux/agent/maglev"
)

// fingerprintBits keeps fingerprints exact as Prometheus sample values
// (float64 holds integers up to 2^53 exactly).
const fingerprintBits = 52

// RingFingerprint hashes a Maglev table by content: slot by slot, the key
// (address:port) of the backend it sends flows to. Real ids are left out,
// since each node numbers its reals itself; two nodes whose tables send
// every slot to the same backend have the same fingerprint, and any
// difference in the backend set, the weights, the ring size or the table
// algorithm shows as a different one.
func RingFingerprint(table []uint32, backends []maglev.Backend) uint64 {
	keys := make(map[uint32]string, len(backends))
	for _, b := range backends {
		keys[b.ID] = b.Key
	}
	h := fnv.New64a()
	for _, id := range table {
		// A slot's key and a separator: "" for an empty slot (id 0, or an
		// id no backend has).
		h.Write([]byte(keys[id]))
		h.Write([]byte{0})
	}
	return h.Sum64() & (1<<fingerprintBits - 1)
}
