// The landing page's live status: GET /api/status at once, then the status
// channel (which reconnects on its own).
import { $, $$, el, setText, api, Channel, metricsURL, fmtDuration } from "./live.js";
import { setupTheme } from "./theme.js";

const card = $("#landing-status");
const field = (name) => card.querySelector(`[data-field="${name}"]`);
let uptime = null;

function render(s) {
  card.dataset.state = "live";
  setText(field("node"), s.node || "—");
  const st = field("status");
  st.dataset.state = s.status || "unknown";
  setText(st, s.status || "unknown");
  setText(field("version"), s.version || "—");
  uptime = { seconds: s.uptime_seconds, at: performance.now() };
  tick();
  const ifs = (s.interfaces || []).map((i) => `${i.name}${i.attached ? "" : " (detached)"}`).join(", ");
  field("dataplane").replaceChildren(
    el("span", { class: "badge", data: { state: s.dataplane_attached ? "up" : "down" } }, s.dataplane_attached ? "attached" : "detached"),
    ` ${ifs || "no interfaces"}${s.xdp_mode ? ` · XDP ${s.xdp_mode}` : ""}`,
  );
  const c = s.counts || {};
  const n = (count, word) => `${count ?? 0} ${word}${count === 1 ? "" : "s"}`;
  setText(field("config"), `generation ${s.config_generation} · ${n(c.vips, "VIP")} · ${n(c.pools, "pool")}`);
  setText(field("backends"), `${c.healthy_backends ?? 0} of ${c.backends ?? 0} healthy`);
}

function tick() {
  if (uptime) setText(field("uptime"), fmtDuration(uptime.seconds + (performance.now() - uptime.at) / 1000));
}

setupTheme();
metricsURL().then((u) => $$(".metrics-link").forEach((a) => (a.href = u)));
api("GET", "/api/status").then(render, (err) => {
  if (card.dataset.state === "loading") {
    card.dataset.state = "error";
    setText(field("node"), `Cannot reach the agent: ${err.message}`);
  }
});
new Channel("status", {
  onMessage: (m) => m.type === "status_update" && render(m.data),
  onState: (state) => ($("#status-socket").dataset.state = state),
}).start();
setInterval(tick, 1000);
