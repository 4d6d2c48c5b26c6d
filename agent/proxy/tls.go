package proxy

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/veloflux/veloflux/agent/config"
)

// certStore holds the certificates served on the HTTPS listener and picks
// one per handshake by SNI. It outlives configurations: the listener's
// tls.Config calls get, which reads the current index, so neither a new
// configuration nor a renewed certificate needs the listener reopened.
type certStore struct {
	log   *slog.Logger
	mu    sync.Mutex // serializes prepare/commit/reload
	pairs []*certPair
	index atomic.Pointer[certIndex]
}

// certPair is one configured certificate and the state of its files.
type certPair struct {
	certFile, keyFile string
	stamp             fileStamp // of the files the current cert came from
	bad               fileStamp // of files that failed to load, not retried until they change
	cert              *tls.Certificate
}

// fileStamp identifies a version of a certificate and key file pair.
type fileStamp struct {
	certMod, keyMod   time.Time
	certSize, keySize int64
}

func statPair(certFile, keyFile string) (fileStamp, error) {
	ci, err := os.Stat(certFile)
	if err != nil {
		return fileStamp{}, err
	}
	ki, err := os.Stat(keyFile)
	if err != nil {
		return fileStamp{}, err
	}
	return fileStamp{certMod: ci.ModTime(), keyMod: ki.ModTime(), certSize: ci.Size(), keySize: ki.Size()}, nil
}

// certIndex maps server names to certificates. Several certificates may
// serve one name (say ECDSA and RSA); the first the client supports wins.
type certIndex struct {
	exact    map[string][]*tls.Certificate
	wildcard map[string][]*tls.Certificate // "example.com" for "*.example.com"
	fallback *tls.Certificate              // the first configured
}

func loadPair(certFile, keyFile string) (*tls.Certificate, fileStamp, error) {
	st, err := statPair(certFile, keyFile)
	if err != nil {
		return nil, fileStamp{}, err
	}
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, st, err
	}
	if cert.Leaf == nil {
		if cert.Leaf, err = x509.ParseCertificate(cert.Certificate[0]); err != nil {
			return nil, st, err
		}
	}
	// A file rewritten while we read it could give a pair from two
	// versions; the stamp is taken before reading, so such a race only
	// causes one more (harmless) reload on the next poll.
	return &cert, st, nil
}

// prepare loads what cfg needs without changing the store: pairs already
// loaded from unchanged files are reused, changed and new ones are read. A
// certificate that cannot be loaded fails the whole configuration if it is
// new, and keeps its previous version (with an error logged) if it was
// already being served, exactly as a reload would.
func (s *certStore) prepare(certs []config.TLSCert) ([]*certPair, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]*certPair, 0, len(certs))
	var errs []error
	for _, c := range certs {
		var old *certPair
		for _, p := range s.pairs {
			if p.certFile == c.CertFile && p.keyFile == c.KeyFile {
				old = p
				break
			}
		}
		if old != nil {
			cp := *old
			s.refresh(&cp)
			out = append(out, &cp)
			continue
		}
		cert, st, err := loadPair(c.CertFile, c.KeyFile)
		if err != nil {
			errs = append(errs, fmt.Errorf("proxy: tls certificate %s / %s: %w", c.CertFile, c.KeyFile, err))
			continue
		}
		s.logLoaded("loaded", c.CertFile, cert)
		out = append(out, &certPair{certFile: c.CertFile, keyFile: c.KeyFile, stamp: st, cert: cert})
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return out, nil
}

// commit makes prepared pairs the served set.
func (s *certStore) commit(pairs []*certPair) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.pairs = pairs
	s.index.Store(buildIndex(pairs))
}

// reload re-reads the certificates whose files changed. A pair that fails
// to load keeps serving its previous version; the failure is logged once
// per version of the files.
func (s *certStore) reload() {
	s.mu.Lock()
	defer s.mu.Unlock()
	changed := false
	for i, p := range s.pairs {
		cp := *p
		if s.refresh(&cp) {
			s.pairs[i] = &cp
			changed = true
		}
	}
	if changed {
		s.index.Store(buildIndex(s.pairs))
	}
}

