package live

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/veloflux/veloflux/tests/lab"
)

// testConcurrentDrains sends rounds of 30 parallel drain and undrain
// requests, as a dashboard with several operators might, and checks after
// each round that every request succeeded and that drained.json holds
// exactly the set the API reports. With a shared temporary file some
// requests failed with 500 (rename ...drained.json.tmp: no such file), and
// the saved set could lose a backend the agent had drained, or hold two
// JSON documents run together, which then kept the agent from starting.
//
// Web backend 0 is never drained, so the background traffic always has a
// backend to go to.
func testConcurrentDrains(t *testing.T, e *env) {
	var ids []string
	for _, be := range e.lab.Backends[1:] {
		ids = append(ids, fmt.Sprintf("web:%s:%d", be.Addr4, lab.HTTPPort))
	}
	for _, be := range e.lab.Backends[:2] {
		ids = append(ids, fmt.Sprintf("udp:%s:%d", be.Addr4, lab.UDPEchoPort))
	}
	const rounds, parallel = 4, 30
	rng := rand.New(rand.NewPCG(1, 2))
	for round := range rounds {
		var wg sync.WaitGroup
		var mu sync.Mutex
		var failures []string
		for range parallel {
			id := ids[rng.IntN(len(ids))]
			method := http.MethodPost
			if rng.IntN(2) == 0 {
				method = http.MethodDelete
			}
			wg.Go(func() {
				code, body, err := e.call(method, "/api/backends/"+id+"/drain", nil, true)
				if err != nil || code != http.StatusOK {
					mu.Lock()
					failures = append(failures, fmt.Sprintf("%s %s: %d %v %s", method, id, code, err, body))
					mu.Unlock()
				}
			})
		}
		wg.Wait()
		for _, f := range failures {
			t.Errorf("round %d: %s", round, f)
		}

		var backends []backendView
		e.mustCall(t, http.MethodGet, "/api/backends", nil, false, http.StatusOK, &backends)
		var api []string
		for _, b := range backends {
			if b.Drained {
				api = append(api, b.ID)
			}
		}
		data, err := os.ReadFile(filepath.Join(e.state, "drained.json"))
		if err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		var saved struct {
			Drained []string `json:"drained"`
		}
		if err := json.Unmarshal(data, &saved); err != nil {
			t.Fatalf("round %d: drained.json does not parse: %v\n%s", round, err, data)
		}
		var file []string
		for _, k := range saved.Drained { // "pool/addr:port"; the API says "pool:addr:port"
			file = append(file, strings.Replace(k, "/", ":", 1))
		}
		slices.Sort(api)
		slices.Sort(file)
		if !slices.Equal(api, file) {
			t.Errorf("round %d: drained.json holds %q, the API reports %q drained", round, file, api)
		}
	}
	entries, err := os.ReadDir(e.state)
	if err != nil {
		t.Fatal(err)
	}
	for _, de := range entries {
		if strings.Contains(de.Name(), ".tmp") {
			t.Errorf("temporary file %s left in the state directory", de.Name())
		}
	}
	for _, id := range ids {
		e.mustCall(t, http.MethodDelete, "/api/backends/"+id+"/drain", nil, true, http.StatusOK, nil)
	}
}
