#!/usr/bin/env bash
# VeloFlux API and WebSocket validation: checks a running agent against the
# API and WebSocket contract of docs/ARCHITECTURE.md, for operators after an
# install or upgrade (README, "API and live data"); tests/live runs it too.
#
#   tests/test_websockets_validation.sh [--token-file F] [--drain-proxy] [BASE_URL] [METRICS_URL]
#
#   BASE_URL     the agent's API, default http://localhost:9090
#   METRICS_URL  the agent's Prometheus endpoint, default http://localhost:8080
#   token        $VELOFLUX_TOKEN, or the file given with --token-file (the
#                agent's api.token_file); writes need it
#   $PYTHON      the interpreter with python3-websockets, default
#                /usr/bin/python3 (Debian's; another python3 on PATH may
#                not see Debian's packages)
#
# It exercises every REST endpoint of the agent's route table (and checks
# that against /api/openapi.json, which the agent builds from the same
# table), /metrics, and the first two messages of every one of the seven
# WebSocket channels, plus ping -> pong. Writes go to objects it creates
# itself (a pool "vfval-<pid>" with a backend, a VIP in 203.0.113.0/24, a
# route, a deny prefix in 192.0.2.0/24), which it deletes again, also when
# interrupted; it then checks that GET /api/config is what it was at the
# start. POST /api/system/drain is checked without effect (401 without the
# token; 409 when the L7 proxy is off); with --drain-proxy and the proxy
# running it really drains it, which only a restart undoes. One line per check, then "passed N/M (P%)"; the exit status is 0
# only at 100%.
set -u

usage() {
	sed -n '2,/^set -u/p' "$0" | sed -e '/^set -u/d' -e 's/^# \{0,1\}//'
}

TOKEN="${VELOFLUX_TOKEN:-}"
DRAIN_PROXY=0
POSITIONAL=()
while [ $# -gt 0 ]; do
	case "$1" in
	-h | --help)
		usage
		exit 0
		;;
	--drain-proxy)
		DRAIN_PROXY=1
		shift
		;;
	--token-file)
		[ $# -ge 2 ] || { echo "--token-file needs a file" >&2; exit 2; }
		TOKEN="$(tr -d '[:space:]' <"$2")" || { echo "cannot read token file $2" >&2; exit 2; }
		shift 2
		;;
	--token-file=*)
		f="${1#--token-file=}"
		TOKEN="$(tr -d '[:space:]' <"$f")" || { echo "cannot read token file $f" >&2; exit 2; }
		shift
		;;
	-*)
		echo "unknown option $1" >&2
		usage >&2
		exit 2
		;;
	*)
		POSITIONAL+=("$1")
		shift
		;;
	esac
done
BASE_URL="${POSITIONAL[0]:-http://localhost:9090}"
METRICS_URL="${POSITIONAL[1]:-http://localhost:8080}"
BASE_URL="${BASE_URL%/}"
METRICS_URL="${METRICS_URL%/}"
PY="${PYTHON:-/usr/bin/python3}"
WS_URL="ws${BASE_URL#http}" # http -> ws, https -> wss

command -v curl >/dev/null || { echo "curl is required" >&2; exit 2; }
"$PY" -c 'import websockets' 2>/dev/null ||
	{ echo "$PY cannot import websockets (apt-get install python3-websockets)" >&2; exit 2; }

WORK="$(mktemp -d)"
PASSED=0
TOTAL=0
COVERED=() # "METHOD /openapi/path" of every request made

pass() {
	PASSED=$((PASSED + 1))
	TOTAL=$((TOTAL + 1))
	printf 'PASS  %s\n' "$*"
}

fail() {
	TOTAL=$((TOTAL + 1))
	printf 'FAIL  %s\n' "$*"
}

# api METHOD TEMPLATE PATH [BODY] [noauth]: one request; sets CODE and
# leaves the body in $WORK/body. TEMPLATE is the route as the OpenAPI
# document names it, for the coverage check. The token goes on every
# request unless "noauth" is given.
api() {
	local method="$1" template="$2" path="$3" body="${4:-}" auth="${5:-auth}"
	local args=(-sS -o "$WORK/body" -w '%{http_code}' --max-time 15 -X "$method")
	if [ "$auth" = auth ] && [ -n "$TOKEN" ]; then
		args+=(-H "Authorization: Bearer $TOKEN")
	fi
	if [ -n "$body" ]; then
		args+=(-H 'Content-Type: application/json' --data-binary "$body")
	fi
	COVERED+=("$method $template")
	CODE="$(curl "${args[@]}" "$BASE_URL$path" 2>"$WORK/curl.err")" || CODE="000"
	[ "$CODE" = 000 ] && head -c 300 "$WORK/curl.err" >"$WORK/body"
}

