// Security (events, summary, denylist), AI insights and usage.
import { $, el, setText, api, si, fmtBytes, fmtCount, fmtTime } from "./live.js";
import { act } from "./actions.js";

const MAX_FEED = 200;
const SEVERITIES = new Set(["info", "warning", "critical"]);

// feedPush puts an item on top of a feed and keeps the feed bounded.
function feedPush(list, item) {
  list.querySelector(".placeholder")?.remove();
  list.prepend(item);
  while (list.children.length > MAX_FEED) list.lastElementChild.remove();
}

function feedItem({ severity, kind, at, title, detail }) {
  const sev = SEVERITIES.has(severity) ? severity : "info";
  return el(
    "li",
    { data: { severity: sev, kind: kind || "" } },
    el("div", { class: "feed-head" },
      el("span", { class: "sev", data: { severity: sev } }, sev),
      el("strong", {}, title),
      el("time", { datetime: at, class: "muted small" }, fmtTime(at))),
    detail ? el("div", { class: "feed-detail" }, detail) : null,
  );
}

// ---------------------------------------------------------------------------
// Security

export function onSecurity(msg) {
  const d = msg.data || {};
  if (msg.type === "security_summary") {
    const drops = Object.entries(d.sampled_drops || {}).map(([r, n]) => `${r} ${fmtCount(n)}`);
    setText(
      $("#security-summary"),
      `Since ${fmtTime(d.since)} (summed every 10 s): API auth failures ${fmtCount(d.auth_failures ?? 0)}; ` +
        `sampled drops ${drops.length ? drops.join(", ") : "none"}.`,
    );
    return;
  }
  if (msg.type !== "security_event") return;
  const at = d.at || msg.timestamp;
  let title = (d.kind || "event").replaceAll("_", " ");
  let detail;
  if (d.kind === "auth_failure") {
    detail = `${d.method || ""} ${d.path || ""} from ${d.remote || "?"}: ${d.reason || ""}`;
    if (d.count > 1) detail += ` (latest of ${d.count} failures)`;
  } else {
    const parts = [];
    if (d.client_ip) parts.push(`client ${d.client_ip}`);
    if (d.method || d.path) parts.push(`${d.method || ""} ${d.host || ""}${d.path || ""}`.trim());
    if (d.source) parts.push(`${d.source} → ${d.destination || "?"}`);
    if (d.protocol != null) parts.push(`proto ${d.protocol}`);
    if (d.packet_len) parts.push(`${d.packet_len} B`);
    if (d.reason) parts.push(d.reason);
    detail = parts.join(" · ");
  }
  feedPush($("#security-feed"), feedItem({ severity: d.severity, kind: d.kind, at, title, detail }));
}

// ---------------------------------------------------------------------------
// Denylist

let denyGeneration = null;

async function loadDenylist() {
  let res;
  try {
    res = await api("GET", "/api/security/denylist");
  } catch (err) {
    setText($("#denylist"), `Cannot list denied prefixes: ${err.message}`);
    return;
  }
  const list = $("#denylist");
  const prefixes = res.prefixes || [];
  // A change of configuration reloads the list; when its prefixes are the
  // ones shown, the rows (and a button a user is about to press) stay.
  const shown = [...list.querySelectorAll("li[data-prefix]")].map((li) => li.dataset.prefix);
  if (shown.length && shown.join("\n") === prefixes.join("\n")) return;
  list.replaceChildren(
    ...prefixes.map((p) =>
      el("li", { data: { prefix: p } },
        el("span", { class: "mono" }, p),
        el("button", {
          type: "button", class: "ghost", "aria-label": `Lift ${p}`, data: { action: "undeny" },
          onclick: async (ev) => {
            if (await act(`Lift ${p}`, () => api("DELETE", `/api/security/denylist?prefix=${encodeURIComponent(p)}`), ev.currentTarget)) loadDenylist();
          },
        }, "×")),
    ),
  );
  if (!list.children.length) list.append(el("li", { class: "placeholder muted small" }, "No denied prefixes."));
}

