package api

import (
	"crypto/rand"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/gorilla/websocket"
	"github.com/labstack/echo/v4"
)

// webSocketProtocol is the subprotocol the hub answers with; a browser
// offers it together with "bearer.<token>", because it cannot set an
// Authorization header on a WebSocket.
const webSocketProtocol = "veloflux"

// webSocketToken finds "bearer.<token>" among the offered subprotocols.
func webSocketToken(r *http.Request) (string, bool) {
	for _, p := range websocket.Subprotocols(r) {
		if t, ok := strings.CutPrefix(p, "bearer."); ok {
			return t, true
		}
	}
	return "", false
}

// LoadOrCreateToken reads the API token from path, creating it (mode 0600,
// 32 random bytes as hex) when the file does not exist.
func LoadOrCreateToken(path string) (string, error) {
	data, err := os.ReadFile(path)
	if err == nil {
		token := strings.TrimSpace(string(data))
		if len(token) < 16 {
			return "", fmt.Errorf("API token file %s holds %d characters; want at least 16", path, len(token))
		}
		return token, nil
	}
	if !errors.Is(err, os.ErrNotExist) {
		return "", fmt.Errorf("read API token file %s: %w", path, err)
	}
	var raw [32]byte
	if _, err := rand.Read(raw[:]); err != nil {
		return "", fmt.Errorf("generate API token: %w", err)
	}
	token := hex.EncodeToString(raw[:])
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return "", fmt.Errorf("create directory of API token file %s: %w", path, err)
	}
	// O_EXCL: two agents starting at once must not overwrite each other's token.
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return "", fmt.Errorf("create API token file %s: %w", path, err)
	}
	if _, err := f.WriteString(token + "\n"); err != nil {
		f.Close()
		return "", fmt.Errorf("write API token file %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return "", fmt.Errorf("write API token file %s: %w", path, err)
	}
	return token, nil
}

// requireToken admits a write, or a read while reads are protected, only
// with "Authorization: Bearer <token>", compared in constant time. A
// failure is answered 401 and reported as a security event. The access
// rules in force are read per request, so a reload changes them at once.
func (s *Server) requireToken(next echo.HandlerFunc, write bool) echo.HandlerFunc {
	return func(c echo.Context) error {
		access := s.access.Load()
		if !write && !access.ProtectReads {
			return next(c)
		}
		want := []byte(access.Token)
		got, ok := strings.CutPrefix(c.Request().Header.Get(echo.HeaderAuthorization), "Bearer ")
		if !ok {
			got, ok = webSocketToken(c.Request())
		}
		reason := ""
		switch {
		case !ok:
			reason = "missing bearer token"
		case len(want) == 0 || subtle.ConstantTimeCompare([]byte(strings.TrimSpace(got)), want) != 1:
			reason = "wrong bearer token"
		}
		if reason == "" {
			return next(c)
		}
		if s.opts.SecurityEvents != nil {
			s.opts.SecurityEvents(SecurityEvent{Kind: "auth_failure", Remote: c.RealIP(), Method: c.Request().Method,
				Path: c.Request().URL.Path, Reason: reason, At: time.Now().UTC()})
		}
		c.Response().Header().Set(echo.HeaderWWWAuthenticate, `Bearer realm="veloflux"`)
		return newError(http.StatusUnauthorized, "unauthorized", "%s: send Authorization: Bearer <token from the API token file>", reason)
	}
}