# jtrue EXPR: the JSON in $WORK/body, as d, makes the Python expression true.
jtrue() {
	"$PY" - "$WORK/body" "$1" <<'EOF' 2>/dev/null
import json, re, sys
with open(sys.argv[1]) as f:
    d = json.load(f)
sys.exit(0 if eval(sys.argv[2], {"re": re, "d": d}) else 1)
EOF
}

# jget EXPR: prints the Python expression over the JSON body d.
jget() {
	"$PY" - "$WORK/body" "$1" <<'EOF' 2>/dev/null
import json, sys
with open(sys.argv[1]) as f:
    d = json.load(f)
v = eval(sys.argv[2], {"d": d})
print(v if not isinstance(v, (dict, list)) else json.dumps(v, sort_keys=True))
EOF
}

snippet() { head -c 160 "$WORK/body" | tr '\n' ' '; }

# expect WHAT WANT_CODE [EXPR [DESCRIPTION]]: judges the last request.
expect() {
	local what="$1" want="$2" expr="${3:-}" desc="${4:-}"
	if [ "$CODE" != "$want" ]; then
		fail "$what: status $CODE, want $want: $(snippet)"
	elif [ -n "$expr" ] && ! jtrue "$expr"; then
		fail "$what: $CODE but the body fails ${desc:-$expr}: $(snippet)"
	else
		pass "$what -> $CODE${desc:+ ($desc)}"
	fi
}

urlenc() { "$PY" -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=""))' "$1"; }

# ---------------------------------------------------------------------------
# Cleanup: whatever this run created is removed again, even on failure or
# interruption. Each entry is "METHOD PATH", run in reverse order.

