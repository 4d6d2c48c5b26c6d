// Package api serves VeloFlux's REST API, its seven WebSocket channels and
// the web pages on :9090. It drives the agent only through the Controller
// interface, so every write goes through the same validation, reconcile and
// atomic save as the configuration file.
package api

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/labstack/echo/v4"

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
}

// Options configure the server.
type Options struct {
	Controller     Controller
	Hub            *Hub
	Token          string // bearer token for writes (and reads when ProtectReads)
	ProtectReads   bool
	Version        string
	Logger         *slog.Logger
	SecurityEvents func(SecurityEvent) // API auth failures; may be nil
	// Pages, when set, serves the landing page at / and the dashboard.
	Pages http.Handler
}

// SecurityEvent is an API-side security event (failed authentication).
type SecurityEvent struct {
	Kind   string    `json:"kind"` // "auth_failure"
	Remote string    `json:"remote"`
	Method string    `json:"method"`
	Path   string    `json:"path"`
	Reason string    `json:"reason"`
	At     time.Time `json:"at"`
}

// Server is the :9090 HTTP server.
type Server struct {
	opts   Options
	echo   *echo.Echo
	log    *slog.Logger
	routes []route
}

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
	s := &Server{opts: opts, echo: e, log: opts.Logger}
	s.routes = s.routeTable()
	for _, r := range s.routes {
		h := r.handler
		if r.write || opts.ProtectReads {
			h = s.requireToken(h)
		}
		e.Add(r.method, r.path, h)
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

// Handler is the server's http.Handler (for tests and embedding).
func (s *Server) Handler() http.Handler { return s.echo }

// Serve listens on addr until ctx ends, then shuts down gracefully.
func (s *Server) Serve(ctx context.Context, addr string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("API listen on %s: %w", addr, err)
	}
	srv := &http.Server{
		Handler:           s.echo,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       120 * time.Second,
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	s.log.Info("API listening", "addr", ln.Addr().String())
	select {
	case err := <-errc:
		return fmt.Errorf("API server on %s: %w", addr, err)
	case <-ctx.Done():
	}
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := srv.Shutdown(shutdownCtx); err != nil && !errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("API shutdown: %w", err)
	}
	return nil
}
