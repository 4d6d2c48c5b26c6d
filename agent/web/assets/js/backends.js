// The backends section: one table per pool, fed by backend_update every
// second and by the health channel's transitions. Rows are updated in place
// so that a weight being typed is not overwritten.
import { $, el, setText, api, fmtBytes, fmtCount, fmtDuration, isZeroTime } from "./live.js";
import { act, toast } from "./actions.js";

const SHARE_WINDOW = 10; // backend_updates (seconds) the traffic share covers

const pools = new Map(); // pool → {card, body}
const rows = new Map(); // backend id → row
const health = new Map(); // "pool:addr:port" → {healthy, since, reason}

// pathID is the id the drain endpoint takes: pool:address:port with the
// address as configured (IPv6 without brackets), all characters that are
// valid in a URL path as they are.
const pathID = (b) => `${b.pool}:${b.address}:${b.port}`;
const hostPort = (b) => (b.address.includes(":") ? `[${b.address}]:${b.port}` : `${b.address}:${b.port}`);

function poolTable(name) {
  let p = pools.get(name);
  if (p) return p;
  const body = el("tbody");
  const card = el(
    "div",
    { class: "card pool", data: { pool: name }, id: `pool-${name}` },
    el("h3", {}, "Pool ", el("span", { class: "mono" }, name), " ", el("span", { class: "muted small pool-summary" })),
    el(
      "div",
      { class: "table-wrap" },
      el(
        "table",
        { class: "grid backends" },
        el(
          "thead",
          {},
          el(
            "tr",
            {},
            ["Backend", "State", "Check", "Share", "Packets", "Bytes", "Weight", ""].map((h, i) =>
              el("th", { class: i >= 2 && i <= 5 ? "num" : null }, h),
            ),
          ),
        ),
        body,
      ),
    ),
  );
  $("#pools").append(card);
  p = { card, body };
  pools.set(name, p);
  return p;
}

function makeRow(b) {
  const c = {
    state: el("span", { class: "badge" }),
    since: el("span", { class: "muted small since" }),
    check: el("td", { class: "num", data: { field: "latency", label: "Check" } }),
    share: el("td", { class: "num", data: { field: "share", label: "Share" } }),
    packets: el("td", { class: "num", data: { field: "packets", label: "Packets" } }),
    bytes: el("td", { class: "num", data: { field: "bytes", label: "Bytes" } }),
    weight: el("input", { type: "number", min: 0, max: 1000, step: 1, class: "weight", "aria-label": `Weight of ${b.id}`, data: { field: "weight" } }),
    setWeight: el("button", { type: "button", class: "small-btn", data: { action: "weight" } }, "Set"),
    drain: el("button", { type: "button", class: "small-btn" }),
  };
  const row = { id: b.id, b, c, state: null, transitions: 0, deltas: [], lastPackets: null };
  row.tr = el(
    "tr",
    { data: { backendId: b.id, pool: b.pool, state: b.state, transitions: "0" } },
    el("td", { class: "mono" }, hostPort(b)),
    el("td", { class: "state-cell" }, c.state, c.since),
    c.check, c.share, c.packets, c.bytes,
    el("td", { class: "weight-cell", data: { label: "Weight" } }, c.weight, c.setWeight),
    el("td", { class: "action-cell" }, c.drain),
  );
  c.weight.addEventListener("input", () => (c.weight.dataset.dirty = "true"));
  c.weight.addEventListener("keydown", (ev) => ev.key === "Enter" && c.setWeight.click());
  c.setWeight.addEventListener("click", () => setWeight(row));
  c.drain.addEventListener("click", () => toggleDrain(row));
  return row;
}

function flash(row) {
  row.tr.classList.remove("flash");
  void row.tr.offsetWidth; // restart the animation
  row.tr.classList.add("flash");
}

