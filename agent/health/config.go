package health

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/veloflux/veloflux/agent/config"
)

// SpecFromConfig converts a pool's health_check section into a Spec.
func SpecFromConfig(hc config.HealthCheck) Spec {
	return Spec{
		Type:           CheckType(hc.Type),
		Path:           hc.Path,
		ExpectedStatus: hc.ExpectedStatus,
		Interval:       hc.Interval.Std(),
		Timeout:        hc.Timeout.Std(),
		Rise:           hc.Rise,
		Fall:           hc.Fall,
		Port:           hc.Port,
	}
}

// TargetsFromPools returns one Target per backend of every pool, keyed
// config.Backend.Key with the backend's serving port (the check port
// override stays in Spec.Port, so the key does not change when only the
// check moves). Backends are listed in configuration order.
//
// The configuration is normally validated already; an address or port that
// still does not parse is reported with its path, e.g.
// "pools[1].backends[0].address", and the other targets are returned anyway.
func TargetsFromPools(pools []config.Pool) ([]Target, error) {
	var out []Target
	var errs []error
	for i, p := range pools {
		spec := SpecFromConfig(p.HealthCheck)
		for j, b := range p.Backends {
			path := fmt.Sprintf("pools[%d].backends[%d]", i, j)
			addr, err := config.ParseAddr(b.Address)
			if err != nil {
				errs = append(errs, fmt.Errorf("%s.address: invalid IP address %q", path, b.Address))
				continue
			}
			if b.Port < 1 || b.Port > 65535 {
				errs = append(errs, fmt.Errorf("%s.port: must be between 1 and 65535, got %d", path, b.Port))
				continue
			}
			ap := netip.AddrPortFrom(addr, uint16(b.Port))
			out = append(out, Target{Key: b.Key(p.Name), Pool: p.Name, Addr: ap, Check: spec})
		}
	}
	if len(errs) > 0 {
		return out, fmt.Errorf("health: targets from config: %w", errors.Join(errs...))
	}
	return out, nil
}
