package config

import (
	"errors"
	"testing"
)

func TestDecodeFragment(t *testing.T) {
	var p Pool
	if err := DecodeFragment([]byte(`{"name":"api","backends":[{"address":"10.0.0.1","port":8080}]}`), "pools[3]", &p); err != nil {
		t.Fatal(err)
	}
	if p.Name != "api" || p.Algorithm != defaultAlgorithm || p.HealthCheck.Rise != defaultCheckRise ||
		len(p.Backends) != 1 || p.Backends[0].EffectiveWeight() != 1 {
		t.Fatalf("decoded %+v: defaults missing", p)
	}

	var v VIP
	err := DecodeFragment([]byte(`{"address":"10.0.0.9","port":"eighty","protcol":"tcp"}`), "vips[1]", &v)
	var verr *ValidationError
	if !errors.As(err, &verr) || len(verr.Errors) != 2 {
		t.Fatalf("error %v, want two field errors", err)
	}
	want := map[string]bool{"vips[1].port": true, "vips[1].protcol": true}
	for _, fe := range verr.Errors {
		if !want[fe.Path] {
			t.Fatalf("unexpected error path %q (%s)", fe.Path, fe.Message)
		}
	}
	if err := DecodeFragment([]byte(`[1,2]`), "routes[0]", &Route{}); err == nil {
		t.Fatal("a sequence decoded into a route")
	}
}

func TestCloneIsDeep(t *testing.T) {
	c, err := Load("../../deploy/veloflux.yaml")
	if err != nil {
		t.Fatal(err)
	}
	d, err := c.Clone()
	if err != nil {
		t.Fatal(err)
	}
	d.Pools[0].Backends[0].Address = "10.9.9.9"
	*d.Pools[0].Backends[1].Weight = 77
	if c.Pools[0].Backends[0].Address == "10.9.9.9" || *c.Pools[0].Backends[1].Weight == 77 {
		t.Fatal("changing the clone changed the original")
	}
}
