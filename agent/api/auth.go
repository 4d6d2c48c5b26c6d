package api

import (
	"crypto/rand"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/gorilla/websocket"
	"github.com/labstack/echo/v4"

	"github.com/veloflux/veloflux/agent/statefile"
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

// minTokenLength is the shortest token a token file may hold.
const minTokenLength = 16

// LoadOrCreateToken reads the API token from path, creating it (mode 0600,
// 32 random bytes as hex) when the file does not exist. A file holding no
// usable token (empty after a crash, or too short to be a secret) is moved
// aside, logged, and replaced by a new token rather than keeping the agent
// from starting.
func LoadOrCreateToken(path string, log *slog.Logger) (string, error) {
	read := func() (string, bool, error) {
		var token string
		found, err := statefile.Read(path, log, func(data []byte) error {
			token = strings.TrimSpace(string(data))
			if len(token) < minTokenLength {
				return fmt.Errorf("%w: API token file holds %d characters; want at least %d",
					statefile.ErrCorrupt, len(token), minTokenLength)
			}
			return nil
		})
		if err != nil {
			return "", false, fmt.Errorf("read API token file: %w", err)
		}
		return token, found, nil
	}
	if token, found, err := read(); err != nil || found {
		return token, err
	}
	var raw [32]byte
	if _, err := rand.Read(raw[:]); err != nil {
		return "", fmt.Errorf("generate API token: %w", err)
	}
	token := hex.EncodeToString(raw[:])
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return "", fmt.Errorf("create directory of API token file %s: %w", path, err)
	}
	// Exclusive: two agents starting at once must not overwrite each
	// other's token; the second one uses the first one's.
	err := statefile.Write(path, []byte(token+"\n"), statefile.Options{Exclusive: true})
	if errors.Is(err, fs.ErrExist) {
		if token, found, err := read(); err != nil || found {
			return token, err
		}
	}
	if err != nil {
		return "", fmt.Errorf("create API token file: %w", err)
	}
	return token, nil
}

// bearerToken returns the credentials of an "Authorization: Bearer <token>"
// header. The scheme is case-insensitive and may be followed by more than
// one space (RFC 7235 section 2.1).
func bearerToken(header string) (string, bool) {
	scheme, token, ok := strings.Cut(header, " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return "", false
	}
	return strings.TrimLeft(token, " "), true
}

// requireToken admits a write, or a read while reads are protected, only
// with "Authorization: Bearer <token>", compared in constant time. A
// failure is answered 401, logged and reported as a security event at a
// bounded rate (authFailureReporter). The access rules in force are read
// per request, so a reload changes them at once.
func (s *Server) requireToken(next echo.HandlerFunc, write bool) echo.HandlerFunc {
	return func(c echo.Context) error {
		access := s.access.Load()
		if !write && !access.ProtectReads {
			return next(c)
		}
		want := []byte(access.Token)
		got, ok := bearerToken(c.Request().Header.Get(echo.HeaderAuthorization))
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
		s.authFailures.failed(SecurityEvent{Kind: "auth_failure", Remote: c.RealIP(), Method: c.Request().Method,
			Path: c.Request().URL.Path, Reason: reason, At: time.Now().UTC()})
		c.Response().Header().Set(echo.HeaderWWWAuthenticate, `Bearer realm="veloflux"`)
		return newError(http.StatusUnauthorized, "unauthorized", "%s: send Authorization: Bearer <token from the API token file>", reason)
	}
}
