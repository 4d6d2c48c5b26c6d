// Shared by the landing page and the dashboard: the agent's WebSocket
// channels (each reconnecting on its own), the REST helper with the API
// token, DOM and number formatting helpers. Everything talks to the origin
// the page came from; nothing is loaded from elsewhere.

export const CHANNELS = ["status", "metrics", "backends", "health", "security", "billing", "ai"];

// ---------------------------------------------------------------------------
// WebSocket channels

const BACKOFF_MIN_MS = 500;
const BACKOFF_MAX_MS = 15000;
const PING_IDLE_MS = 15000; // send {"type":"ping"} after this much silence
const DEAD_IDLE_MS = 45000; // reconnect after this much silence

// Channel is one /api/ws/<name> socket. State goes connecting → connected
// (after the server's "connected" message) → reconnecting (closed; retrying
// with exponential back-off and jitter) → connected ... Every other message
// is handed to onMessage(msg) as the envelope {type, timestamp, data}.
export class Channel {
  constructor(name, { onMessage, onState } = {}) {
    this.name = name;
    this.onMessage = onMessage || (() => {});
    this.onState = onState || (() => {});
    this.state = "idle";
    this.failures = 0;
    this.ws = null;
    this.lastSeen = 0;
    this.retryTimer = 0;
    this.watchdog = 0;
  }

  start() {
    this.#connect();
    this.watchdog = setInterval(() => this.#checkAlive(), 5000);
    return this;
  }

  #setState(state) {
    if (state === this.state) return;
    this.state = state;
    this.onState(state, this);
  }

  #connect() {
    this.#setState(this.failures ? "reconnecting" : "connecting");
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    let ws;
    try {
      // Browsers cannot set Authorization on a WebSocket; with
      // api.protect_reads the token travels as a subprotocol instead.
      const t = token.get();
      const protocols = t ? ["veloflux", `bearer.${t}`] : [];
      ws = new WebSocket(`${scheme}//${location.host}/api/ws/${this.name}`, protocols);
    } catch {
      this.#retry();
      return;
    }
    this.ws = ws;
    ws.onmessage = (ev) => {
      this.lastSeen = Date.now();
      let msg;
      try {
        msg = JSON.parse(ev.data);
      } catch {
        return;
      }
      if (msg.type === "connected") {
        this.failures = 0;
        this.#setState("connected");
        return;
      }
      if (msg.type === "pong") return;
      try {
        this.onMessage(msg, this);
      } catch (err) {
        console.error(`channel ${this.name}: handling ${msg.type}:`, err);
      }
    };
    ws.onclose = () => {
      if (this.ws !== ws) return;
      this.ws = null;
      this.#retry();
    };
  }

  #retry() {
    this.failures++;
    this.#setState("reconnecting");
    const base = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** (this.failures - 1));
    const delay = base / 2 + (Math.random() * base) / 2;
    clearTimeout(this.retryTimer);
    this.retryTimer = setTimeout(() => this.#connect(), delay);
  }

  // Quiet channels (health, ai) are kept honest with pings; a socket that
  // stays silent even so is closed and reconnected.
  #checkAlive() {
    const ws = this.ws;
    if (!ws || this.state !== "connected") return;
    const idle = Date.now() - this.lastSeen;
    if (idle > DEAD_IDLE_MS) {
      this.ws = null;
      ws.close();
      this.#retry();
    } else if (idle > PING_IDLE_MS && ws.readyState === WebSocket.OPEN) {
      ws.send(JSON.stringify({ type: "ping" }));
    }
  }
}

// ---------------------------------------------------------------------------
// REST

const TOKEN_KEY = "veloflux.apiToken";

export const token = {
  get() {
    try {
      return sessionStorage.getItem(TOKEN_KEY) || "";
    } catch {
      return "";
    }
  },
  set(value) {
    sessionStorage.setItem(TOKEN_KEY, value.trim());
  },
  clear() {
    sessionStorage.removeItem(TOKEN_KEY);
  },
};

// ApiError carries the API's {"error":{"code","message","field"}}.
export class ApiError extends Error {
  constructor(status, code, message, field) {
    super(message);
    this.status = status;
    this.code = code;
    this.field = field;
  }
}

