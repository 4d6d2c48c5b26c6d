package api

import (
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"github.com/labstack/echo/v4"
	"go.yaml.in/yaml/v3"

	"github.com/veloflux/veloflux/agent/config"
)

// maxBody bounds request bodies; a whole configuration fits many times over.
const maxBody = 1 << 20

func (s *Server) routeTable() []route {
	return []route{
		{http.MethodGet, "/health", "Liveness and data plane attachment (503 when detached)", false, "", s.health},
		{http.MethodGet, "/api/status", "Agent status", false, "", s.status},
		{http.MethodGet, "/api/config", "The configuration in force (JSON, or YAML with ?format=yaml)", false, "", s.getConfig},
		{http.MethodPost, "/api/config/validate", "Validate a configuration without applying it", true, "Config", s.validateConfig},
		{http.MethodPost, "/api/reload", "Reload the configuration file", true, "", s.reload},

		{http.MethodGet, "/api/pools", "List pools", false, "", s.listPools},
		{http.MethodPost, "/api/pools", "Create a pool", true, "Pool", s.createPool},
		{http.MethodGet, "/api/pools/:name", "Get a pool", false, "", s.getPool},
		{http.MethodPut, "/api/pools/:name", "Replace a pool", true, "Pool", s.replacePool},
		{http.MethodDelete, "/api/pools/:name", "Delete a pool (no VIP or route may use it)", true, "", s.deletePool},
		{http.MethodGet, "/api/pools/:name/backends", "List a pool's backends", false, "", s.listPoolBackends},
		{http.MethodPost, "/api/pools/:name/backends", "Add a backend to a pool", true, "Backend", s.addPoolBackend},
		{http.MethodPut, "/api/pools/:name/backends/:backend", "Replace a backend (address:port)", true, "Backend", s.replacePoolBackend},
		{http.MethodDelete, "/api/pools/:name/backends/:backend", "Remove a backend (address:port)", true, "", s.deletePoolBackend},

		{http.MethodGet, "/api/vips", "List VIPs", false, "", s.listVIPs},
		{http.MethodPost, "/api/vips", "Create a VIP", true, "VIP", s.createVIP},
		{http.MethodGet, "/api/vips/:id", "Get a VIP (id: protocol:address:port)", false, "", s.getVIP},
		{http.MethodPut, "/api/vips/:id", "Replace a VIP", true, "VIP", s.replaceVIP},
		{http.MethodDelete, "/api/vips/:id", "Delete a VIP", true, "", s.deleteVIP},

		{http.MethodGet, "/api/routes", "List L7 routes", false, "", s.listRoutes},
		{http.MethodPost, "/api/routes", "Create an L7 route", true, "Route", s.createRoute},
		{http.MethodGet, "/api/routes/:index", "Get an L7 route by position", false, "", s.getRoute},
		{http.MethodPut, "/api/routes/:index", "Replace an L7 route", true, "Route", s.replaceRoute},
		{http.MethodDelete, "/api/routes/:index", "Delete an L7 route", true, "", s.deleteRoute},

		{http.MethodGet, "/api/backends", "Every backend with health, state and counters", false, "", s.listBackends},
		{http.MethodPost, "/api/backends/:id/drain", "Drain a backend (id: pool:address:port): no new flows, existing ones kept", true, "", s.drainBackend},
		{http.MethodDelete, "/api/backends/:id/drain", "Undrain a backend", true, "", s.undrainBackend},

		{http.MethodGet, "/api/metrics", "Counters and rates snapshot", false, "", s.metrics},
		{http.MethodGet, "/api/flows", "A sample of conntrack flows (?limit=, default 100)", false, "", s.flows},

		{http.MethodGet, "/api/security/denylist", "Denied source prefixes", false, "", s.getDenylist},
		{http.MethodPost, "/api/security/denylist", "Deny a source prefix", true, "DenyPrefix", s.addDeny},
		{http.MethodDelete, "/api/security/denylist", "Lift a denied prefix (?prefix=)", true, "", s.removeDeny},

		{http.MethodPost, "/api/system/drain", "Drain the L7 proxy: close its listeners, finish in-flight requests", true, "", s.drainProxy},

		{http.MethodGet, "/api/bgp", "BGP sessions and the VIPs this node announces", false, "", s.getBGP},
		{http.MethodPost, "/api/node/drain", "Drain the node: withdraw every VIP over BGP, keep forwarding", true, "", s.drainNode},
		{http.MethodDelete, "/api/node/drain", "Undrain the node: announce its VIPs again", true, "", s.undrainNode},

		{http.MethodGet, "/api/openapi.json", "This document", false, "", s.openAPI},
		{http.MethodGet, "/api/ws/:channel", "WebSocket channel: " + strings.Join(Channels, ", "), false, "", s.webSocket},
	}
}

