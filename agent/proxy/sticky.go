package proxy

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"net/http"
)

// Sticky cookies pin a client to a backend. The value is
//
//	base64url(id ‖ HMAC-SHA256(key, "veloflux-sticky\x00" ‖ pool ‖ "\x00" ‖ id)[:16])
//
// where id = HMAC-SHA256(key, "veloflux-sticky-id\x00" ‖ backend key)[:8]. The
// id is keyed, so the cookie reveals nothing about the backend's address
// (not even to someone guessing addresses), it is stable across reloads,
// restarts and nodes sharing the key, and it does not depend on the order of
// backends in the configuration. The signature binds the id to the pool, so
// a cookie cannot be moved to another pool or altered.
//
// A cookie value is a deterministic function of (key, pool, backend), so
// every valid value is precomputed when a configuration is applied and
// checking a cookie is a map lookup: a value is in the map exactly when its
// signature verifies. Anything else (tampered, truncated, from another key
// or pool, or naming a backend no longer configured) is ignored.

const (
	stickyIDLabel  = "veloflux-sticky-id\x00"
	stickySigLabel = "veloflux-sticky\x00"
	stickyIDLen    = 8
	stickySigLen   = 16
)

func stickyID(key []byte, backendKey string) (id [stickyIDLen]byte) {
	mac := hmac.New(sha256.New, key)
	mac.Write([]byte(stickyIDLabel))
	mac.Write([]byte(backendKey))
	copy(id[:], mac.Sum(nil))
	return id
}

func stickyValue(key []byte, pool string, id [stickyIDLen]byte) string {
	mac := hmac.New(sha256.New, key)
	mac.Write([]byte(stickySigLabel))
	mac.Write([]byte(pool))
	mac.Write([]byte{0})
	mac.Write(id[:])
	var raw [stickyIDLen + stickySigLen]byte
	copy(raw[:], id[:])
	copy(raw[stickyIDLen:], mac.Sum(nil))
	return base64.RawURLEncoding.EncodeToString(raw[:])
}

// stickyMember returns the member the request's sticky cookie names, or nil.
func (p *pool) stickyMember(r *http.Request) *member {
	if p.sticky == "" {
		return nil
	}
	c, err := r.Cookie(p.sticky)
	if err != nil {
		return nil
	}
	return p.cookies[c.Value]
}

// stickyCookie is the Set-Cookie value pinning a client to m: a session
// cookie (like HAProxy's "cookie ... insert"), HttpOnly, SameSite=Lax, and
// Secure when the client reached us over HTTPS.
func (p *pool) stickyCookie(m *member, secure bool) string {
	c := http.Cookie{
		Name:     p.sticky,
		Value:    m.cookie,
		Path:     "/",
		HttpOnly: true,
		Secure:   secure,
		SameSite: http.SameSiteLaxMode,
	}
	return c.String()
}
