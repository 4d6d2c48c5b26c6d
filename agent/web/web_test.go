package web

import (
	"bytes"
	"compress/gzip"
	"encoding/json"
	"io"
	"io/fs"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strings"
	"testing"
)

func get(t *testing.T, h http.Handler, path string, header ...string) *http.Response {
	t.Helper()
	req := httptest.NewRequest(http.MethodGet, path, nil)
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	return rec.Result()
}

func body(t *testing.T, resp *http.Response) string {
	t.Helper()
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestPagesAndHeaders(t *testing.T) {
	h := Handler()
	for path, want := range map[string]string{
		"/":                   "text/html; charset=utf-8",
		"/dashboard":          "text/html; charset=utf-8",
		"/assets/app.css":     "text/css; charset=utf-8",
		"/assets/js/live.js":  "text/javascript; charset=utf-8",
		"/assets/favicon.svg": "image/svg+xml",
	} {
		resp := get(t, h, path)
		if resp.StatusCode != http.StatusOK {
			t.Errorf("GET %s: %s", path, resp.Status)
			continue
		}
		if got := resp.Header.Get("Content-Type"); got != want {
			t.Errorf("GET %s: Content-Type %q, want %q", path, got, want)
		}
		if csp := resp.Header.Get("Content-Security-Policy"); !strings.Contains(csp, "default-src 'self'") {
			t.Errorf("GET %s: CSP %q", path, csp)
		}
		if resp.Header.Get("ETag") == "" || resp.Header.Get("X-Content-Type-Options") != "nosniff" {
			t.Errorf("GET %s: headers %v", path, resp.Header)
		}
	}
}

func TestNotFoundInAPIFormat(t *testing.T) {
	resp := get(t, Handler(), "/assets/nope.js")
	if resp.StatusCode != http.StatusNotFound {
		t.Fatalf("status %s, want 404", resp.Status)
	}
	var e struct {
		Error struct{ Code, Message string }
	}
	if err := json.Unmarshal([]byte(body(t, resp)), &e); err != nil || e.Error.Code != "not_found" || e.Error.Message == "" {
		t.Fatalf("body is not the API's error format: %+v, %v", e, err)
	}
	req := httptest.NewRequest(http.MethodPost, "/", nil)
	rec := httptest.NewRecorder()
	Handler().ServeHTTP(rec, req)
	if rec.Code != http.StatusMethodNotAllowed {
		t.Errorf("POST /: %d, want 405", rec.Code)
	}
}

func TestGzipAndRevalidation(t *testing.T) {
	h := Handler()
	plain := body(t, get(t, h, "/assets/vendor/uplot/uPlot.esm.js"))
	resp := get(t, h, "/assets/vendor/uplot/uPlot.esm.js", "Accept-Encoding", "br, gzip")
	if resp.Header.Get("Content-Encoding") != "gzip" || !strings.Contains(resp.Header.Get("Vary"), "Accept-Encoding") {
		t.Fatalf("no gzip: %v", resp.Header)
	}
	zr, err := gzip.NewReader(bytes.NewReader([]byte(body(t, resp))))
	if err != nil {
		t.Fatal(err)
	}
	unzipped, _ := io.ReadAll(zr)
	if string(unzipped) != plain {
		t.Fatal("gzip body differs from the plain one")
	}
	if get(t, h, "/", "Accept-Encoding", "gzip;q=0").Header.Get("Content-Encoding") != "" {
		t.Error("gzip;q=0 got gzip")
	}
	tag := resp.Header.Get("ETag")
	if r := get(t, h, "/assets/vendor/uplot/uPlot.esm.js", "Accept-Encoding", "gzip", "If-None-Match", tag); r.StatusCode != http.StatusNotModified {
		t.Errorf("If-None-Match %s: %s, want 304", tag, r.Status)
	}
}

var (
	htmlRef   = regexp.MustCompile(`(?:src|href)="([^"#]*)"`)
	importRef = regexp.MustCompile(`(?m)^\s*import\s[^"]*"([^"]+)"`)
	external  = regexp.MustCompile(`(?i)(?:src|href)\s*=\s*["']?(?:https?:)?//|@import|url\(\s*["']?(?:https?:)?//|from\s+["'](?:https?:)?//`)
)

// Every page and module reference must resolve to an embedded file, and
// nothing of ours may point at another origin (the browser test checks the
// same at run time).
func TestReferencesResolveLocally(t *testing.T) {
	h := Handler()
	check := func(from, ref string) {
		if ref == "" || strings.HasPrefix(ref, "/api/") || ref == "/" || ref == "/dashboard" {
			return
		}
		if !strings.HasPrefix(ref, "/assets/") {
			t.Errorf("%s: reference %q is not under /assets/", from, ref)
			return
		}
		if r := get(t, h, ref); r.StatusCode != http.StatusOK {
			t.Errorf("%s: %s: %s", from, ref, r.Status)
		}
	}
	for _, page := range []string{"pages/index.html", "pages/dashboard.html"} {
		b, _ := files.ReadFile(page)
		for _, m := range htmlRef.FindAllStringSubmatch(string(b), -1) {
			check(page, m[1])
		}
		if external.Match(b) {
			t.Errorf("%s references another origin: %q", page, external.Find(b))
		}
	}
	err := fs.WalkDir(files, "assets", func(name string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() || strings.Contains(name, "/vendor/") {
			return err
		}
		b, _ := files.ReadFile(name)
		if external.Match(b) {
			t.Errorf("%s references another origin: %q", name, external.Find(b))
		}
		if !strings.HasSuffix(name, ".js") {
			return nil
		}
		dir := "/" + name[:strings.LastIndexByte(name, '/')]
		for _, m := range importRef.FindAllStringSubmatch(string(b), -1) {
			ref := m[1]
			for strings.HasPrefix(ref, "../") {
				ref, dir = ref[3:], dir[:strings.LastIndexByte(dir, '/')]
			}
			check(name, dir+"/"+strings.TrimPrefix(ref, "./"))
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