func (s *Server) health(c echo.Context) error {
	st := s.opts.Controller.Status()
	body := map[string]any{
		"status": st.Status, "version": st.Version, "uptime_seconds": st.UptimeSeconds,
		"dataplane_attached": st.Attached, "config_generation": st.ConfigGeneration,
	}
	// The proxy's state is reported but leaves the status code alone: a
	// node whose L7 listeners are down still forwards its VIPs in XDP.
	if st.Proxy != nil {
		body["proxy"] = st.Proxy
	}
	switch {
	case !st.Attached:
		body["status"] = "detached"
		return c.JSON(http.StatusServiceUnavailable, body)
	case st.Status == "draining":
		// Whatever balances in front of this node should move away.
		return c.JSON(http.StatusServiceUnavailable, body)
	}
	return c.JSON(http.StatusOK, body)
}

func (s *Server) drainProxy(c echo.Context) error {
	if err := s.opts.Controller.DrainProxy(c.Request().Context()); err != nil {
		return err
	}
	return c.JSON(http.StatusOK, map[string]any{"draining": true, "drained": true})
}

func (s *Server) status(c echo.Context) error {
	return c.JSON(http.StatusOK, s.opts.Controller.Status())
}

// asJSON turns configuration types (YAML-tagged) into JSON with the same
// snake_case keys as the file.
func asJSON(v any) (any, error) {
	data, err := yaml.Marshal(v)
	if err != nil {
		return nil, err
	}
	var out any
	if err := yaml.Unmarshal(data, &out); err != nil {
		return nil, err
	}
	return out, nil
}

func (s *Server) sendConfigPart(c echo.Context, status int, v any) error {
	out, err := asJSON(v)
	if err != nil {
		return err
	}
	return c.JSON(status, out)
}

func (s *Server) getConfig(c echo.Context) error {
	cfg := s.opts.Controller.Config().Redacted()
	if c.QueryParam("format") == "yaml" {
		data, err := cfg.Marshal()
		if err != nil {
			return err
		}
		return c.Blob(http.StatusOK, "application/yaml", data)
	}
	return s.sendConfigPart(c, http.StatusOK, cfg)
}

func readBody(c echo.Context) ([]byte, error) {
	data, err := io.ReadAll(io.LimitReader(c.Request().Body, maxBody+1))
	if err != nil {
		return nil, badRequest("read request body: %v", err)
	}
	if len(data) > maxBody {
		return nil, newError(http.StatusRequestEntityTooLarge, "too_large", "request body over %d bytes", maxBody)
	}
	return data, nil
}

func (s *Server) validateConfig(c echo.Context) error {
	data, err := readBody(c)
	if err != nil {
		return err
	}
	cfg, err := s.opts.Controller.ValidateConfig(data)
	if err != nil {
		return err
	}
	return c.JSON(http.StatusOK, map[string]any{"valid": true, "pools": len(cfg.Pools), "vips": len(cfg.VIPs), "routes": len(cfg.Routes)})
}