UNDO=()
undo_push() { UNDO+=("$1"); }
undo_drop() { # the last entry equal to $1
	local i
	for ((i = ${#UNDO[@]} - 1; i >= 0; i--)); do
		if [ "${UNDO[$i]}" = "$1" ]; then
			unset 'UNDO[i]'
			UNDO=("${UNDO[@]}")
			return
		fi
	done
}
cleanup() {
	local i m p code
	for ((i = ${#UNDO[@]} - 1; i >= 0; i--)); do
		m="${UNDO[$i]%% *}"
		p="${UNDO[$i]#* }"
		code="$(curl -sS -o /dev/null -w '%{http_code}' --max-time 15 -X "$m" \
			-H "Authorization: Bearer $TOKEN" "$BASE_URL$p" 2>/dev/null)" || code=000
		printf 'cleanup: %s %s -> %s\n' "$m" "$p" "$code"
	done
	UNDO=()
	rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The checks live in one function, so that bash has read and parsed all of
# them before the first one runs. With the checks at the top level, bash
# 5.2.15 was once seen to fail the SIGTERM trap ("trap: line 2: unexpected
# EOF while looking for matching `)'") while still reading the script, and
# to carry on to the end instead of exiting through the cleanup.
main() {
echo "VeloFlux validation: API $BASE_URL, WebSockets $WS_URL/api/ws/<channel>, metrics $METRICS_URL/metrics"
[ -n "$TOKEN" ] || echo "no token (VELOFLUX_TOKEN or --token-file): every write will fail"

# ---------------------------------------------------------------------------
# Reads

api GET /health /health
expect "GET /health" 200 'd["status"] == "ok" and d["dataplane_attached"] is True and "version" in d' \
	'status ok, data plane attached'

api GET /api/status /api/status
expect "GET /api/status" 200 \
	'all(k in d for k in ("status", "version", "node", "interfaces", "counts", "last_reconcile", "config_generation"))' \
	'status, version, node, interfaces, counts, last_reconcile'

api GET /api/config /api/config
expect "GET /api/config" 200 'isinstance(d.get("dataplane"), dict) and isinstance(d.get("api"), dict)' \
	'dataplane and api sections'
cp "$WORK/body" "$WORK/config.before"

CODE="$(curl -sS -o "$WORK/body" -w '%{http_code}' --max-time 15 "$BASE_URL/api/config?format=yaml" 2>/dev/null)" || CODE=000
if [ "$CODE" = 200 ] && grep -q '^dataplane:' "$WORK/body"; then
	pass "GET /api/config?format=yaml -> 200 (YAML with dataplane:)"
else
	fail "GET /api/config?format=yaml: status $CODE: $(snippet)"
fi

api GET /api/pools /api/pools
expect "GET /api/pools" 200 'isinstance(d, list) and all("name" in p for p in d)' 'a list of named pools'

api GET /api/vips /api/vips
expect "GET /api/vips" 200 'isinstance(d, list) and all(re.match(r"^(tcp|udp):.+:\d+$", v["id"]) for v in d)' \
	'a list of VIPs with protocol:address:port ids'

api GET /api/routes /api/routes
expect "GET /api/routes" 200 'isinstance(d, list)' 'a list'

api GET /api/backends /api/backends
expect "GET /api/backends" 200 \
	'isinstance(d, list) and all(b["state"] in ("up", "down", "draining") and b["id"].count(":") >= 2 for b in d)' \
	'a list with id and state up/down/draining'
# An address that already is a real on the segment (its MAC resolves), for
# the pool this script creates; a documentation address when there is none.
BACKEND_ADDR="$(jget 'next((b["address"] for b in d if ":" not in b["address"]), "192.0.2.10")')"
[ -n "$BACKEND_ADDR" ] || BACKEND_ADDR=192.0.2.10

api GET /api/metrics /api/metrics
expect "GET /api/metrics" 200 \
	'all(k in d for k in ("at", "vips", "total", "xdp_verdicts", "reasons")) and isinstance(d["vips"], list) and "pps" in d["total"]' \
	'at, a vips list, total.pps, xdp_verdicts, reasons'

api GET /api/flows "/api/flows?limit=5"
expect "GET /api/flows?limit=5" 200 'isinstance(d, list) and len(d) <= 5' 'a list of at most 5'

api GET /api/flows "/api/flows?limit=0"
expect "GET /api/flows?limit=0" 400 'd["error"]["field"] == "limit"' 'error.field = limit'

api GET /api/security/denylist /api/security/denylist
expect "GET /api/security/denylist" 200 'isinstance(d.get("prefixes"), list)' 'prefixes list'

api GET /api/openapi.json /api/openapi.json
expect "GET /api/openapi.json" 200 'd.get("openapi", "").startswith("3.") and len(d["paths"]) > 10' '"openapi": "3.x" and the paths'
cp "$WORK/body" "$WORK/openapi.json"

api GET "/api/pools/{name}" /api/pools/vfval-no-such-pool
expect "GET /api/pools/{unknown}" 404 'd["error"]["code"] == "not_found" and d["error"]["message"]' 'error envelope, not_found'

# ---------------------------------------------------------------------------
# Authentication

api POST /api/pools /api/pools '{"name":"vfval-noauth"}' noauth
expect "POST /api/pools without a token" 401 \
	'd["error"]["code"] == "unauthorized" and d["error"]["message"] and set(d) == {"error"}' \
	'{"error":{"code":"unauthorized","message"}}'

# ---------------------------------------------------------------------------
# Writes, on objects of our own

POOL="vfval-$$"
BACKEND_PORT=18080
VIP_ADDR="203.0.113.$(($$ % 200 + 20))"
VIP_ID="tcp:$VIP_ADDR:9"
DENY="192.0.2.$(($$ % 200 + 20))"

api POST /api/pools /api/pools \
	"{\"name\":\"$POOL\",\"algorithm\":\"round_robin\",\"backends\":[{\"address\":\"$BACKEND_ADDR\",\"port\":$BACKEND_PORT}],\"health_check\":{\"type\":\"none\"}}"
[ "$CODE" = 201 ] && undo_push "DELETE /api/pools/$POOL"
expect "POST /api/pools ($POOL)" 201 "d['name'] == '$POOL' and d['backends'][0]['port'] == $BACKEND_PORT and d['backends'][0]['weight'] == 1" \
	'the pool with defaults applied'

api GET "/api/pools/{name}" "/api/pools/$POOL"
expect "GET /api/pools/$POOL" 200 "d['name'] == '$POOL' and d['health_check']['type'] == 'none'"

api PUT "/api/pools/{name}" "/api/pools/$POOL" \
	"{\"algorithm\":\"least_conn\",\"backends\":[{\"address\":\"$BACKEND_ADDR\",\"port\":$BACKEND_PORT}],\"health_check\":{\"type\":\"none\"}}"
expect "PUT /api/pools/$POOL" 200 "d['name'] == '$POOL' and d['algorithm'] == 'least_conn'" 'algorithm now least_conn'

api POST /api/pools /api/pools '{"name":"Bad Name!","backends":[{"address":"10.0.0.1","port":80}]}'
expect "POST /api/pools with an invalid name" 422 \
	'd["error"]["code"] == "invalid_config" and re.match(r"^pools\[\d+\]\.name$", d["error"]["field"])' \
	'error.field pools[N].name'

# A pool's backends
BE2_PORT=$((BACKEND_PORT + 1))
api POST "/api/pools/{name}/backends" "/api/pools/$POOL/backends" "{\"address\":\"$BACKEND_ADDR\",\"port\":$BE2_PORT}"
[ "$CODE" = 201 ] && undo_push "DELETE /api/pools/$POOL/backends/$BACKEND_ADDR:$BE2_PORT"
expect "POST /api/pools/$POOL/backends" 201 "d['port'] == $BE2_PORT"

api GET "/api/pools/{name}/backends" "/api/pools/$POOL/backends"
expect "GET /api/pools/$POOL/backends" 200 'len(d) == 2' 'two backends'

api PUT "/api/pools/{name}/backends/{backend}" "/api/pools/$POOL/backends/$BACKEND_ADDR:$BE2_PORT" \
	"{\"address\":\"$BACKEND_ADDR\",\"port\":$BE2_PORT,\"weight\":3}"
expect "PUT /api/pools/$POOL/backends/$BACKEND_ADDR:$BE2_PORT" 200 'd["weight"] == 3' 'weight 3'

api POST "/api/pools/{name}/backends" "/api/pools/$POOL/backends" "{\"address\":\"$BACKEND_ADDR\",\"port\":99999}"
expect "POST /api/pools/$POOL/backends with port 99999" 422 \
	're.match(r"^pools\[\d+\]\.backends\[2\]\.port$", d["error"]["field"])' 'error.field pools[N].backends[2].port'

# Drain and undrain (the backend of our own pool)
BID="$POOL:$BACKEND_ADDR:$BE2_PORT"
api POST "/api/backends/{id}/drain" "/api/backends/$BID/drain"
[ "$CODE" = 200 ] && undo_push "DELETE /api/backends/$BID/drain"
expect "POST /api/backends/$BID/drain" 200 "d['id'] == '$BID' and d['drained'] is True and d['state'] in ('draining', 'down')" \
	'drained, state draining'

api GET /api/backends /api/backends
expect "GET /api/backends after the drain" 200 "any(b['id'] == '$BID' and b['drained'] for b in d)" 'listed as drained'

api DELETE "/api/backends/{id}/drain" "/api/backends/$BID/drain"
[ "$CODE" = 200 ] && undo_drop "DELETE /api/backends/$BID/drain"
expect "DELETE /api/backends/$BID/drain" 200 "d['drained'] is False and d['state'] != 'draining'" 'undrained'

# The node drain (BGP): withdraws this node's VIPs from its routers while
# the data path forwards; undone at once. Without a bgp section it changes
# nothing but the saved flag.
api GET /api/bgp /api/bgp
expect "GET /api/bgp" 200 'isinstance(d["enabled"], bool) and isinstance(d["peers"], list) and isinstance(d["vips"], list) and d["node_drained"] is False' \
	'enabled, peers and announced VIPs, node not drained'
api POST /api/node/drain /api/node/drain '' noauth
expect "POST /api/node/drain without a token" 401 'd["error"]["code"] == "unauthorized"' 'refused'
api POST /api/node/drain /api/node/drain
[ "$CODE" = 200 ] && undo_push "DELETE /api/node/drain"
expect "POST /api/node/drain" 200 'd["node_drained"] is True' 'node drained'
api DELETE /api/node/drain /api/node/drain
[ "$CODE" = 200 ] && undo_drop "DELETE /api/node/drain"
expect "DELETE /api/node/drain" 200 'd["node_drained"] is False' 'node undrained'

api DELETE "/api/pools/{name}/backends/{backend}" "/api/pools/$POOL/backends/$BACKEND_ADDR:$BE2_PORT"
[ "$CODE" = 204 ] && undo_drop "DELETE /api/pools/$POOL/backends/$BACKEND_ADDR:$BE2_PORT"
expect "DELETE /api/pools/$POOL/backends/$BACKEND_ADDR:$BE2_PORT" 204

# A VIP on our pool
api POST /api/vips /api/vips "{\"address\":\"$VIP_ADDR\",\"port\":9,\"protocol\":\"tcp\",\"mode\":\"dsr\",\"pool\":\"$POOL\"}"
[ "$CODE" = 201 ] && undo_push "DELETE /api/vips/$VIP_ID"
expect "POST /api/vips ($VIP_ID)" 201 "d['id'] == '$VIP_ID' and d['pool'] == '$POOL'"

api GET "/api/vips/{id}" "/api/vips/$VIP_ID"
expect "GET /api/vips/$VIP_ID" 200 "d['id'] == '$VIP_ID' and d['mode'] == 'dsr'"

api PUT "/api/vips/{id}" "/api/vips/$VIP_ID" \
	"{\"address\":\"$VIP_ADDR\",\"port\":9,\"protocol\":\"tcp\",\"mode\":\"dsr\",\"pool\":\"$POOL\",\"source_affinity\":true}"
expect "PUT /api/vips/$VIP_ID" 200 'd["source_affinity"] is True' 'source_affinity now true'

api POST /api/vips /api/vips "{\"address\":\"$VIP_ADDR\",\"port\":10,\"protocol\":\"tcp\",\"pool\":\"no-such-pool-$$\"}"
expect "POST /api/vips naming an unknown pool" 422 're.match(r"^vips\[\d+\]\.pool$", d["error"]["field"])' 'error.field vips[N].pool'

# The new VIP shows on /metrics (checked while it exists)
CODE="$(curl -sS -o "$WORK/metrics" -w '%{http_code}' --max-time 15 "$METRICS_URL/metrics" 2>/dev/null)" || CODE=000
if [ "$CODE" = 200 ] && grep -q '^# TYPE veloflux_vip_packets_total counter' "$WORK/metrics" &&
	grep -q "^veloflux_vip_packets_total{vip=\"$VIP_ADDR:9/tcp\"}" "$WORK/metrics"; then
	pass "GET $METRICS_URL/metrics -> 200 (veloflux_vip_packets_total, a counter, with vip=\"$VIP_ADDR:9/tcp\")"
else
	fail "GET $METRICS_URL/metrics: status $CODE, veloflux_vip_packets_total for $VIP_ADDR:9/tcp missing: $(grep -m3 veloflux_vip_packets "$WORK/metrics" 2>/dev/null | tr '\n' ' ')"
fi

api DELETE "/api/vips/{id}" "/api/vips/$VIP_ID"
[ "$CODE" = 204 ] && undo_drop "DELETE /api/vips/$VIP_ID"
expect "DELETE /api/vips/$VIP_ID" 204

# An L7 route on our pool
api POST /api/routes /api/routes "{\"host\":\"vfval-$$.example.com\",\"path_prefix\":\"/vfval\",\"pool\":\"$POOL\"}"
expect "POST /api/routes" 201 "d['pool'] == '$POOL' and d['path_prefix'] == '/vfval'"
api GET /api/routes /api/routes
ROUTE_IDX="$(jget "[i for i, r in enumerate(d) if r.get('host') == 'vfval-$$.example.com'][0]")"
if [ -n "$ROUTE_IDX" ]; then
	pass "GET /api/routes lists the new route at index $ROUTE_IDX"
	undo_push "DELETE /api/routes/$ROUTE_IDX"
	api GET "/api/routes/{index}" "/api/routes/$ROUTE_IDX"
	expect "GET /api/routes/$ROUTE_IDX" 200 "d['host'] == 'vfval-$$.example.com'"
	api PUT "/api/routes/{index}" "/api/routes/$ROUTE_IDX" "{\"host\":\"vfval-$$.example.com\",\"path_prefix\":\"/vfval2\",\"pool\":\"$POOL\"}"
	expect "PUT /api/routes/$ROUTE_IDX" 200 'd["path_prefix"] == "/vfval2"' 'path_prefix now /vfval2'
	api DELETE "/api/routes/{index}" "/api/routes/$ROUTE_IDX"
	[ "$CODE" = 204 ] && undo_drop "DELETE /api/routes/$ROUTE_IDX"
	expect "DELETE /api/routes/$ROUTE_IDX" 204
else
	fail "GET /api/routes: the new route is not listed: $(snippet)"
fi

# A denied prefix
api POST /api/security/denylist /api/security/denylist "{\"prefix\":\"$DENY\"}"
[ "$CODE" = 201 ] && undo_push "DELETE /api/security/denylist?prefix=$(urlenc "$DENY/32")"
expect "POST /api/security/denylist ($DENY)" 201 "d['prefix'] == '$DENY/32'" "canonical $DENY/32"
api GET /api/security/denylist /api/security/denylist
expect "GET /api/security/denylist" 200 "'$DENY/32' in d['prefixes']" "lists $DENY/32"
api DELETE /api/security/denylist "/api/security/denylist?prefix=$(urlenc "$DENY/32")"
[ "$CODE" = 204 ] && undo_drop "DELETE /api/security/denylist?prefix=$(urlenc "$DENY/32")"
expect "DELETE /api/security/denylist?prefix=$DENY/32" 204

api DELETE "/api/pools/{name}" "/api/pools/$POOL"
[ "$CODE" = 204 ] && undo_drop "DELETE /api/pools/$POOL"
expect "DELETE /api/pools/$POOL" 204
api GET "/api/pools/{name}" "/api/pools/$POOL"
expect "GET /api/pools/$POOL after the delete" 404 'd["error"]["code"] == "not_found"'

# ---------------------------------------------------------------------------
# Whole configurations

api POST /api/config/validate /api/config/validate \
	'{"node":{"name":"vfval"},"pools":[{"name":"web","backends":[{"adress":"10.0.0.1","port":80}]}]}'
expect "POST /api/config/validate (a misspelt key)" 422 \
	'd["error"]["code"] == "invalid_config" and d["error"]["field"] == "pools[0].backends[0].adress" and d["error"]["message"]' \
	'error.field pools[0].backends[0].adress'

cp "$WORK/config.before" "$WORK/body"
CANDIDATE="$(jget 'd')"
api POST /api/config/validate /api/config/validate "$CANDIDATE"
expect "POST /api/config/validate (the configuration in force)" 200 'd["valid"] is True'

api POST /api/reload /api/reload
expect "POST /api/reload" 200 'd["reloaded"] is True and d["config_generation"] >= 1'

# Draining the L7 proxy cannot be undone without a restart, so it is only
# checked where that changes nothing: the token is required, and with the
# proxy disabled the agent answers 409. With the proxy running, the drain
# itself happens only with --drain-proxy.
api POST /api/system/drain /api/system/drain '' noauth
expect "POST /api/system/drain without a token" 401 'd["error"]["code"] == "unauthorized"' 'refused'
cp "$WORK/config.before" "$WORK/body"
if jtrue 'not d.get("proxy", {}).get("enabled")'; then
	api POST /api/system/drain /api/system/drain
	expect "POST /api/system/drain (L7 proxy disabled)" 409 'd["error"]["code"] == "conflict" and d["error"]["message"]' \
		'conflict: no proxy to drain'
elif [ "$DRAIN_PROXY" = 1 ]; then
	api POST /api/system/drain /api/system/drain
	expect "POST /api/system/drain (--drain-proxy)" 200 'd["draining"] is True' 'the L7 proxy drained'
	api GET /health /health
	expect "GET /health after the drain" 503 'd["status"] == "draining"' 'status draining'
else
	echo "      the L7 proxy is running: not draining it (--drain-proxy does)"
fi

# ---------------------------------------------------------------------------
# WebSockets: every channel's first two messages, and ping -> pong

"$PY" - "$WS_URL" >"$WORK/ws.out" 2>&1 <<'EOF'
import asyncio, json, re, sys
import websockets

BASE = sys.argv[1]
SECOND = {  # the message a new client gets right after "connected"
    "backends": "backend_update",
    "metrics": "metrics_update",
    "status": "status_update",
    "health": "health_status",
    "security": "security_summary",
    "billing": "usage_update",
    "ai": "ai_status",
}
CLIENT_ID = re.compile(r"^[0-9]{14}-[a-z0-9]{6}$")
STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")

def envelope(m):
    return isinstance(m, dict) and isinstance(m.get("type"), str) and STAMP.match(str(m.get("timestamp", ""))) \
        and isinstance(m.get("data"), dict)

async def recv_json(ws):
    return json.loads(await asyncio.wait_for(ws.recv(), 10))

async def channel(name, want):
    url = f"{BASE}/api/ws/{name}"
    try:
        async with websockets.connect(url, open_timeout=10, close_timeout=2) as ws:
            first = await recv_json(ws)
            d = first.get("data", {}) if isinstance(first, dict) else {}
            if envelope(first) and first["type"] == "connected" and CLIENT_ID.match(str(d.get("client_id", ""))) \
                    and d.get("status") == "connected" and d.get("channel") == name:
                print(f"PASS  ws {name}: 1st message connected, client_id {d['client_id']}, channel {name}")
            else:
                print(f"FAIL  ws {name}: 1st message is not a valid connected message: {json.dumps(first)[:200]}")
            second = await recv_json(ws)
            if envelope(second) and second["type"] == want:
                print(f"PASS  ws {name}: 2nd message {want}")
            else:
                print(f"FAIL  ws {name}: 2nd message {json.dumps(second)[:200]}, want type {want}")
            if name == "status":
                await ws.send(json.dumps({"type": "ping"}))
                for _ in range(20):
                    m = await recv_json(ws)
                    if m.get("type") == "pong":
                        if envelope(m) and m["data"].get("client_id") == d.get("client_id"):
                            print(f"PASS  ws {name}: ping -> pong for client {d.get('client_id')}")
                        else:
                            print(f"FAIL  ws {name}: pong is malformed: {json.dumps(m)[:200]}")
                        break
                else:
                    print(f"FAIL  ws {name}: no pong among 20 messages after ping")
    except Exception as e:
        print(f"FAIL  ws {name}: {type(e).__name__}: {e}")

async def unknown_channel():
    try:
        async with websockets.connect(f"{BASE}/api/ws/no-such-channel", open_timeout=10):
            print("FAIL  ws no-such-channel: the upgrade succeeded, want 404")
    except websockets.exceptions.InvalidStatusCode as e:
        if e.status_code == 404:
            print("PASS  ws no-such-channel: refused with 404")
        else:
            print(f"FAIL  ws no-such-channel: status {e.status_code}, want 404")
    except Exception as e:
        print(f"FAIL  ws no-such-channel: {type(e).__name__}: {e}")

async def main():
    await asyncio.gather(*(channel(n, w) for n, w in SECOND.items()), unknown_channel())

asyncio.run(main())
EOF
ws_rc=$?
ws_lines=0
while IFS= read -r line; do
	case "$line" in
	"PASS  "*) pass "${line#PASS  }" ;;
	"FAIL  "*) fail "${line#FAIL  }" ;;
	*) [ -n "$line" ] && printf '      %s\n' "$line" ;;
	esac
	ws_lines=$((ws_lines + 1))
done <"$WORK/ws.out"
[ "$ws_rc" = 0 ] || fail "WebSocket checks: $PY exited with $ws_rc"
COVERED+=("GET /api/ws/{channel}")

# ---------------------------------------------------------------------------
# Nothing left behind, nothing missed

api GET /api/config /api/config
if [ "$CODE" = 200 ] && "$PY" - "$WORK/config.before" "$WORK/body" <<'EOF'; then
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
sys.exit(0 if a == b else 1)
EOF
	pass "GET /api/config: the configuration is what it was at the start"
else
	fail "GET /api/config: the configuration differs from the start ($CODE)"
fi

printf '%s\n' "${COVERED[@]}" | sort -u >"$WORK/covered"
"$PY" - "$WORK/openapi.json" >"$WORK/routes" 2>/dev/null <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
for path, item in d["paths"].items():
    for method in item:
        print(method.upper(), path)
EOF
missing="$(sort -u "$WORK/routes" | comm -23 - "$WORK/covered" | tr '\n' ';')"
nroutes="$(wc -l <"$WORK/routes")"
if [ "$nroutes" -gt 0 ] && [ -z "$missing" ]; then
	pass "every one of the $nroutes operations in /api/openapi.json was exercised"
else
	fail "operations in /api/openapi.json not exercised: ${missing:-none listed ($nroutes operations)}"
fi

pct=0
[ "$TOTAL" -gt 0 ] && pct=$((100 * PASSED / TOTAL))
echo "passed $PASSED/$TOTAL ($pct%)"
[ "$TOTAL" -gt 0 ] && [ "$PASSED" -eq "$TOTAL" ]
}

main
