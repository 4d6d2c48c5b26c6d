package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"time"
)

// defaultAPI is where the agent's API listens by default (api.listen).
const defaultAPI = "http://127.0.0.1:9090"

// bgpTable renders GET /api/bgp (the agent's api.BGPView): the BGP state
// lives in the agent, not in the pinned maps, so this command asks the
// agent's API. It decodes the JSON itself rather than import the agent's
// API package, which would double vfctl's size; the test checks the two
// against each other.
type bgpTable struct {
	Enabled     bool   `json:"enabled"`
	ASN         uint32 `json:"asn,omitempty"`
	RouterID    string `json:"router_id,omitempty"`
	NodeDrained bool   `json:"node_drained"`
	Peers       []struct {
		Address       string   `json:"address"`
		ASN           uint32   `json:"asn"`
		State         string   `json:"state"`
		Up            bool     `json:"up"`
		UptimeSeconds float64  `json:"uptime_seconds"`
		Transitions   uint64   `json:"transitions"`
		LastError     string   `json:"last_error,omitempty"`
		RoutesSent    []string `json:"routes_sent"`
	} `json:"peers"`
	VIPs []struct {
		Address   string `json:"address"`
		Announced bool   `json:"announced"`
	} `json:"vips"`
}

func (t bgpTable) table(w io.Writer) error {
	if !t.Enabled {
		fmt.Fprintln(w, "bgp: not configured (no bgp section)")
		return nil
	}
	row(w, "asn:", t.ASN)
	row(w, "router id:", t.RouterID)
	drained := "no"
	if t.NodeDrained {
		drained = "yes: every VIP withdrawn (DELETE /api/node/drain to undo)"
	}
	row(w, "node drained:", drained)
	fmt.Fprintln(w)
	row(w, "PEER", "ASN", "STATE", "FOR", "TRANSITIONS", "ROUTES SENT", "LAST ERROR")
	for _, p := range t.Peers {
		sent := strings.Join(p.RoutesSent, ",")
		if sent == "" {
			sent = "-"
		}
		last := p.LastError
		if last == "" {
			last = "-"
		}
		row(w, p.Address, p.ASN, p.State, (time.Duration(p.UptimeSeconds) * time.Second).String(), p.Transitions, sent, last)
	}
	fmt.Fprintln(w)
	row(w, "VIP", "ANNOUNCED")
	for _, v := range t.VIPs {
		row(w, v.Address, v.Announced)
	}
	return nil
}

// runBGP is `vfctl bgp [--api URL] [--token-file F]`.
func runBGP(args []string, format string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("vfctl bgp", flag.ContinueOnError)
	fs.SetOutput(stderr)
	base := fs.String("api", defaultAPI, "the agent's API")
	tokenFile := fs.String("token-file", "", "API token file, when the agent protects reads (api.protect_reads)")
	fs.StringVar(&format, "o", format, "output format: table or json")
	if err := fs.Parse(args); err != nil {
		return parseExit(err)
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "vfctl bgp: unexpected argument %q\n", fs.Arg(0))
		return 2
	}
	if format != "table" && format != "json" {
		fmt.Fprintf(stderr, "vfctl: -o %q: want table or json\n", format)
		return 2
	}
	v, err := fetchBGP(*base, *tokenFile)
	if err == nil {
		err = render(stdout, v, format)
	}
	if err != nil {
		fmt.Fprintf(stderr, "vfctl bgp: %v\n", err)
		return 1
	}
	return 0
}

func fetchBGP(base, tokenFile string) (bgpTable, error) {
	var v bgpTable
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	url := strings.TrimSuffix(base, "/") + "/api/bgp"
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return v, fmt.Errorf("--api %q: %w", base, err)
	}
	if tokenFile != "" {
		token, err := os.ReadFile(tokenFile)
		if err != nil {
			return v, err
		}
		req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(token)))
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return v, fmt.Errorf("ask the agent (is it running, is --api right?): %w", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return v, fmt.Errorf("read %s: %w", url, err)
	}
	if resp.StatusCode != http.StatusOK {
		return v, fmt.Errorf("GET %s: %s: %s", url, resp.Status, strings.TrimSpace(string(body)))
	}
	if err := json.Unmarshal(body, &v); err != nil {
		return v, errors.Join(fmt.Errorf("GET %s: not the agent's answer", url), err)
	}
	return v, nil
}