func (s *Server) reload(c echo.Context) error {
	if err := s.opts.Controller.Reload(c.Request().Context()); err != nil {
		return err
	}
	return c.JSON(http.StatusOK, map[string]any{"reloaded": true, "config_generation": s.opts.Controller.Status().ConfigGeneration})
}

// update runs a configuration change and answers with what the saved
// configuration holds afterwards.
func (s *Server) update(c echo.Context, status int, mutate func(*config.Config) error, result func(*config.Config) any) error {
	cfg, err := s.opts.Controller.Update(c.Request().Context(), mutate)
	if err != nil {
		return err
	}
	if result == nil {
		return c.NoContent(http.StatusNoContent)
	}
	return s.sendConfigPart(c, status, result(cfg))
}

// decodePart decodes a body into one configuration section, judged under
// the path it will have in the file.
func decodePart[T any](c echo.Context, path string) (*T, error) {
	data, err := readBody(c)
	if err != nil {
		return nil, err
	}
	v := new(T)
	if err := config.DecodeFragment(data, path, v); err != nil {
		return nil, err
	}
	return v, nil
}

// --- pools ---

func poolIndex(cfg *config.Config, name string) int {
	return slices.IndexFunc(cfg.Pools, func(p config.Pool) bool { return p.Name == name })
}

func (s *Server) listPools(c echo.Context) error {
	return s.sendConfigPart(c, http.StatusOK, nonNil(s.opts.Controller.Config().Pools))
}

func (s *Server) getPool(c echo.Context) error {
	cfg := s.opts.Controller.Config()
	i := poolIndex(cfg, c.Param("name"))
	if i < 0 {
		return notFound("pool %q does not exist", c.Param("name"))
	}
	return s.sendConfigPart(c, http.StatusOK, cfg.Pools[i])
}

func (s *Server) createPool(c echo.Context) error {
	n := len(s.opts.Controller.Config().Pools)
	p, err := decodePart[config.Pool](c, fmt.Sprintf("pools[%d]", n))
	if err != nil {
		return err
	}
	return s.update(c, http.StatusCreated, func(cfg *config.Config) error {
		if poolIndex(cfg, p.Name) >= 0 {
			return conflict("pool %q already exists", p.Name)
		}
		cfg.Pools = append(cfg.Pools, *p)
		return nil
	}, func(cfg *config.Config) any { return cfg.Pools[poolIndex(cfg, p.Name)] })
}

func (s *Server) replacePool(c echo.Context) error {
	name := c.Param("name")
	i := poolIndex(s.opts.Controller.Config(), name)
	if i < 0 {
		return notFound("pool %q does not exist", name)
	}
	p, err := decodePart[config.Pool](c, fmt.Sprintf("pools[%d]", i))
	if err != nil {
		return err
	}
	if p.Name == "" {
		p.Name = name
	}
	if p.Name != name {
		return &Error{Status: http.StatusBadRequest, Code: "bad_request", Field: fmt.Sprintf("pools[%d].name", i),
			Message: fmt.Sprintf("body names pool %q but the URL names %q; renaming is delete + create", p.Name, name)}
	}
	return s.update(c, http.StatusOK, func(cfg *config.Config) error {
		j := poolIndex(cfg, name)
		if j < 0 {
			return notFound("pool %q does not exist", name)
		}
		cfg.Pools[j] = *p
		return nil
	}, func(cfg *config.Config) any { return cfg.Pools[poolIndex(cfg, name)] })
}

func (s *Server) deletePool(c echo.Context) error {
	name := c.Param("name")
	return s.update(c, 0, func(cfg *config.Config) error {
		i := poolIndex(cfg, name)
		if i < 0 {
			return notFound("pool %q does not exist", name)
		}
		cfg.Pools = slices.Delete(cfg.Pools, i, i+1)
		return nil
	}, nil)
}

// --- a pool's backends ---

