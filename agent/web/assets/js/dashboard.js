// The dashboard: opens the seven channels and hands each message to its
// section. Header (status channel), traffic, backends, security, insights
// and usage each live in their own module.
import { $, el, setText, Channel, CHANNELS, metricsURL, fmtDuration } from "./live.js";
import { setupToken } from "./actions.js";
import { onMetrics } from "./traffic.js";
import { onBackends, onHealth } from "./backends.js";
import { onSecurity, onAI, onUsage, setupDenylist, onConfigGeneration } from "./events.js";
import { setupTheme } from "./theme.js";
import { onCluster, setupCluster } from "./cluster.js";

// ---------------------------------------------------------------------------
// Header: status and sockets

let uptimeBase = null; // {seconds, at}: uptime_seconds and when it arrived

function onStatus(s) {
  setText($("#node-name"), s.node || "—");
  document.title = `${s.node || "VeloFlux"} · VeloFlux dashboard`;
  const status = $("#agent-status");
  status.dataset.state = s.status || "unknown";
  setText(status, s.status || "unknown");
  setText($("#version"), s.version || "—");
  uptimeBase = { seconds: s.uptime_seconds, at: performance.now() };
  tickUptime();
  const ifs = s.interfaces || [];
  const dp = $("#dataplane");
  dp.dataset.attached = String(!!s.dataplane_attached);
  dp.replaceChildren(
    el("span", { class: "badge", data: { state: s.dataplane_attached ? "up" : "down" } }, s.dataplane_attached ? "attached" : "detached"),
    " ",
    ...(ifs.length
      ? ifs.flatMap((i, n) => [n ? ", " : "", el("span", { class: `mono ${i.attached ? "" : "bad"}`, title: i.program_id ? `program ${i.program_id}` : "not attached" }, i.name)])
      : ["no interfaces"]),
    s.xdp_mode ? el("span", { class: "muted" }, ` · XDP ${s.xdp_mode}`) : "",
    s.program_id ? el("span", { class: "muted" }, ` · prog ${s.program_id}`) : "",
  );
  setText($("#config-gen"), s.config_generation ?? "—");
  onConfigGeneration(s.config_generation);
  onCluster(s);
}

function tickUptime() {
  if (!uptimeBase) return;
  setText($("#uptime"), fmtDuration(uptimeBase.seconds + (performance.now() - uptimeBase.at) / 1000));
}

const socketState = new Map();

function renderSockets() {
  let up = 0;
  for (const [name, state] of socketState) {
    const pill = $(`#sockets [data-channel="${name}"]`);
    pill.dataset.state = state;
    pill.title = `${name}: ${state}`;
    if (state === "connected") up++;
  }
  const sum = $("#sockets-summary");
  sum.dataset.connected = String(up);
  setText(sum, `${up}/${CHANNELS.length}`);
  sum.classList.toggle("bad", up < CHANNELS.length);
}

// ---------------------------------------------------------------------------
// Channels

const handlers = {
  status: (m) => m.type === "status_update" && onStatus(m.data),
  metrics: (m) => m.type === "metrics_update" && onMetrics(m.data),
  backends: (m) => m.type === "backend_update" && onBackends(m.data.backends || []),
  health: onHealth,
  security: onSecurity,
  billing: onUsage,
  ai: onAI,
};

function start() {
  setupTheme();
  setupToken();
  setupDenylist();
  setupCluster();
  metricsURL().then((u) => ($("#metrics-link").href = u));
  const pills = $("#sockets");
  for (const name of CHANNELS) {
    pills.append(el("li", { class: "pill", data: { channel: name, state: "connecting" } }, name));
    socketState.set(name, "connecting");
    new Channel(name, {
      onMessage: handlers[name],
      onState: (state) => {
        socketState.set(name, state);
        renderSockets();
      },
    }).start();
  }
  renderSockets();
  setInterval(tickUptime, 1000);
}

start();
