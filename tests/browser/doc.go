// Package browser drives VeloFlux's landing page and dashboard in headless
// Chromium (through chromedp) against a live agent on the namespace lab,
// with real traffic flowing through the XDP balancer.
//
// The agent (built from this checkout) runs in the test's own namespace
// (lab.Options.BalancerInRoot) on free localhost ports, so the browser opens
// http://127.0.0.1:<port>. Its pins live on a private BPF filesystem under
// the test's temporary directory. The browser, the agent, the traffic, the
// mount and the lab are removed in t.Cleanup, also on failure.
// Screenshots go to tests/artifacts/ (ignored by git).
//
// The test skips without root or without /usr/bin/chromium (override with
// VELOFLUX_CHROMIUM), and fails instead when VELOFLUX_REQUIRE_PRIV=1:
//
//	sudo go test ./tests/browser/ -count=1 -v
package browser
