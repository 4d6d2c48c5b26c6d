// The node's place in a cluster behind an ECMP router: its BGP sessions,
// which VIPs it announces, and the node drain (withdraw every VIP while
// the data path keeps forwarding). Fed by the status channel.
import { $, el, setText, api, fmtDuration } from "./live.js";
import { act } from "./actions.js";

let drained = false;

export function onCluster(s) {
  drained = !!s.node_drained;
  const box = $("#cluster");
  const b = s.bgp;
  box.dataset.state = b ? "present" : "absent";
  const button = $("#node-drain");
  button.textContent = drained ? "Undrain node" : "Drain node";
  button.hidden = !b;
  if (!b) {
    setText($("#cluster-summary"), "BGP not configured: this node announces nothing.");
    $("#bgp-peers").replaceChildren();
    $("#bgp-vips").replaceChildren();
    return;
  }
  const announced = (b.vips || []).filter((v) => v.announced).length;
  setText($("#cluster-summary"),
    `AS ${b.asn}, router id ${b.router_id} · ${announced}/${(b.vips || []).length} VIPs announced` +
    (drained ? " · node drained: every VIP withdrawn" : ""));
  $("#cluster").dataset.drained = String(drained);
  $("#bgp-peers").replaceChildren(...(b.peers || []).map((p) =>
    el("li", { class: "pill", data: { state: p.up ? "connected" : "closed" },
      title: p.last_error ? `last error: ${p.last_error}` : `${p.transitions} transitions` },
    `${p.address} AS${p.asn} ${p.state} ${fmtDuration(p.uptime_seconds)} · ${(p.routes_sent || []).length} routes`)));
  $("#bgp-vips").replaceChildren(...(b.vips || []).map((v) =>
    el("li", { class: "pill", data: { state: v.announced ? "connected" : "closed" } },
      `${v.address} ${v.announced ? "announced" : "withdrawn"}`)));
}

export function setupCluster() {
  const button = $("#node-drain");
  button.addEventListener("click", () => {
    const what = drained ? "Undrain the node" : "Drain the node";
    act(what, () => api(drained ? "DELETE" : "POST", "/api/node/drain"), button);
  });
}