// parseHostPort accepts "10.0.0.1:80", "[fd00::1]:80" and "fd00::1:80"
// (the last colon separates the port), so ids work unescaped in URLs.
func parseHostPort(s string) (netip.AddrPort, error) {
	if ap, err := netip.ParseAddrPort(s); err == nil {
		return ap, nil
	}
	i := strings.LastIndexByte(s, ':')
	if i < 0 {
		return netip.AddrPort{}, fmt.Errorf("%q is not address:port", s)
	}
	addr, err := netip.ParseAddr(s[:i])
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("%q is not address:port: %v", s, err)
	}
	port, err := strconv.ParseUint(s[i+1:], 10, 16)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("%q is not address:port: bad port", s)
	}
	return netip.AddrPortFrom(addr, uint16(port)), nil
}

func backendIndex(p *config.Pool, ap netip.AddrPort) int {
	return slices.IndexFunc(p.Backends, func(b config.Backend) bool {
		addr, err := netip.ParseAddr(b.Address)
		return err == nil && addr == ap.Addr() && b.Port == int(ap.Port())
	})
}

func (s *Server) poolParam(cfg *config.Config, c echo.Context) (int, error) {
	i := poolIndex(cfg, c.Param("name"))
	if i < 0 {
		return -1, notFound("pool %q does not exist", c.Param("name"))
	}
	return i, nil
}

func (s *Server) listPoolBackends(c echo.Context) error {
	cfg := s.opts.Controller.Config()
	i, err := s.poolParam(cfg, c)
	if err != nil {
		return err
	}
	return s.sendConfigPart(c, http.StatusOK, nonNil(cfg.Pools[i].Backends))
}

func (s *Server) addPoolBackend(c echo.Context) error {
	cfg := s.opts.Controller.Config()
	i, err := s.poolParam(cfg, c)
	if err != nil {
		return err
	}
	path := fmt.Sprintf("pools[%d].backends[%d]", i, len(cfg.Pools[i].Backends))
	b, err := decodePart[config.Backend](c, path)
	if err != nil {
		return err
	}
	name := c.Param("name")
	return s.update(c, http.StatusCreated, func(cfg *config.Config) error {
		i := poolIndex(cfg, name)
		if i < 0 {
			return notFound("pool %q does not exist", name)
		}
		cfg.Pools[i].Backends = append(cfg.Pools[i].Backends, *b)
		return nil
	}, func(cfg *config.Config) any {
		bs := cfg.Pools[poolIndex(cfg, name)].Backends
		return bs[len(bs)-1]
	})
}

func (s *Server) backendParam(cfg *config.Config, c echo.Context) (int, int, error) {
	i, err := s.poolParam(cfg, c)
	if err != nil {
		return -1, -1, err
	}
	ap, err := parseHostPort(c.Param("backend"))
	if err != nil {
		return -1, -1, badRequest("backend: %v", err)
	}
	j := backendIndex(&cfg.Pools[i], ap)
	if j < 0 {
		return -1, -1, notFound("pool %q has no backend %s", cfg.Pools[i].Name, ap)
	}
	return i, j, nil
}

func (s *Server) replacePoolBackend(c echo.Context) error {
	i, j, err := s.backendParam(s.opts.Controller.Config(), c)
	if err != nil {
		return err
	}
	b, err := decodePart[config.Backend](c, fmt.Sprintf("pools[%d].backends[%d]", i, j))
	if err != nil {
		return err
	}
	return s.update(c, http.StatusOK, func(cfg *config.Config) error {
		i, j, err := s.backendParam(cfg, c)
		if err != nil {
			return err
		}
		cfg.Pools[i].Backends[j] = *b
		return nil
	}, func(cfg *config.Config) any { return cfg.Pools[i].Backends[j] })
}

