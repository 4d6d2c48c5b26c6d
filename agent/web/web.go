// Package web holds VeloFlux's landing page and dashboard: static HTML,
// CSS and plain ES modules embedded in the binary, served by agent/api at
// /, /dashboard and /assets/*. The pages load nothing from elsewhere: the
// one third-party file, the uPlot charting library, is vendored under
// assets/vendor/uplot (see the README there for its version and how to
// refresh it). There is no build step.
package web

import (
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"embed"
	"encoding/hex"
	"encoding/json"
	"io/fs"
	"net/http"
	"path"
	"strconv"
	"strings"
	"sync"
)

//go:embed pages assets
var files embed.FS

// contentSecurityPolicy allows only this origin: scripts, styles, images
// and API/WebSocket connections ('self' covers ws:// and wss:// of the same
// host). uPlot styles elements through the CSSOM, which style-src does not
// restrict, so no 'unsafe-inline' is needed.
const contentSecurityPolicy = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; " +
	"connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"

// types maps the extensions in this package to their media types, so the
// answer does not depend on the host's mime.types.
var types = map[string]string{
	".html": "text/html; charset=utf-8",
	".css":  "text/css; charset=utf-8",
	".js":   "text/javascript; charset=utf-8",
	".svg":  "image/svg+xml",
	".txt":  "text/plain; charset=utf-8",
	".md":   "text/plain; charset=utf-8",
}

// file is one servable file, with its gzip form when that is smaller.
type file struct {
	body, gz    []byte
	etag, gzTag string
	ctype       string
}

var (
	loadOnce sync.Once
	byPath   map[string]*file // URL path -> file
	loadErr  error
)

func load() {
	byPath = map[string]*file{}
	add := func(urlPath, name string) error {
		body, err := files.ReadFile(name)
		if err != nil {
			return err
		}
		sum := sha256.Sum256(body)
		f := &file{body: body, etag: `"` + hex.EncodeToString(sum[:8]) + `"`, ctype: types[path.Ext(name)]}
		if f.ctype == "" {
			f.ctype = "application/octet-stream"
		}
		var buf bytes.Buffer
		zw, _ := gzip.NewWriterLevel(&buf, gzip.BestCompression)
		zw.Write(body)
		zw.Close()
		if buf.Len() < len(body) {
			f.gz, f.gzTag = buf.Bytes(), `"`+hex.EncodeToString(sum[:8])+`-gz"`
		}
		byPath[urlPath] = f
		return nil
	}
	if loadErr = add("/", "pages/index.html"); loadErr != nil {
		return
	}
	if loadErr = add("/dashboard", "pages/dashboard.html"); loadErr != nil {
		return
	}
	loadErr = fs.WalkDir(files, "assets", func(name string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		return add("/"+name, name)
	})
}

// Handler serves the pages: the landing page at /, the dashboard at
// /dashboard and their files under /assets/. Anything else is a 404 in the
// API's error format.
func Handler() http.Handler {
	loadOnce.Do(load)
	return http.HandlerFunc(serve)
}

func serve(w http.ResponseWriter, r *http.Request) {
	h := w.Header()
	if loadErr != nil {
		http.Error(w, "embedded pages unreadable: "+loadErr.Error(), http.StatusInternalServerError)
		return
	}
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		h.Set("Allow", "GET, HEAD")
		writeError(w, http.StatusMethodNotAllowed, "method_not_allowed", r.Method+" is not allowed here")
		return
	}
	f, ok := byPath[r.URL.Path]
	if !ok {
		writeError(w, http.StatusNotFound, "not_found", "no page at "+r.URL.Path)
		return
	}
	h.Set("Content-Security-Policy", contentSecurityPolicy)
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Referrer-Policy", "no-referrer")
	h.Set("X-Frame-Options", "DENY")
	// Names carry no content hash: revalidate every time (a 304 is cheap).
	h.Set("Cache-Control", "no-cache")
	h.Set("Content-Type", f.ctype)
	body, tag := f.body, f.etag
	if f.gz != nil {
		h.Add("Vary", "Accept-Encoding")
		if acceptsGzip(r.Header.Get("Accept-Encoding")) {
			body, tag = f.gz, f.gzTag
			h.Set("Content-Encoding", "gzip")
		}
	}
	h.Set("ETag", tag)
	if match := r.Header.Get("If-None-Match"); match != "" && etagMatches(match, tag) {
		w.WriteHeader(http.StatusNotModified)
		return
	}
	h.Set("Content-Length", strconv.Itoa(len(body)))
	if r.Method == http.MethodHead {
		return
	}
	w.Write(body)
}

// acceptsGzip reports whether Accept-Encoding allows gzip (q above 0).
func acceptsGzip(header string) bool {
	for part := range strings.SplitSeq(header, ",") {
		coding, params, _ := strings.Cut(strings.TrimSpace(part), ";")
		if !strings.EqualFold(strings.TrimSpace(coding), "gzip") {
			continue
		}
		q, found := strings.CutPrefix(strings.ReplaceAll(params, " ", ""), "q=")
		if !found {
			return true
		}
		v, err := strconv.ParseFloat(q, 64)
		return err == nil && v > 0
	}
	return false
}

// etagMatches reports whether If-None-Match names tag (weakly compared).
func etagMatches(header, tag string) bool {
	for part := range strings.SplitSeq(header, ",") {
		p := strings.TrimPrefix(strings.TrimSpace(part), "W/")
		if p == tag || p == "*" {
			return true
		}
	}
	return false
}

// writeError answers in the API's error format.
func writeError(w http.ResponseWriter, status int, code, message string) {
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(map[string]any{"error": map[string]string{"code": code, "message": message}})
}
