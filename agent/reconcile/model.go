package reconcile

import (
	"fmt"
	"net/netip"

	"github.com/veloflux/veloflux/agent/config"
	"github.com/veloflux/veloflux/agent/dataplane"
)

// model is the desired state before ids are assigned: what the configuration
// and the health verdicts ask for, independent of what is installed.
type model struct {
	pools map[string]*poolModel
	vips  []vipModel
	reals map[netip.Addr]*realModel
	deny  map[netip.Prefix]bool
}

type poolModel struct {
	name    string
	entries []entryModel
}

// entryModel is one backend line of a pool.
type entryModel struct {
	addr   netip.Addr
	port   uint16 // the backend's port, a nat VIP's target port for this real
	key    string // Maglev key, "address:port"
	weight uint32
	live   bool // healthy and not drained: may take new flows
}

type vipModel struct {
	vip      dataplane.VIP
	mode     dataplane.Mode
	affinity bool
	pool     string
	nat      dataplane.NATTarget // mode nat only
}

// realModel aggregates every pool entry naming one address, because the data
// path has a single state per real however many pools list it.
type realModel struct {
	addr       netip.Addr
	anyHealthy bool // healthy in at least one pool
	allDrained bool // drained in every pool that lists it
	dsr        bool // used by a dsr VIP, so it needs a MAC
}

// state is down when no pool has the real healthy (conntrack then re-selects
// its flows), draining when every pool drains it (its flows stay, new ones go
// elsewhere), and up otherwise. A real that is healthy but left out of every
// ring, say drained in one pool and unhealthy in the other, is up: it takes
// no new flows anyway, and its existing ones are worth keeping.
func (rm *realModel) state() dataplane.RealState {
	switch {
	case !rm.anyHealthy:
		return dataplane.RealDown
	case rm.allDrained:
		return dataplane.RealDraining
	}
	return dataplane.RealUp
}

// buildModel derives the model from d. The configuration is expected to be
// validated already; the checks here only make sure that a configuration
// that somehow is not cannot be half applied.
func buildModel(d Desired) (*model, error) {
	c := d.Config
	if c == nil {
		return nil, fmt.Errorf("reconcile: no configuration")
	}
	m := &model{
		pools: make(map[string]*poolModel, len(c.Pools)),
		reals: map[netip.Addr]*realModel{},
		deny:  make(map[netip.Prefix]bool, len(c.Security.Denylist)),
	}

	for i, p := range c.Pools {
		if _, dup := m.pools[p.Name]; dup {
			return nil, fmt.Errorf("reconcile: pools[%d]: duplicate pool name %q", i, p.Name)
		}
		pm := &poolModel{name: p.Name, entries: make([]entryModel, 0, len(p.Backends))}
		m.pools[p.Name] = pm
		checked := p.HealthCheck.Type != config.HealthCheckNone
		seen := make(map[string]bool, len(p.Backends))
		for j, b := range p.Backends {
			addr, err := config.ParseAddr(b.Address)
			if err != nil {
				return nil, fmt.Errorf("reconcile: pools[%d].backends[%d].address: %w", i, j, err)
			}
			if b.Port < 1 || b.Port > 65535 {
				return nil, fmt.Errorf("reconcile: pools[%d].backends[%d].port: %d is not in 1..65535", i, j, b.Port)
			}
			key := b.Key(p.Name)
			if seen[key] {
				return nil, fmt.Errorf("reconcile: pools[%d].backends[%d]: duplicate backend %s", i, j, key)
			}
			seen[key] = true

			healthy := !checked
			if checked && d.Healthy != nil {
				h, known := d.Healthy(key)
				healthy = h && known
			}
			drained := d.Drained[key]
			pm.entries = append(pm.entries, entryModel{
				addr:   addr,
				port:   uint16(b.Port),
				key:    b.Endpoint(),
				weight: b.EffectiveWeight(),
				live:   healthy && !drained,
			})

			rm := m.reals[addr]
			if rm == nil {
				rm = &realModel{addr: addr, allDrained: true}
				m.reals[addr] = rm
			}
			rm.anyHealthy = rm.anyHealthy || healthy
			rm.allDrained = rm.allDrained && drained
		}
	}

	seen := make(map[dataplane.VIP]int, len(c.VIPs))
	m.vips = make([]vipModel, 0, len(c.VIPs))
	for i, v := range c.VIPs {
		vm, err := convertVIP(v)
		if err != nil {
			return nil, fmt.Errorf("reconcile: vips[%d]: %w", i, err)
		}
		if j, dup := seen[vm.vip]; dup {
			return nil, fmt.Errorf("reconcile: vips[%d]: duplicate VIP %s (also vips[%d])", i, vm.vip, j)
		}
		seen[vm.vip] = i
		pm := m.pools[v.Pool]
		if pm == nil {
			return nil, fmt.Errorf("reconcile: vips[%d].pool: unknown pool %q", i, v.Pool)
		}
		if vm.mode == dataplane.ModeDSR {
			for _, e := range pm.entries {
				m.reals[e.addr].dsr = true
			}
		}
		if vm.mode == dataplane.ModeNAT {
			if vm.nat, err = natTarget(d, c, v, vm.vip); err != nil {
				return nil, fmt.Errorf("reconcile: vips[%d]: %w", i, err)
			}
		}
		m.vips = append(m.vips, vm)
	}

	for i, s := range c.Security.Denylist {
		p, err := config.ParseDenyPrefix(s)
		if err != nil {
			return nil, fmt.Errorf("reconcile: security.denylist[%d]: %w", i, err)
		}
		m.deny[p] = true
	}
	return m, nil
}