func (s *Server) deletePoolBackend(c echo.Context) error {
	return s.update(c, 0, func(cfg *config.Config) error {
		i, j, err := s.backendParam(cfg, c)
		if err != nil {
			return err
		}
		cfg.Pools[i].Backends = slices.Delete(cfg.Pools[i].Backends, j, j+1)
		return nil
	}, nil)
}

// --- VIPs ---

// vipID is "protocol:address:port", e.g. "tcp:10.0.0.1:80" or "udp:fd00::1:53".
func vipID(v config.VIP) string {
	return fmt.Sprintf("%s:%s:%d", v.Protocol, v.Address, v.Port)
}

func parseVIPID(id string) (config.Protocol, netip.AddrPort, error) {
	proto, rest, ok := strings.Cut(id, ":")
	if !ok {
		return "", netip.AddrPort{}, badRequest("VIP id %q: want protocol:address:port", id)
	}
	ap, err := parseHostPort(rest)
	if err != nil {
		return "", netip.AddrPort{}, badRequest("VIP id %q: %v", id, err)
	}
	return config.Protocol(proto), ap, nil
}

func vipIndex(cfg *config.Config, id string) (int, error) {
	proto, ap, err := parseVIPID(id)
	if err != nil {
		return -1, err
	}
	i := slices.IndexFunc(cfg.VIPs, func(v config.VIP) bool {
		addr, err := netip.ParseAddr(v.Address)
		return err == nil && v.Protocol == proto && addr == ap.Addr() && v.Port == int(ap.Port())
	})
	if i < 0 {
		return -1, notFound("VIP %s does not exist", id)
	}
	return i, nil
}

// vipJSON adds the id to a VIP's JSON form.
func vipJSON(v config.VIP) any {
	out, err := asJSON(v)
	if m, ok := out.(map[string]any); ok && err == nil {
		m["id"] = vipID(v)
		return m
	}
	return v
}

func (s *Server) listVIPs(c echo.Context) error {
	vips := s.opts.Controller.Config().VIPs
	rings := s.opts.Controller.VIPRings()
	out := make([]any, 0, len(vips))
	for _, v := range vips {
		j := vipJSON(v)
		if m, ok := j.(map[string]any); ok {
			if r, ok := rings[vipID(v)]; ok {
				m["ring"] = r
			}
		}
		out = append(out, j)
	}
	return c.JSON(http.StatusOK, out)
}

func (s *Server) getVIP(c echo.Context) error {
	cfg := s.opts.Controller.Config()
	i, err := vipIndex(cfg, c.Param("id"))
	if err != nil {
		return err
	}
	return c.JSON(http.StatusOK, vipJSON(cfg.VIPs[i]))
}

func (s *Server) createVIP(c echo.Context) error {
	n := len(s.opts.Controller.Config().VIPs)
	v, err := decodePart[config.VIP](c, fmt.Sprintf("vips[%d]", n))
	if err != nil {
		return err
	}
	cfg, err := s.opts.Controller.Update(c.Request().Context(), func(cfg *config.Config) error {
		if _, err := vipIndex(cfg, vipID(*v)); err == nil {
			return conflict("VIP %s already exists", vipID(*v))
		}
		cfg.VIPs = append(cfg.VIPs, *v)
		return nil
	})
	if err != nil {
		return err
	}
	return c.JSON(http.StatusCreated, vipJSON(cfg.VIPs[len(cfg.VIPs)-1]))
}

func (s *Server) replaceVIP(c echo.Context) error {
	id := c.Param("id")
	i, err := vipIndex(s.opts.Controller.Config(), id)
	if err != nil {
		return err
	}
	v, err := decodePart[config.VIP](c, fmt.Sprintf("vips[%d]", i))
	if err != nil {
		return err
	}
	cfg, err := s.opts.Controller.Update(c.Request().Context(), func(cfg *config.Config) error {
		j, err := vipIndex(cfg, id)
		if err != nil {
			return err
		}
		cfg.VIPs[j] = *v
		return nil
	})
	if err != nil {
		return err
	}
	j, err := vipIndex(cfg, vipID(*v))
	if err != nil {
		return err
	}
	return c.JSON(http.StatusOK, vipJSON(cfg.VIPs[j]))
}

