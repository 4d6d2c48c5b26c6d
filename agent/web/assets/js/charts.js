// Rolling time series and the uPlot charts that draw them.
import uPlot from "../vendor/uplot/uPlot.esm.js";

export const WINDOW_S = 300; // every chart shows the last five minutes

// Rolling keeps the samples of the last WINDOW_S seconds: one shared time
// axis (seconds, the agent's clock) and one value array per key. A key that
// appears later is back-filled with nulls; a key whose values are all
// outside the window is forgotten.
export class Rolling {
  constructor(windowS = WINDOW_S) {
    this.windowS = windowS;
    this.t = [];
    this.v = new Map();
  }

  // push adds a sample; values maps key → number. Samples not newer than the
  // last one (a reconnect repeats the latest) are ignored.
  push(t, values) {
    const last = this.t.at(-1);
    if (last !== undefined && t <= last) return false;
    // After a gap (socket down) a null sample breaks the line.
    if (last !== undefined && t - last > 3) this.#append(last + 1, {});
    this.#append(t, values);
    let drop = 0;
    while (drop < this.t.length && this.t[drop] < t - this.windowS) drop++;
    if (drop) {
      this.t.splice(0, drop);
      for (const [k, a] of this.v) {
        a.splice(0, drop);
        if (a.every((x) => x == null)) this.v.delete(k);
      }
    }
    return true;
  }

  #append(t, values) {
    const n = this.t.length;
    for (const k of Object.keys(values)) {
      if (!this.v.has(k)) this.v.set(k, new Array(n).fill(null));
    }
    this.t.push(t);
    for (const [k, a] of this.v) a.push(values[k] ?? null);
  }

  keys() {
    return [...this.v.keys()].sort();
  }
}

function cssVar(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
}

// TimeChart draws a Rolling in a container, one line per key, over a fixed
// five-minute window that ends at the newest sample. It follows the
// container's width and rebuilds itself when the keys or the theme change.
export class TimeChart {
  constructor(container, { format, height = 170, label = (k) => k, empty = "No data yet" }) {
    this.box = container;
    this.format = format;
    this.height = height;
    this.label = label;
    this.emptyText = empty;
    this.keys = null;
    this.u = null;
    this.end = Date.now() / 1000;
    this.data = null;
    new ResizeObserver(() => this.#resize()).observe(container);
    document.addEventListener("themechange", () => this.#rebuild());
  }

  update(rolling) {
    const keys = rolling.keys();
    this.end = rolling.t.at(-1) ?? Date.now() / 1000;
    this.data = [rolling.t, ...keys.map((k) => rolling.v.get(k))];
    if (!this.u || keys.join("\n") !== this.keys.join("\n")) {
      this.keys = keys;
      this.#rebuild();
    } else {
      this.u.setData(this.data);
    }
    this.box.dataset.empty = keys.length ? "false" : "true";
    this.box.dataset.emptyText = this.emptyText;
  }

  #width() {
    return Math.max(200, Math.floor(this.box.clientWidth));
  }

  // Shorter charts on a phone, so that a screen holds more than one.
  #height() {
    return this.#width() < 500 ? Math.round(this.height * 0.8) : this.height;
  }

  #resize() {
    if (this.u && (this.#width() !== this.u.width || this.#height() !== this.u.height)) {
      this.u.setSize({ width: this.#width(), height: this.#height() });
    }
  }

  #rebuild() {
    if (!this.keys) return;
    this.u?.destroy();
    const axis = cssVar("--muted"), grid = cssVar("--grid");
    const palette = Array.from({ length: 8 }, (_, i) => cssVar(`--series-${i + 1}`));
    const fmt = this.format;
    const tick = (v) => trimZeros(fmt(v));
    const axisOpts = { stroke: axis, grid: { stroke: grid, width: 1 }, ticks: { stroke: grid, width: 1 } };
    this.u = new uPlot(
      {
        width: this.#width(),
        height: this.#height(),
        legend: { live: true },
        cursor: { points: { size: 6 } },
        scales: {
          x: { time: true, range: () => [this.end - WINDOW_S, this.end] },
          y: { range: (_u, _min, max) => [0, max > 0 ? max * 1.15 : 1] },
        },
        axes: [
          { ...axisOpts, space: 70, values: (_u, splits) => splits.map((t) => clock(t)) },
          {
            ...axisOpts,
            values: (_u, splits) => splits.map(tick),
            // Wide enough for the longest label (about 7 px a character).
            size: (_u, values) => 18 + 7 * Math.max(4, ...(values || []).map((v) => v.length)),
          },
        ],
        series: [
          // Away from the plot the legend shows the newest sample.
          { label: "At", value: (u, v, _s, idx) => (idx == null ? "latest" : v == null ? "—" : clock(v, true)) },
          ...this.keys.map((k, i) => ({
            label: this.label(k),
            stroke: palette[i % palette.length],
            width: 1.5,
            points: { show: false },
            value: (u, v, sidx, idx) => {
              if (idx == null) v = lastValue(u.data[sidx]);
              return v == null ? "—" : fmt(v);
            },
          })),
        ],
      },
      this.data,
      this.box,
    );
  }
}

// clock shows a time axis value (seconds) as 24-hour local time.
function clock(t, seconds = false) {
  const d = new Date(t * 1000);
  const hh = String(d.getHours()).padStart(2, "0"), mm = String(d.getMinutes()).padStart(2, "0");
  const ss = d.getSeconds();
  return seconds || ss ? `${hh}:${mm}:${String(ss).padStart(2, "0")}` : `${hh}:${mm}`;
}

function lastValue(values) {
  for (let i = (values?.length ?? 0) - 1; i >= 0; i--) if (values[i] != null) return values[i];
  return null;
}

// trimZeros turns "0.50 pkt/s" into "0.5 pkt/s" and "40.0 kb/s" into "40 kb/s".
const trimZeros = (s) => s.replace(/(\.\d*?)0+(?=\s|$)/, "$1").replace(/\.(?=\s|$)/, "");
