// A small time-series chart in plain SVG (no library): a few lines over
// the last minutes, a grid with the top value labelled.

import {svg} from "./dom.js";

const W = 600;
const H = 180;
const PAD = {left: 64, right: 8, top: 10, bottom: 22};

/** A "nice" upper bound for the y axis: 1, 2 or 5 times a power of ten
 * (of 1024 for bytes, so labels read 1 MiB/s rather than 1.05 MB/s). */
function niceMax(value, binary) {
  if (!(value > 0)) {
    return 1;
  }
  const base = binary ? 1024 : 10;
  let scale = 1;
  while (value / scale >= base) {
    scale *= base;
  }
  for (const step of binary ? [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024] : [1, 2, 5, 10]) {
    if (value <= step * scale) {
      return step * scale;
    }
  }
  return base * scale;
}

/** The time span to draw: what the history covers, at least a minute and
 * at most `limit`, so a fresh history is not a sliver at the right edge. */
export function spanFor(firstTime, now, limit) {
  return Math.min(limit, Math.max(60000, now - (firstTime ?? now)));
}

/**
 * `series`: [{label, cls, points: [[t, value], ...]}]; `span` ms shown up
 * to `now`; `format(value)` for the axis; `max` a fixed top (percentages).
 * The SVG carries data-points and data-peak, for tests and curious users.
 */
export function lineChart({series, now, span, format, max, binary = false, title}) {
  const start = now - span;
  let peak = 0;
  let count = 0;
  for (const s of series) {
    for (const [t, v] of s.points) {
      if (t >= start) {
        peak = Math.max(peak, v);
        count += 1;
      }
    }
  }
  const top = max || niceMax(peak, binary);
  const x = (t) => PAD.left + ((t - start) / span) * (W - PAD.left - PAD.right);
  const y = (v) => PAD.top + (1 - Math.min(v, top) / top) * (H - PAD.top - PAD.bottom);

  const root = svg("svg", {
    viewBox: `0 0 ${W} ${H}`,
    class: "chart",
    role: "img",
    "aria-label": title || "chart",
    "data-points": count,
    "data-peak": Math.round(peak * 100) / 100,
    preserveAspectRatio: "none",
  });
  root.append(svg("title", {}, title || ""));
  for (const f of [0, 0.5, 1]) {
    const gy = y(top * f);
    root.append(svg("line", {x1: PAD.left, x2: W - PAD.right, y1: gy, y2: gy, class: "grid"}));
    root.append(svg("text", {x: PAD.left - 6, y: gy + 4, "text-anchor": "end", class: "axis"}, format(top * f)));
  }
  const ago = span < 120000 ? `-${Math.round(span / 1000)} s` : `-${Math.round(span / 60000)} min`;
  root.append(svg("text", {x: PAD.left, y: H - 6, class: "axis"}, ago));
  root.append(svg("text", {x: W - PAD.right, y: H - 6, "text-anchor": "end", class: "axis"}, "now"));
  for (const s of series) {
    const pts = s.points.filter(([t]) => t >= start - span / 50);
    if (!pts.length) {
      continue;
    }
    if (pts.length === 1) {
      const [t, v] = pts[0];
      root.append(svg("circle", {cx: x(Math.max(t, start)).toFixed(1), cy: y(v).toFixed(1), r: 3, class: `dot ${s.cls}`}));
      continue;
    }
    const coords = pts.map(([t, v]) => `${x(Math.max(t, start)).toFixed(1)},${y(v).toFixed(1)}`);
    root.append(svg("polyline", {points: coords.join(" "), class: `line ${s.cls}`, fill: "none"}));
  }
  return root;
}

/** The legend under a chart: a swatch and a label per series. */
export function legend(series, h) {
  return h(
    "ul",
    {class: "legend"},
    series.map((s) => h("li", {}, h("span", {class: `swatch ${s.cls}`, "aria-hidden": "true"}), s.label)),
  );
}
