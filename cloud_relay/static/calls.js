// Calls: those up now (durations tick every second) and the history with end reasons.
import { $, api, callHtml, duration, esc, events, main, quality, start, when } from "./app.js";

let live = [];

function historyRow(c) {
  return `<tr><td>${esc(when(c.started))}</td><td>${esc(c.caller)} → ${esc(c.callee)}</td><td>${esc(c.mode)}</td>` +
    `<td>${duration(c.duration_s)}</td><td>${esc(quality(c.quality))}</td><td>${esc(c.end_reason || "–")}</td></tr>`;
}

async function load() {
  const [{ calls: up }, { calls: all }] = await Promise.all([
    api("GET", "/api/v1/calls?live=1"), api("GET", "/api/v1/calls?limit=200")]);
  const loaded = Date.now();
  live = up.map((c) => ({ ...c, since: loaded - 1000 * c.duration_s }));
  $("#live-calls").innerHTML = up.map(callHtml).join("") || "<li>No call is up.</li>";
  $("#history").innerHTML = all.filter((c) => !c.live).map(historyRow).join("");
}

function tick() {
  for (const c of live) {
    const cell = document.querySelector(`[data-call="${CSS.escape(c.id)}"] .dur`);
    if (cell) cell.textContent = duration((Date.now() - c.since) / 1000);
  }
}

main(async () => {
  await start();
  events({ "call-started": load, "call-answered": load, "call-ended": load, resync: load });
  await load();
  setInterval(tick, 1000);
});