// refresh reloads p if its files changed; it reports a new certificate.
// Called with s.mu held.
func (s *certStore) refresh(p *certPair) bool {
	st, err := statPair(p.certFile, p.keyFile)
	if err != nil {
		if p.bad != (fileStamp{}) {
			return false
		}
		p.bad = fileStamp{certSize: -1}
		s.log.Error("proxy: tls certificate unreadable; still serving the previous one",
			"cert_file", p.certFile, "key_file", p.keyFile, "err", err)
		return false
	}
	if st == p.stamp || st == p.bad {
		return false
	}
	cert, st, err := loadPair(p.certFile, p.keyFile)
	if err != nil {
		p.bad = st
		s.log.Error("proxy: tls certificate reload failed; still serving the previous one",
			"cert_file", p.certFile, "key_file", p.keyFile, "err", err)
		return false
	}
	p.cert, p.stamp, p.bad = cert, st, fileStamp{}
	s.logLoaded("reloaded", p.certFile, cert)
	return true
}

func (s *certStore) logLoaded(what, file string, c *tls.Certificate) {
	attrs := []any{"cert_file", file, "names", certNames(c.Leaf), "not_after", c.Leaf.NotAfter}
	if left := time.Until(c.Leaf.NotAfter); left < 14*24*time.Hour {
		s.log.Warn("proxy: tls certificate "+what+"; it expires soon", append(attrs, "expires_in", left.Round(time.Minute).String())...)
		return
	}
	s.log.Info("proxy: tls certificate "+what, attrs...)
}

// certNames are the names a certificate is selected for: its DNS and IP
// SANs, or its subject common name when it has no SAN.
func certNames(leaf *x509.Certificate) []string {
	names := make([]string, 0, len(leaf.DNSNames)+len(leaf.IPAddresses))
	for _, n := range leaf.DNSNames {
		names = append(names, strings.TrimSuffix(strings.ToLower(n), "."))
	}
	for _, ip := range leaf.IPAddresses {
		names = append(names, ip.String())
	}
	if len(names) == 0 && leaf.Subject.CommonName != "" {
		names = append(names, strings.ToLower(leaf.Subject.CommonName))
	}
	return names
}

func buildIndex(pairs []*certPair) *certIndex {
	idx := &certIndex{exact: map[string][]*tls.Certificate{}, wildcard: map[string][]*tls.Certificate{}}
	for _, p := range pairs {
		if idx.fallback == nil {
			idx.fallback = p.cert
		}
		for _, n := range certNames(p.cert.Leaf) {
			if suffix, ok := strings.CutPrefix(n, "*."); ok {
				idx.wildcard[suffix] = append(idx.wildcard[suffix], p.cert)
			} else {
				idx.exact[n] = append(idx.exact[n], p.cert)
			}
		}
	}
	return idx
}

// get is tls.Config.GetCertificate: the certificate for the client's SNI
// (exact name, then a wildcard one label deep, as TLS wildcards match), or
// the first configured certificate.
func (s *certStore) get(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
	idx := s.index.Load()
	if idx == nil || idx.fallback == nil {
		return nil, errors.New("proxy: no tls certificate configured")
	}
	name := strings.TrimSuffix(strings.ToLower(hello.ServerName), ".")
	if name != "" {
		if c := pickCert(hello, idx.exact[name]); c != nil {
			return c, nil
		}
		if i := strings.IndexByte(name, '.'); i > 0 {
			if c := pickCert(hello, idx.wildcard[name[i+1:]]); c != nil {
				return c, nil
			}
		}
	}
	return idx.fallback, nil
}

func pickCert(hello *tls.ClientHelloInfo, certs []*tls.Certificate) *tls.Certificate {
	if len(certs) == 1 {
		return certs[0]
	}
	for _, c := range certs {
		if hello.SupportsCertificate(c) == nil {
			return c
		}
	}
	if len(certs) > 0 {
		return certs[0]
	}
	return nil
}

// tlsConfig is the HTTPS listener's configuration.
func (s *certStore) tlsConfig() *tls.Config {
	return &tls.Config{
		MinVersion:     tls.VersionTLS12,
		GetCertificate: s.get,
		NextProtos:     []string{"h2", "http/1.1"},
	}
}
