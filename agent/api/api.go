// Package api serves VeloFlux's REST API, its seven WebSocket channels and
// the web pages on :9090. It drives the agent only through the Controller
// interface, so every write goes through the same validation, reconcile and
// atomic save as the configuration file.
package api

import (
	"context"
	"log/slog"
	"net/http"
	"sync/atomic"
	"time"

	"github.com/labstack/echo/v4"
	"github.com/labstack/echo/v4/middleware"

	"github.com/veloflux/veloflux/agent/config"
)

// Controller is the agent as the API sees it.
type Controller interface {
	Status() StatusView
	// Config returns the configuration in force; callers must not modify it.
	Config() *config.Config
	// Update applies mutate to a copy of the configuration, validates the
	// result as a whole, saves it atomically and reconciles. Nothing is
	// applied when mutate or validation fails.
	Update(ctx context.Context, mutate func(*config.Config) error) (*config.Config, error)
	// ValidateConfig parses a candidate configuration without applying it.
	ValidateConfig(data []byte) (*config.Config, error)
	Reload(ctx context.Context) error
	Backends() ([]BackendView, error)
	SetDrained(ctx context.Context, pool, backend string, drained bool) error
	Metrics() MetricsView
	Flows(limit int) ([]FlowView, error)
	// DrainProxy closes the L7 listeners and lets in-flight requests
	// finish; /health then reports draining.
	DrainProxy(ctx context.Context) error
	// SetNodeDrained withdraws (or announces again) every VIP of this
	// node over BGP while the data path keeps forwarding; it persists.
	SetNodeDrained(ctx context.Context, drained bool) error
	// BGP is the speaker's state: sessions and announced VIPs.
	BGP() BGPView
	// VIPRings describes each VIP's installed ring by VIP id
	// (protocol:address:port); VIPs without an installed ring are absent.
	VIPRings() map[string]RingView
}

// Options configure the server.
type Options struct {
	Controller     Controller
	Hub            *Hub
	Token          string // bearer token for writes (and reads when ProtectReads)
	ProtectReads   bool
	Version        string
	Logger         *slog.Logger
	SecurityEvents func(SecurityEvent) // auth failures, at most one event per 10 s with a count; may be nil
	// Pages, when set, serves the landing page at / and the dashboard.
	Pages http.Handler
}

// SecurityEvent is an API-side security event (failed authentication): the
// latest failure of a burst, with the number of failures it stands for.
type SecurityEvent struct {
	Kind   string    `json:"kind"` // "auth_failure"
	Remote string    `json:"remote"`
	Method string    `json:"method"`
	Path   string    `json:"path"`
	Reason string    `json:"reason"`
	At     time.Time `json:"at"`
	Count  int       `json:"count"` // failures reported by this event, at least 1
}

// Server is the :9090 HTTP server.
type Server struct {
	opts         Options
	echo         *echo.Echo
	log          *slog.Logger
	routes       []route
	access       atomic.Pointer[Access]
	authFailures *authFailureReporter
}

// Access is who may do what: the token that writes (and reads when
// ProtectReads). A reload changes it with SetAccess, for the next request.
type Access struct {
	Token        string
	ProtectReads bool
}

// SetAccess puts a new token and read protection in force.
func (s *Server) SetAccess(a Access) { s.access.Store(&a) }

// route is one REST endpoint; the table drives both the router and the
// OpenAPI document, so the two cannot disagree.
type route struct {
	method  string
	path    string // echo syntax: /api/pools/:name
	summary string
	write   bool   // needs the token
	body    string // request body schema in the OpenAPI document, "" for none
	handler echo.HandlerFunc
}

// New builds the server and its routes.
func New(opts Options) *Server {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	e := echo.New()
	e.HideBanner, e.HidePort = true, true
	e.IPExtractor = echo.ExtractIPDirect() // never trust client-sent forwarding headers here
	e.HTTPErrorHandler = errorHandler(opts.Logger)
	s := &Server{opts: opts, echo: e, log: opts.Logger,
		authFailures: newAuthFailureReporter(authFailureInterval, opts.Logger, opts.SecurityEvents)}
	s.SetAccess(Access{Token: opts.Token, ProtectReads: opts.ProtectReads})
	if opts.Hub != nil {
		e.Use(corsMiddleware(opts.Hub))
	}
	s.routes = s.routeTable()
	for _, r := range s.routes {
		e.Add(r.method, r.path, s.requireToken(r.handler, r.write))
	}
	if opts.Pages != nil {
		page := echo.WrapHandler(opts.Pages)
		for _, p := range []string{"/", "/dashboard", "/assets/*"} {
			e.GET(p, page)
			e.HEAD(p, page)
		}
	}
	return s
}

// corsPreflightMaxAge is how long a browser may cache a preflight answer.
// An origin a reload removes loses access at once all the same: the
// responses themselves stop carrying its Access-Control-Allow-Origin.
const corsPreflightMaxAge = 10 * time.Minute

// corsMiddleware lets pages of the hub's allowed origins (those in force,
// reloads included) call the REST API
// from a browser. A preflight is answered with the methods the router has
// for the path and the two request headers the API reads; it never reaches
// a handler, so it needs no token. An origin that is not listed gets no
// Access-Control-Allow-* header, and the browser keeps the response from
// the page.
func corsMiddleware(hub *Hub) echo.MiddlewareFunc {
	return middleware.CORSWithConfig(middleware.CORSConfig{
		// Decides alone, so echo's default of "*" for an empty list never applies.
		AllowOriginFunc: func(origin string) (bool, error) { return hub.listsOrigin(origin), nil },
		AllowHeaders:    []string{echo.HeaderAuthorization, echo.HeaderContentType},
		MaxAge:          int(corsPreflightMaxAge / time.Second),
	})
}

// Handler is the server's http.Handler (for tests and embedding).
func (s *Server) Handler() http.Handler { return s.echo }

// Close reports the failed authentications still held back by the rate
// bound, so that a stopping agent logs every failure. Call it once no
// request is served any more.
func (s *Server) Close() { s.authFailures.close() }