export function setupDenylist() {
  $("#deny-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const input = $("#deny-prefix");
    const prefix = input.value.trim();
    if (await act(`Deny ${prefix || "(empty)"}`, () => api("POST", "/api/security/denylist", { prefix }), $("#deny-add"))) {
      input.value = "";
      loadDenylist();
    }
  });
  loadDenylist();
}

// onConfigGeneration refreshes the denylist when the configuration changed
// (from this page, another client or a reload).
export function onConfigGeneration(gen) {
  if (denyGeneration !== null && gen !== denyGeneration) loadDenylist();
  denyGeneration = gen;
}

// ---------------------------------------------------------------------------
// AI insights

function insightItem(i) {
  const figures = [];
  if (i.metric) figures.push(i.metric);
  if (i.value != null) figures.push(`value ${si(i.value)}`);
  if (i.baseline) figures.push(`baseline ${si(i.baseline)}`);
  if (i.score != null) figures.push(`score ${si(i.score)}`);
  return feedItem({
    severity: i.severity,
    kind: i.kind,
    at: i.at,
    title: `${(i.kind || "insight").replaceAll("_", " ")} · ${i.subject || ""}`,
    detail: el("span", {}, i.explanation || "", el("span", { class: "muted small figures" }, figures.join(" · "))),
  });
}

export function onAI(msg) {
  const feed = $("#ai-feed");
  if (msg.type === "ai_status") {
    const d = msg.data || {};
    setText(
      $("#ai-hint"),
      `Anomalies (|z| ≥ ${d.z_threshold ?? "?"}), ${Math.round((d.forecast_horizon_s ?? 0) / 60)}-minute forecasts and ` +
        `latency outliers; a series needs ${d.warmup_samples ?? "?"} samples before it may alert.`,
    );
    // The recent list comes newest first: it replaces the feed.
    const recent = d.recent || [];
    feed.replaceChildren(...recent.map(insightItem));
    if (!recent.length) feed.append(el("li", { class: "placeholder" }, "No insights yet."));
  } else if (msg.type === "insight") {
    feedPush(feed, insightItem(msg.data));
  }
}

// ---------------------------------------------------------------------------
// Usage

export function onUsage(msg) {
  if (msg.type !== "usage_update") return;
  const d = msg.data || {};
  const day = (ts) => (ts ? new Date(ts).toISOString().slice(0, 10) : "?");
  const end = d.period_end ? new Date(Date.parse(d.period_end) - 1) : null;
  setText($("#usage-period"), `this period: ${day(d.period_start)} to ${end ? end.toISOString().slice(0, 10) : "?"} (UTC)`);
  // VIPs first (what is billed), then the pools they add up to.
  const order = { vip: 0, pool: 1 };
  const subjects = (d.subjects || [])
    .filter((s) => s.kind in order)
    .sort((x, y) => order[x.kind] - order[y.kind] || x.subject.localeCompare(y.subject));
  const rows = subjects.map((s) => {
    const p = s.period || {};
    const name = s.subject.replace(/^[a-z]+:/, "");
    return el(
      "tr",
      { data: { subject: s.subject, kind: s.kind } },
      el("td", {}, el("span", { class: "kind" }, s.kind), " ", el("span", { class: "mono" }, name)),
      el("td", { class: "num", data: { field: "packets", value: String(p.packets ?? 0) } }, fmtCount(p.packets)),
      el("td", { class: "num" }, fmtBytes(p.bytes)),
      el("td", { class: "num" }, fmtCount(p.new_flows)),
      el("td", { class: "num" }, p.requests ? fmtCount(p.requests) : "—"),
    );
  });
  if (!rows.length) rows.push(el("tr", { class: "placeholder" }, el("td", { colspan: 5 }, "No usage in this period yet.")));
  $("#usage-rows").replaceChildren(...rows);
}
