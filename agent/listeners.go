package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"
)

// httpSlot serves one handler (the API, the metrics) on an address that a
// reload may change. A change is made in two steps, so that it is all or
// nothing with the rest of the configuration: prepare binds the new address
// (a port in use fails the reload before anything else moved), and commit,
// once everything else applied, starts serving there and shuts the old
// server down gracefully. Connections open on the old address finish.
type httpSlot struct {
	what    string // "API", "metrics": for logs and errors
	setting string // the configuration key of the address
	handler http.Handler
	log     *slog.Logger

	mu   sync.Mutex
	addr string
	srv  *http.Server
	done chan struct{} // closed when srv's Serve returns
}

// slotChange is a prepared change of address; exactly one of commit and
// abort must be called.
type slotChange struct {
	slot *httpSlot
	addr string
	ln   net.Listener // nil when the address does not change
}

func newHTTPSlot(what, setting string, h http.Handler, log *slog.Logger) *httpSlot {
	return &httpSlot{what: what, setting: setting, handler: h, log: log}
}

// prepare binds addr unless the slot already serves it.
func (s *httpSlot) prepare(addr string) (*slotChange, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.srv != nil && addr == s.addr {
		return &slotChange{slot: s, addr: addr}, nil
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("%s: %s listener on %s: %w", s.setting, s.what, addr, err)
	}
	return &slotChange{slot: s, addr: addr, ln: ln}, nil
}

func (c *slotChange) abort() {
	if c != nil && c.ln != nil {
		c.ln.Close()
	}
}

// commit serves on the prepared listener and retires the previous server.
func (c *slotChange) commit() {
	if c == nil || c.ln == nil {
		return
	}
	s := c.slot
	srv := &http.Server{Handler: s.handler, ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 120 * time.Second}
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := srv.Serve(c.ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.log.Error(s.what+" server stopped", "addr", c.addr, "err", err)
		}
	}()
	s.mu.Lock()
	old, oldAddr, oldDone := s.srv, s.addr, s.done
	s.srv, s.addr, s.done = srv, c.addr, done
	s.mu.Unlock()
	s.log.Info(s.what+" listening", "addr", c.ln.Addr().String())
	if old != nil {
		s.log.Info(s.what+" moved; closing the old listener", "from", oldAddr, "to", c.addr)
		go shutdownServer(old, oldDone)
	}
}

// close shuts the slot's server down, waiting for it within ctx.
func (s *httpSlot) close() {
	s.mu.Lock()
	srv, done := s.srv, s.done
	s.srv = nil
	s.mu.Unlock()
	if srv != nil {
		shutdownServer(srv, done)
	}
}

func shutdownServer(srv *http.Server, done <-chan struct{}) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		srv.Close()
	}
	<-done
}