// DataplaneVIP is the data path's key of a configured VIP.
func DataplaneVIP(v config.VIP) (dataplane.VIP, error) {
	addr, err := config.ParseAddr(v.Address)
	if err != nil {
		return dataplane.VIP{}, fmt.Errorf("address: %w", err)
	}
	if v.Port < 0 || v.Port > 65535 {
		return dataplane.VIP{}, fmt.Errorf("port: %d is not in 0..65535", v.Port)
	}
	vip := dataplane.VIP{Addr: addr, Port: uint16(v.Port)}
	switch v.Protocol {
	case config.ProtocolTCP:
		vip.Proto = dataplane.ProtoTCP
	case config.ProtocolUDP:
		vip.Proto = dataplane.ProtoUDP
	default:
		return dataplane.VIP{}, fmt.Errorf("protocol: unknown protocol %q", v.Protocol)
	}
	return vip, nil
}

func convertVIP(v config.VIP) (vipModel, error) {
	vip, err := DataplaneVIP(v)
	if err != nil {
		return vipModel{}, err
	}
	vm := vipModel{vip: vip, affinity: v.SourceAffinity, pool: v.Pool}
	switch v.Mode {
	case config.VIPModeDSR:
		vm.mode = dataplane.ModeDSR
	case config.VIPModeIPIP:
		vm.mode = dataplane.ModeIPIP
	case config.VIPModeNAT:
		vm.mode = dataplane.ModeNAT
	case config.VIPModeGUE:
		vm.mode = dataplane.ModeGUE
	default:
		return vipModel{}, fmt.Errorf("mode: unknown mode %q", v.Mode)
	}
	return vm, nil
}

// natTarget is what a nat VIP translates to besides the real: its SNAT
// address (configured, or the interface's) and a default port for the
// reals, the first backend's (each real's own port is written to the data
// plane per real, see plan.natPorts); a VIP whose pool is empty keeps its
// own.
func natTarget(d Desired, c *config.Config, v config.VIP, vip dataplane.VIP) (dataplane.NATTarget, error) {
	t := dataplane.NATTarget{RealPort: vip.Port}
	for _, p := range c.Pools {
		if p.Name == v.Pool && len(p.Backends) > 0 {
			t.RealPort = uint16(p.Backends[0].Port)
		}
	}
	if v.SNATAddress != "" {
		a, err := config.ParseAddr(v.SNATAddress)
		if err != nil {
			return t, fmt.Errorf("snat_address: %w", err)
		}
		t.SNAT = a
		return t, nil
	}
	if d.InterfaceAddress == nil {
		return t, fmt.Errorf("mode nat without snat_address, and no interface address to use instead")
	}
	a, err := d.InterfaceAddress(vip.Addr.Is4())
	if err != nil {
		return t, fmt.Errorf("snat_address: none configured and %w", err)
	}
	t.SNAT = a
	return t, nil
}