// api calls the agent's REST API and returns the decoded JSON (null for an
// empty body). A failure throws an ApiError whose message is the API's.
export async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  const t = token.get();
  if (t) headers.Authorization = `Bearer ${t}`;
  const init = { method, headers, cache: "no-store" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(path, init);
  } catch (err) {
    throw new ApiError(0, "network", `cannot reach the agent: ${err.message}`);
  }
  const text = await res.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    /* not JSON */
  }
  if (!res.ok) {
    const e = data && data.error;
    const msg = (e && e.message) || text.trim() || `${res.status} ${res.statusText}`;
    throw new ApiError(res.status, (e && e.code) || `http_${res.status}`, msg, e && e.field);
  }
  return data;
}

// metricsURL is the Prometheus endpoint: it listens on its own port
// (metrics.listen, :8080 by default) of the host this page came from.
export async function metricsURL() {
  let port = "8080";
  try {
    const cfg = await api("GET", "/api/config");
    const listen = (cfg && cfg.metrics && cfg.metrics.listen) || "";
    const m = /:(\d+)$/.exec(listen);
    if (m) port = m[1];
  } catch {
    /* keep the default */
  }
  return `http://${location.hostname}:${port}/metrics`; // an IPv6 hostname keeps its brackets
}

// ---------------------------------------------------------------------------
// DOM

// el builds an element: el("td", {class: "num", data: {field: "pps"}}, "text", child...)
export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (v == null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "data") for (const [dk, dv] of Object.entries(v)) node.dataset[dk] = dv;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat(Infinity)) {
    if (c == null || c === false) continue;
    node.append(c instanceof Node ? c : String(c));
  }
  return node;
}

export const $ = (sel, root = document) => root.querySelector(sel);
export const $$ = (sel, root = document) => [...root.querySelectorAll(sel)];

// setText changes text only when it differs (no needless layout work).
export function setText(node, text) {
  text = String(text);
  if (node && node.textContent !== text) node.textContent = text;
}

// domId makes a string safe inside an id: "10.0.0.1:80/tcp" → "10-0-0-1-80-tcp".
export const domId = (s) => String(s).replace(/[^A-Za-z0-9_-]+/g, "-").replace(/^-|-$/g, "");

// ---------------------------------------------------------------------------
// Formatting

const SI = ["", "k", "M", "G", "T", "P"];

// si formats with SI prefixes: 0, 12.3, 4.56 k, 7.8 M.
export function si(v, unit = "") {
  if (v == null || !Number.isFinite(v)) return "—";
  const sp = unit ? " " : "";
  const a = Math.abs(v);
  if (a < 1000) {
    const s = a === 0 || Number.isInteger(v) ? String(v) : a >= 100 ? v.toFixed(0) : a >= 10 ? v.toFixed(1) : v.toFixed(2);
    return s + sp + unit;
  }
  let i = 0;
  while (Math.abs(v) >= 1000 && i < SI.length - 1) {
    v /= 1000;
    i++;
  }
  const digits = Math.abs(v) >= 100 ? 0 : Math.abs(v) >= 10 ? 1 : 2;
  return `${v.toFixed(digits)} ${SI[i]}${unit}`;
}

export const fmtPPS = (v) => si(v, "pkt/s");
export const fmtBPS = (v) => si(v, "b/s");
export const fmtPerS = (v) => si(v, "/s");
export const fmtBytes = (v) => si(v, "B");
export const fmtCount = (v) => (v == null ? "—" : Number(v).toLocaleString("en-US"));

export function fmtDuration(seconds) {
  if (seconds == null || !Number.isFinite(seconds) || seconds < 0) return "—";
  const s = Math.floor(seconds);
  const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
  if (d) return `${d}d ${h}h`;
  if (h) return `${h}h ${m}m`;
  if (m) return `${m}m ${s % 60}s`;
  return `${s}s`;
}

// fmtTime shows a timestamp as local HH:MM:SS (and the date when not today).
export function fmtTime(ts) {
  const d = new Date(ts);
  if (Number.isNaN(d.getTime())) return "—";
  const time = d.toLocaleTimeString("en-GB", { hour12: false });
  return d.toDateString() === new Date().toDateString() ? time : `${d.toISOString().slice(0, 10)} ${time}`;
}

export const isZeroTime = (ts) => !ts || ts.startsWith("0001-01-01");