func (s *Server) deleteVIP(c echo.Context) error {
	id := c.Param("id")
	return s.update(c, 0, func(cfg *config.Config) error {
		i, err := vipIndex(cfg, id)
		if err != nil {
			return err
		}
		cfg.VIPs = slices.Delete(cfg.VIPs, i, i+1)
		return nil
	}, nil)
}

// --- routes ---

func routeIndex(cfg *config.Config, param string) (int, error) {
	i, err := strconv.Atoi(param)
	if err != nil || i < 0 {
		return -1, badRequest("route index %q: want a position from 0", param)
	}
	if i >= len(cfg.Routes) {
		return -1, notFound("route %d does not exist (there are %d)", i, len(cfg.Routes))
	}
	return i, nil
}

func (s *Server) listRoutes(c echo.Context) error {
	return s.sendConfigPart(c, http.StatusOK, nonNil(s.opts.Controller.Config().Routes))
}

func (s *Server) getRoute(c echo.Context) error {
	cfg := s.opts.Controller.Config()
	i, err := routeIndex(cfg, c.Param("index"))
	if err != nil {
		return err
	}
	return s.sendConfigPart(c, http.StatusOK, cfg.Routes[i])
}

func (s *Server) createRoute(c echo.Context) error {
	n := len(s.opts.Controller.Config().Routes)
	r, err := decodePart[config.Route](c, fmt.Sprintf("routes[%d]", n))
	if err != nil {
		return err
	}
	return s.update(c, http.StatusCreated, func(cfg *config.Config) error {
		cfg.Routes = append(cfg.Routes, *r)
		return nil
	}, func(cfg *config.Config) any { return cfg.Routes[len(cfg.Routes)-1] })
}

func (s *Server) replaceRoute(c echo.Context) error {
	i, err := routeIndex(s.opts.Controller.Config(), c.Param("index"))
	if err != nil {
		return err
	}
	r, err := decodePart[config.Route](c, fmt.Sprintf("routes[%d]", i))
	if err != nil {
		return err
	}
	return s.update(c, http.StatusOK, func(cfg *config.Config) error {
		if i >= len(cfg.Routes) {
			return notFound("route %d does not exist", i)
		}
		cfg.Routes[i] = *r
		return nil
	}, func(cfg *config.Config) any { return cfg.Routes[i] })
}

func (s *Server) deleteRoute(c echo.Context) error {
	param := c.Param("index")
	return s.update(c, 0, func(cfg *config.Config) error {
		i, err := routeIndex(cfg, param)
		if err != nil {
			return err
		}
		cfg.Routes = slices.Delete(cfg.Routes, i, i+1)
		return nil
	}, nil)
}

// --- backends (flat) and drain ---

func (s *Server) listBackends(c echo.Context) error {
	bs, err := s.opts.Controller.Backends()
	if err != nil {
		return err
	}
	return c.JSON(http.StatusOK, nonNil(bs))
}

// parseBackendID splits "pool:address:port".
func parseBackendID(id string) (string, netip.AddrPort, error) {
	pool, rest, ok := strings.Cut(id, ":")
	if !ok {
		return "", netip.AddrPort{}, badRequest("backend id %q: want pool:address:port", id)
	}
	ap, err := parseHostPort(rest)
	if err != nil {
		return "", netip.AddrPort{}, badRequest("backend id %q: %v", id, err)
	}
	return pool, ap, nil
}

