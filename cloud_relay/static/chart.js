// Small hand-written SVG charts: lines over time, and stacked bars per day.
import { esc } from "./app.js";

const W = 600;
const H = 200;
const PAD = { left: 64, right: 10, top: 12, bottom: 30 };
const fmt = (v) => (Math.abs(v) >= 100 ? v.toFixed(0) : v.toFixed(1));

function frame(title, body, legend) {
  return `<figure class="chart"><figcaption>${esc(title)}</figcaption>` +
    `<svg viewBox="0 0 ${W} ${H}" role="img" aria-label="${esc(title)}">${body}</svg>` +
    `<div class="legend">${legend}</div></figure>`;
}

function yAxis(lo, hi, y) {
  return [lo, (lo + hi) / 2, hi].map((v) =>
    `<line class="grid" x1="${PAD.left}" x2="${W - PAD.right}" y1="${y(v)}" y2="${y(v)}"/>` +
    `<text class="tick" x="${PAD.left - 6}" y="${Number(y(v)) + 6}" text-anchor="end">${fmt(v)}</text>`).join("");
}

/**
 * Lines over time. series: [{name, points: [[ms since epoch, value or null], ...]}];
 * a null value breaks its line. Empty series show "no data".
 */
export function lineChart(title, unit, series) {
  const all = series.flatMap((s) => s.points.filter((p) => p[1] !== null && p[1] !== undefined));
  if (!all.length) return frame(title, `<text class="empty" x="${W / 2}" y="${H / 2}" text-anchor="middle">no data yet</text>`, "");
  const t0 = Math.min(...all.map((p) => p[0]));
  const t1 = Math.max(t0 + 1, ...all.map((p) => p[0]));
  let lo = Math.min(...all.map((p) => p[1]));
  let hi = Math.max(...all.map((p) => p[1]));
  if (hi - lo < 1) { const mid = (hi + lo) / 2; lo = mid - 0.5; hi = mid + 0.5; } // flat: centred
  const x = (t) => (PAD.left + ((t - t0) / (t1 - t0)) * (W - PAD.left - PAD.right)).toFixed(1);
  const y = (v) => (H - PAD.bottom - ((v - lo) / (hi - lo)) * (H - PAD.top - PAD.bottom)).toFixed(1);
  const lines = series.map((s, n) => {
    let d = "";
    let pen = "M";
    for (const [t, v] of s.points) {
      if (v === null || v === undefined) { pen = "M"; continue; }
      d += `${pen}${x(t)} ${y(v)}`;
      pen = "L";
    }
    return d ? `<path class="line s${n}" d="${d}"/>` : "";
  }).join("");
  const time = (t) => new Date(t).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  const axis = `<text class="tick" x="${PAD.left}" y="${H - 6}">${time(t0)}</text>` +
    `<text class="tick" x="${W - PAD.right}" y="${H - 6}" text-anchor="end">${time(t1)}</text>`;
  const legend = series.map((s, n) => `<span class="key s${n}">${esc(s.name)}</span>`).join("") +
    `<span class="unit">${esc(unit)}</span>`;
  return frame(title, yAxis(lo, hi, y) + lines + axis, legend);
}

/** Stacked bars: one per day, one colour per kind. counts: {kind: [n per day]}. */
export function dayBars(title, days, counts) {
  const kinds = Object.keys(counts);
  const totals = days.map((_, i) => kinds.reduce((sum, k) => sum + counts[k][i], 0));
  const hi = Math.max(1, ...totals);
  const slot = (W - PAD.left - PAD.right) / days.length;
  const y = (v) => (H - PAD.bottom - (v / hi) * (H - PAD.top - PAD.bottom)).toFixed(1);
  let bars = "";
  days.forEach((day, i) => {
    let base = 0;
    kinds.forEach((kind, n) => {
      const v = counts[kind][i];
      if (!v) return;
      const top = y(base + v);
      bars += `<rect class="bar s${n % 6}" x="${(PAD.left + i * slot + 1).toFixed(1)}" y="${top}" ` +
        `width="${Math.max(1, slot - 2).toFixed(1)}" height="${(y(base) - top).toFixed(1)}">` +
        `<title>${esc(day)}: ${v} ${esc(kind)}</title></rect>`;
      base += v;
    });
  });
  const label = (i, anchor) => `<text class="tick" x="${(PAD.left + (i + 0.5) * slot).toFixed(1)}" y="${H - 6}" text-anchor="${anchor}">${esc(days[i].slice(5))}</text>`;
  const axis = days.length ? label(0, "start") + label(days.length - 1, "end") : "";
  const legend = kinds.length
    ? kinds.map((k, n) => `<span class="key s${n % 6}">${esc(k)}</span>`).join("")
    : "<span>no alerts in this window</span>";
  return frame(title, yAxis(0, hi, y) + bars + axis, legend);
}