function updateRow(row, b, share) {
  row.b = b;
  row.share = share;
  const { c, tr } = row;
  if (row.state !== null && row.state !== b.state) {
    row.transitions++;
    tr.dataset.transitions = String(row.transitions);
    flash(row);
  }
  row.state = b.state;
  tr.dataset.state = b.state;
  c.state.dataset.state = b.state;
  setText(c.state, b.state);
  const h = health.get(`${b.pool}:${hostPort(b)}`);
  setText(c.since, h && !isZeroTime(h.since) ? `for ${fmtDuration((Date.now() - Date.parse(h.since)) / 1000)}` : "");
  tr.title = b.last_error ? `last check: ${b.last_error}` : "";
  setText(c.check, isZeroTime(b.last_check) ? "—" : `${b.check_latency_ms.toFixed(2)} ms`);
  c.share.dataset.value = share == null ? "" : String(share);
  setText(c.share, share == null ? "—" : `${(share * 100).toFixed(share < 0.1 ? 1 : 0)} %`);
  setText(c.packets, fmtCount(b.packets));
  setText(c.bytes, fmtBytes(b.bytes));
  if (document.activeElement !== c.weight && c.weight.dataset.dirty !== "true") c.weight.value = String(b.weight);
  c.drain.dataset.action = b.drained ? "undrain" : "drain";
  setText(c.drain, b.drained ? "Undrain" : "Drain");
}

// onBackends renders a backend_update (or a drain response's single view).
export function onBackends(list) {
  $("#pools > .placeholder")?.remove();
  const byPool = new Map();
  for (const b of list) {
    if (!byPool.has(b.pool)) byPool.set(b.pool, []);
    byPool.get(b.pool).push(b);
  }
  const seen = new Set();
  for (const [pool, members] of byPool) {
    const p = poolTable(pool);
    // The traffic share: each member's packets over the last SHARE_WINDOW
    // updates against the pool's.
    let poolSum = 0;
    for (const b of members) {
      let row = rows.get(b.id);
      if (!row) {
        row = makeRow(b);
        rows.set(b.id, row);
      }
      const d = row.lastPackets == null || b.packets < row.lastPackets ? 0 : b.packets - row.lastPackets;
      row.lastPackets = b.packets;
      row.deltas.push(d);
      if (row.deltas.length > SHARE_WINDOW) row.deltas.shift();
      row.recent = row.deltas.reduce((a, x) => a + x, 0);
      poolSum += row.recent;
    }
    let up = 0;
    members.forEach((b, i) => {
      const row = rows.get(b.id);
      seen.add(b.id);
      updateRow(row, b, poolSum > 0 ? row.recent / poolSum : null);
      if (p.body.children[i] !== row.tr) p.body.insertBefore(row.tr, p.body.children[i] || null);
      if (b.state === "up") up++;
    });
    setText(p.card.querySelector(".pool-summary"), `${up}/${members.length} up`);
  }
  for (const [id, row] of rows) {
    if (!seen.has(id)) {
      row.tr.remove();
      rows.delete(id);
    }
  }
  for (const [name, p] of pools) {
    if (!byPool.has(name)) {
      p.card.remove();
      pools.delete(name);
    }
  }
}

// onHealth handles health_status (every backend) and health_event (one
// transition, which flashes the row at once, before the next backend_update).
export function onHealth(msg) {
  if (msg.type === "health_status") {
    for (const h of msg.data.backends || []) {
      health.set(`${h.pool}:${h.backend}`, { healthy: h.healthy, since: h.since, reason: h.last_error });
    }
  } else if (msg.type === "health_event") {
    const e = msg.data;
    health.set(`${e.pool}:${e.backend}`, { healthy: e.healthy, since: e.at, reason: e.reason });
    const row = rows.get(`${e.pool}:${e.backend}`);
    if (row) flash(row);
  }
}

async function toggleDrain(row) {
  const b = row.b;
  const drain = !b.drained;
  const res = await act(
    `${drain ? "Drain" : "Undrain"} ${b.id}`,
    () => api(drain ? "POST" : "DELETE", `/api/backends/${pathID(b)}/drain`),
    row.c.drain,
  );
  if (res && res.id) updateRow(row, res, row.share);
}

async function setWeight(row) {
  const b = row.b;
  const input = row.c.weight;
  const weight = Number(input.value);
  if (input.value === "" || !Number.isInteger(weight) || weight < 0) {
    toast("error", `Weight of ${b.id}: "${input.value}" is not a whole number from 0 to 1000.`);
    return;
  }
  const ok = await act(
    `Weight of ${b.id} → ${weight}`,
    () => api("PUT", `/api/pools/${b.pool}/backends/${b.address}:${b.port}`, { address: b.address, port: b.port, weight }),
    row.c.setWeight,
  );
  if (ok) delete input.dataset.dirty;
}
