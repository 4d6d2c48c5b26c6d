// The traffic section, fed by metrics_update once a second: the per-VIP
// table and the charts of the last five minutes.
import { $, el, setText, domId, fmtPPS, fmtBPS, fmtPerS } from "./live.js";
import { Rolling, TimeChart } from "./charts.js";

const series = {
  pps: new Rolling(),
  bps: new Rolling(),
  flows: new Rolling(),
  verdicts: new Rolling(),
  drops: new Rolling(),
  l7rps: new Rolling(),
  l7p99: new Rolling(),
};
let charts = null;
const vipRows = new Map(); // vip → {tr, cells}

function setupCharts() {
  const fmtMs = (v) => `${v >= 100 ? v.toFixed(0) : v.toFixed(1)} ms`;
  charts = {
    pps: new TimeChart($("#chart-pps"), { format: fmtPPS, empty: "No VIPs configured" }),
    bps: new TimeChart($("#chart-bps"), { format: fmtBPS, empty: "No VIPs configured" }),
    flows: new TimeChart($("#chart-flows"), { format: fmtPerS, empty: "No VIPs configured" }),
    verdicts: new TimeChart($("#chart-verdicts"), { format: fmtPPS }),
    drops: new TimeChart($("#chart-drops"), { format: fmtPPS, empty: "No drops since the agent started" }),
    l7rps: new TimeChart($("#chart-l7-rps"), { format: fmtPerS, label: () => "requests/s" }),
    l7p99: new TimeChart($("#chart-l7-p99"), { format: fmtMs, label: () => "p99" }),
  };
}

// l7Figures reads what the L7 proxy reports, once it does: an explicit rate,
// or the rate between two cumulative request counts (agent/proxy Stats
// shape), and p99 in ms or seconds. Only figures it sends are drawn; nothing
// is estimated.
let l7Prev = null; // {t, requests}
function l7Figures(l7, t) {
  const num = (...names) => {
    for (const n of names) {
      const v = n.split(".").reduce((o, k) => (o == null ? undefined : o[k]), l7);
      if (typeof v === "number" && Number.isFinite(v)) return v;
    }
    return undefined;
  };
  let rps = num("requests_per_s", "rates.requests_per_s", "rps");
  const total = num("requests");
  if (rps === undefined && total !== undefined) {
    if (l7Prev && t > l7Prev.t && total >= l7Prev.requests) rps = (total - l7Prev.requests) / (t - l7Prev.t);
    l7Prev = { t, requests: total };
  }
  let p99 = num("p99_ms", "latency_p99_ms", "latency_ms.p99");
  const p99s = num("latency_p99_seconds");
  if (p99 === undefined && p99s !== undefined) p99 = p99s * 1000;
  return { rps, p99, known: rps !== undefined || p99 !== undefined || total !== undefined };
}

export function onMetrics(m) {
  if (!charts) setupCharts();
  const t = Date.parse(m.at) / 1000;
  const vips = m.vips || [];
  const perVIP = (f) => Object.fromEntries(vips.map((v) => [v.vip, f(v.rates || {})]));
  series.pps.push(t, perVIP((r) => r.pps ?? 0));
  series.bps.push(t, perVIP((r) => r.bps ?? 0));
  series.flows.push(t, perVIP((r) => r.new_flows_per_s ?? 0));
  series.verdicts.push(t, m.xdp_verdicts_per_s || {});
  // Only reasons that ever dropped a packet: the others would be flat zeros.
  const drops = Object.fromEntries(
    Object.entries(m.drops_per_s || {}).filter(([reason]) => (m.drops?.[reason] ?? 0) > 0),
  );
  series.drops.push(t, drops);
  for (const k of ["pps", "bps", "flows", "verdicts", "drops"]) charts[k].update(series[k]);

  const panel = $("#l7-panel");
  if (m.l7 != null) {
    panel.dataset.state = "present";
    const f = l7Figures(m.l7, t);
    if (f.rps !== undefined) series.l7rps.push(t, { rps: f.rps });
    if (f.p99 !== undefined) series.l7p99.push(t, { p99: f.p99 });
    charts.l7rps.update(series.l7rps);
    charts.l7p99.update(series.l7p99);
    setText(
      $("#l7-note"),
      !f.known
        ? `The L7 proxy reports fields this page does not know yet: ${Object.keys(m.l7).join(", ")}.`
        : "",
    );
  } else {
    panel.dataset.state = "absent";
  }

  renderVIPs(vips);
}

function renderVIPs(vips) {
  const body = $("#vip-rows");
  body.querySelector(".placeholder")?.remove();
  const seen = new Set();
  for (const v of vips) {
    seen.add(v.vip);
    let row = vipRows.get(v.vip);
    if (!row) {
      const id = domId(v.vip);
      const cell = (field, extra = {}) => el("td", { class: "num", id: `vip-${field}-${id}`, data: { field, value: "0" }, ...extra });
      row = { cells: { pps: cell("pps"), bps: cell("bps"), flows: cell("flows"), drops: cell("drops") } };
      row.tr = el(
        "tr",
        { id: `vip-${id}`, data: { vip: v.vip } },
        el("td", { class: "mono" }, v.vip),
        row.cells.pps, row.cells.bps, row.cells.flows, row.cells.drops,
        el("td", {}, v.mode || "—"),
        el("td", {}, v.pool || "—"),
      );
      vipRows.set(v.vip, row);
      body.append(row.tr);
    }
    const r = v.rates || {};
    const put = (field, value, fmt) => {
      const c = row.cells[field];
      c.dataset.value = String(value ?? 0);
      setText(c, fmt(value ?? 0));
    };
    put("pps", r.pps, fmtPPS);
    put("bps", r.bps, fmtBPS);
    put("flows", r.new_flows_per_s, fmtPerS);
    put("drops", r.drops_per_s, fmtPPS);
    row.cells.drops.classList.toggle("bad", (r.drops_per_s ?? 0) > 0);
  }
  for (const [vip, row] of vipRows) {
    if (!seen.has(vip)) {
      row.tr.remove();
      vipRows.delete(vip);
    }
  }
  if (!vips.length && !body.children.length) {
    body.append(el("tr", { class: "placeholder" }, el("td", { colspan: 7 }, "No VIPs configured.")));
  }
}