func (s *Server) setDrain(c echo.Context, drained bool) error {
	pool, ap, err := parseBackendID(c.Param("id"))
	if err != nil {
		return err
	}
	if err := s.opts.Controller.SetDrained(c.Request().Context(), pool, ap.String(), drained); err != nil {
		return err
	}
	bs, err := s.opts.Controller.Backends()
	if err != nil {
		return err
	}
	for _, b := range bs {
		if b.Pool == pool && b.Address == ap.Addr().String() && b.Port == int(ap.Port()) {
			return c.JSON(http.StatusOK, b)
		}
	}
	return notFound("backend %s disappeared", c.Param("id"))
}

func (s *Server) drainBackend(c echo.Context) error   { return s.setDrain(c, true) }
func (s *Server) undrainBackend(c echo.Context) error { return s.setDrain(c, false) }

// --- metrics, flows ---

func (s *Server) metrics(c echo.Context) error {
	return c.JSON(http.StatusOK, s.opts.Controller.Metrics())
}

func (s *Server) flows(c echo.Context) error {
	limit := 100
	if q := c.QueryParam("limit"); q != "" {
		n, err := strconv.Atoi(q)
		if err != nil || n < 1 || n > 100000 {
			return &Error{Status: http.StatusBadRequest, Code: "bad_request", Field: "limit",
				Message: fmt.Sprintf("limit %q: want 1..100000", q)}
		}
		limit = n
	}
	fs, err := s.opts.Controller.Flows(limit)
	if err != nil {
		return err
	}
	return c.JSON(http.StatusOK, nonNil(fs))
}

// --- denylist ---

func (s *Server) getDenylist(c echo.Context) error {
	return c.JSON(http.StatusOK, map[string]any{"prefixes": nonNil(s.opts.Controller.Config().Security.Denylist)})
}

// canonicalPrefix is a denylist entry as the configuration stores it, so
// that adding and lifting compare like with like.
func canonicalPrefix(in string) (string, error) {
	p, err := config.ParseDenyPrefix(strings.TrimSpace(in))
	if err != nil {
		return "", err
	}
	return p.String(), nil
}

func (s *Server) addDeny(c echo.Context) error {
	data, err := readBody(c)
	if err != nil {
		return err
	}
	var body struct {
		Prefix string `yaml:"prefix"`
	}
	n := len(s.opts.Controller.Config().Security.Denylist)
	if err := config.DecodeFragment(data, fmt.Sprintf("security.denylist[%d]", n), &body); err != nil {
		return err
	}
	p, err := canonicalPrefix(body.Prefix)
	if err != nil {
		return &Error{Status: http.StatusBadRequest, Code: "bad_request", Field: "prefix", Message: err.Error()}
	}
	return s.update(c, http.StatusCreated, func(cfg *config.Config) error {
		if slices.Contains(cfg.Security.Denylist, p) {
			return conflict("%s is already denied", p)
		}
		cfg.Security.Denylist = append(cfg.Security.Denylist, p)
		return nil
	}, func(*config.Config) any { return map[string]string{"prefix": p} })
}

func (s *Server) removeDeny(c echo.Context) error {
	p, err := canonicalPrefix(c.QueryParam("prefix"))
	if err != nil {
		return &Error{Status: http.StatusBadRequest, Code: "bad_request", Field: "prefix", Message: err.Error()}
	}
	return s.update(c, 0, func(cfg *config.Config) error {
		i := slices.Index(cfg.Security.Denylist, p)
		if i < 0 {
			return notFound("%s is not denied", p)
		}
		cfg.Security.Denylist = slices.Delete(cfg.Security.Denylist, i, i+1)
		return nil
	}, nil)
}

// --- WebSocket ---

func (s *Server) webSocket(c echo.Context) error {
	channel := c.Param("channel")
	if !slices.Contains(Channels, channel) {
		return notFound("no WebSocket channel %q (channels: %s)", channel, strings.Join(Channels, ", "))
	}
	return s.opts.Hub.ServeChannel(c.Response(), c.Request(), channel)
}

// nonNil makes empty lists encode as [] rather than null.
func nonNil[T any](s []T) []T {
	if s == nil {
		return []T{}
	}
	return s
}
